"""Client-level DP for federated learning: update clipping and the DP-FedAvg aggregator.

Central DP at the server (McMahan et al. 2018): each round samples every client
independently with probability ``q`` (Poisson: ``expected_clients = q · num_clients``),
clips each participating client's model update on its whole L2 norm (all tensors
together) to ``C``, and releases ``(Σ clipped updates + N(0, σ²C²)) / expected_clients``.
Adding or removing one client changes the clipped sum by at most ``C``, so a round is a
Poisson-subsampled Gaussian mechanism with noise multiplier ``σ`` and the rounds are
accounted by the same ``privgrad.accounting.PrivacyLedger`` as DP-SGD steps.

Adaptive client clipping (Andrew et al. 2021): after each round the aggregator releases a
noisy count of the *unclipped* updates (norm ≤ C, noise std ``σ_b``) and moves ``C``
geometrically toward the ``target_quantile`` of the update norms (``clipping.adaptive_update``).
The count is a second release on the same sample: each round is recorded as
``shared_sample_step(q, [σ, σ_b])``.

Formal guarantees:
    Client-level (ε, δ)-DP of the sequence of released aggregates, for the adjacency
    "add or remove one client's whole data", given that clients are sampled as described
    (``DPFedAvg.sample``) and the server runs the aggregator honestly. Everything in a
    ``RoundResult`` except ``update`` is NOT private.

16-bit updates: the clipped sum is accumulated in float32 (``accumulation_dtype``), each
update widened exactly and multiplied by its float64 factor in float32, and the noise is
drawn, added and divided by ``expected_clients`` in float32; only the aggregate is rounded,
once, into the updates' dtype (post-processing). Summed in 16 bits, the sum's own rounding
let one client move it by 1.4·C (float16, K = 2048 aligned updates) or not at all
(bfloat16: the sum saturates and the aggregate is wrong).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from privgrad.accounting import PrivacyLedger
from privgrad.accounting.validation import check_noise_multiplier
from privgrad.clipping import Adaptive, adaptive_next, clip_factors, released_noise_multipliers
from privgrad.data import PoissonSampler, derived_seed
from privgrad.noise import NoiseSource
from privgrad.per_sample.chunks import accumulation_dtype
from privgrad.trace import private_gradient

Update = Mapping[str, torch.Tensor]


def update_norm(update: Update) -> float:
    """L2 norm of a whole update (all tensors together, accumulated in float64)."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))


def clip_update(update: Update, max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scales an update so that its whole L2 norm is at most ``max_norm``.

    Args:
        update: ``{name: tensor}``, e.g. client weights minus global weights.
        max_norm: ``C >= 0``.

    Returns:
        ``(clipped update, factor)`` with ``factor = min(1, C / ‖update‖)`` (1 for a zero
        update), from the norm in float64. A 16-bit update comes back in float32
        (``accumulation_dtype``): the product rounded to 16 bits could be up to
        ``C·(1 + 2^-8)`` long. Round it only after the noise is added.
    """
    norm = torch.tensor([update_norm(update)], dtype=torch.float64)
    factor = float(clip_factors(norm, float(max_norm))[0])
    return {n: t.to(accumulation_dtype(t.dtype)) * factor for n, t in update.items()}, factor


@dataclass(frozen=True)
class RoundResult:
    """One aggregated round. Only ``update`` is private.

    Attributes:
        update: ``{name: tensor}`` = (clipped_sum + noise) / expected_clients: add it to
            the global model.
        clipped_sum: Sum of the clipped client updates, in float32 for 16-bit updates
            (``accumulation_dtype``; float32 and float64 keep their dtype).
        noise: The Gaussian noise added to it, in the same dtype.
        norms: ``(K,)`` each participating client's update norm before clipping.
        factors: ``(K,)`` their clip factors.
        max_norm: ``C`` used this round.
        noise_std: ``σ · C``.
        clients: ``K``, the number of participating clients.
    """

    update: dict[str, torch.Tensor]
    clipped_sum: dict[str, torch.Tensor]
    noise: dict[str, torch.Tensor]
    norms: torch.Tensor
    factors: torch.Tensor
    max_norm: float
    noise_std: float
    clients: int


class DPFedAvg:
    """DP-FedAvg aggregation with Poisson client sampling and an ε ledger.

    Args:
        noise_multiplier: ``σ > 0`` (0: non-private, ε = ∞).
        max_norm: ``C`` for fixed clipping; leave ``None`` with ``adaptive``.
        num_clients: Size of the client population.
        clients_per_round: Expected participating clients per round (``q · num_clients``).
        adaptive: ``clipping.Adaptive`` (its ``initial_max_norm`` starts ``C``) for
            adaptive client clipping.
        seed: ``None``: client sampling and noise from OS entropy (secure); an int for
            reproducible rounds (NOT secure).
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_norm: float | None = None,
        *,
        num_clients: int,
        clients_per_round: float,
        adaptive: Adaptive | None = None,
        seed: int | None = None,
    ) -> None:
        if (max_norm is None) == (adaptive is None):
            raise ValueError(
                "privgrad.federated: pass exactly one of max_norm (fixed clipping) and "
                "adaptive=pg.clipping.Adaptive(...). Fix: DPFedAvg(1.0, max_norm=0.5, ...)."
            )
        if num_clients < 1 or not 0 < clients_per_round <= num_clients:
            raise ValueError(
                f"privgrad.federated: clients_per_round={clients_per_round} must be in (0, "
                f"num_clients={num_clients}]. Fix: e.g. clients_per_round=0.1 * num_clients."
            )
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.num_clients = int(num_clients)
        self.expected_clients = float(clients_per_round)
        # clients are Poisson-sampled exactly as records are (privgrad.data)
        self._clients = PoissonSampler(self.num_clients, expected_batch_size=clients_per_round,
                                       seed=None if seed is None else derived_seed(seed, "clients"))
        self.sample_rate = self._clients.sample_rate
        self.adaptive = adaptive
        self.max_norm = float(adaptive.initial_max_norm if adaptive else max_norm)
        if not (self.max_norm > 0 and math.isfinite(self.max_norm)):
            raise ValueError(f"privgrad.federated: max_norm must be finite and > 0, got "
                             f"{self.max_norm}.")
        self.noise = NoiseSource(seed)
        self.ledger = PrivacyLedger()
        self.rounds = 0

    def sample(self) -> list[int]:
        """This round's clients: each joins independently with probability ``q``."""
        return next(iter(self._clients)).tolist()

    def aggregate(self, updates: Sequence[Update], like: Update | None = None) -> RoundResult:
        """Clips, sums, adds the noise once, records the round; updates adaptive ``C``.

        Args:
            updates: The participating clients' updates (client weights minus global
                weights), each ``{name: tensor}`` with the same names and shapes.
            like: Names and shapes of an update, needed when ``updates`` is empty (then the
                aggregate is pure noise).

        Returns:
            The round's ``RoundResult``; ``result.update`` is the private aggregate, in
            the updates' dtype (for 16 bits: computed in float32 and rounded once).
        """
        template = updates[0] if updates else like
        if template is None:
            raise ValueError(
                "privgrad.federated: no client updates and no `like=` to shape the noise. "
                "Fix: aggregate([], like=global_weights) for a round where no client was "
                "sampled: it still releases noise and counts in the ledger."
            )
        names = list(template)
        ints = [n for n in names if not template[n].is_floating_point()]
        if ints:
            raise ValueError(
                f"privgrad.federated: update tensors {ints} are not floating point (buffers "
                "such as num_batches_tracked or position ids?). Fix: aggregate the trainable "
                "floating-point weights only and keep the others from the global model."
            )
        for i, u in enumerate(updates):
            if list(u) != names or any(u[n].shape != template[n].shape for n in names):
                raise ValueError(f"privgrad.federated: update {i} does not have the names and "
                                 "shapes of update 0. Fix: send every client the same model.")
        norms = torch.tensor([update_norm(u) for u in updates], dtype=torch.float64)
        for i in (~torch.isfinite(norms)).nonzero().flatten().tolist():  # NaN/Inf → norm
            raise ValueError(f"privgrad.federated: update {i} has a NaN or Inf; it would "
                             "poison the sum. Fix: drop that client's update this round.")
        C = self.max_norm
        factors = clip_factors(norms, C)
        # 16 bits: sum, noise and normalisation in float32, one rounding at the end (the
        # 16-bit sum's own rounding would let one client move it by more than C)
        dtypes = {n: template[n].dtype for n in names}
        clipped_sum = {n: torch.zeros_like(template[n], dtype=accumulation_dtype(dtypes[n]),
                                           memory_format=torch.contiguous_format)
                       for n in names}
        for u, f in zip(updates, factors.tolist(), strict=True):
            for n in names:
                clipped_sum[n] += u[n].to(clipped_sum[n].dtype) * f
        std = self.noise_multiplier * C
        noise = self.noise.gaussian(clipped_sum, std)
        update = private_gradient(clipped_sum, noise, self.expected_clients, dtypes)
        self._record(norms)
        return RoundResult(update, clipped_sum, noise, norms, factors, C, std, len(updates))

    def _record(self, norms: torch.Tensor) -> None:
        rule = self.adaptive
        self.ledger.record_sampled(
            self.sample_rate, released_noise_multipliers(rule, self.noise_multiplier),
            sensitivity=self.max_norm)
        self.rounds += 1
        if rule is None:
            return
        unclipped = float((norms <= self.max_norm).sum())
        count_noise = self.noise.scalar(rule.count_noise_multiplier)
        self.max_norm = adaptive_next(rule, self.max_norm, unclipped, count_noise,
                                      self.expected_clients)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """Client-level ε spent by the rounds so far, at ``delta``."""
        return self.ledger.epsilon(delta, accountant)

    def state_dict(self) -> dict[str, Any]:
        """Rounds, ledger, clip norm and generator states."""
        return {"rounds": self.rounds, "max_norm": self.max_norm,
                "ledger": self.ledger.state_dict(), "noise": self.noise.state_dict(),
                "sampler": self._clients.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``."""
        self.rounds = int(state["rounds"])
        self.max_norm = float(state["max_norm"])
        self.ledger.load_state_dict(state["ledger"])
        self.noise.load_state_dict(state["noise"])
        self._clients.load_state_dict(state["sampler"])
