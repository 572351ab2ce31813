"""``DPEngine``: the thin stateful shell around privgrad's pure per-sample core.

The engine holds the configuration, the noise source and the step count; it records
layer inputs through ``per_sample.capture``, calls the core, writes ``p.grad`` and returns
a ``StepTrace``. The model is never wrapped: its class, forward and ``state_dict`` keys are
unchanged (only forward hooks are added; ``engine.close()`` removes them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from privgrad import distributed, guards, release, validate
from privgrad.accounting import PrivacyLedger
from privgrad.accounting.validation import check_sample_rate
from privgrad.clipping import (
    Adaptive,
    ClipPlan,
    ClipRule,
    Flat,
    adaptive_next,
    record_release,
)
from privgrad.errors import GradientStateError
from privgrad.noise import NoiseSource
from privgrad.per_sample.batch import (
    check_batch_sizes,
    functional_snapshot,
    output_grads,
    per_sample_grads,
    versions,
)
from privgrad.per_sample.capture import Capture
from privgrad.per_sample.plan import plan_units
from privgrad.physical import BatchResult, clip_batch, sum_fresh
from privgrad.trace import KEEP_OPTIONS, KEEPABLE, Segment, StepTrace

MODES = ("auto", "ghost", "materialize", "vmap")


class DPEngine:
    """Differentially private gradients for any ``nn.Module``, with every stage visible.

    ``backward(losses)`` writes ``p.grad = (sum_i f_i g_i + N(0, σ²S²)) / expected_batch_size``
    for every trainable parameter, where ``g_i`` is sample ``i``'s gradient, ``f_i`` its
    clip factor and ``S`` the sensitivity of the clipping rule (``max_grad_norm`` for flat
    clipping), then any ``torch.optim`` optimizer can step.

    Formal guarantees:
        Each call of ``backward`` is one Gaussian mechanism with L2 sensitivity ``S`` on the
        clipped sum and noise std ``σS`` (add/remove-one-sample adjacency). With Poisson
        sampling at rate ``q`` the step is a Poisson-subsampled Gaussian mechanism with
        noise multiplier ``σ``. Only ``p.grad`` (``trace.private_grad``) is private; every
        other field of the returned trace is NOT.

    Distributed: built after ``torch.distributed.init_process_group`` (world size > 1),
    each rank clips its own samples, the clipped sums are all-reduced in buckets, every
    rank adds the same noise once and writes the same ``p.grad`` (see
    ``privgrad.distributed``). A rank's trace holds its own samples' norms and factors, and
    the global ``clipped_sum`` and ``noise``. Every rank must call ``step`` (or
    ``backward``) for every logical step, with an empty batch if it has no samples.

    Args:
        model: Any ``nn.Module``; never wrapped. Build the engine before the forward pass.
            A ``DistributedDataParallel`` model is unwrapped and its own gradient
            all-reduce switched off (privgrad sums the clipped gradients itself).
        noise_multiplier: ``σ >= 0`` (0 is non-private).
        max_grad_norm: ``C`` for flat clipping; leave ``None`` when ``clipping`` is given.
        expected_batch_size: The normaliser of the private gradient (``q·N`` under Poisson
            sampling), a privacy-relevant constant, never the realised batch size.
        clipping: A rule from ``privgrad.clipping`` (``PerLayer``, ``Automatic``, ...).
        mode: ``"auto"`` (book-keeping; per layer the fastest exact norm, measured once
            per layer shape) | ``"ghost"`` (book-keeping; ghost or materialised norm per
            layer by the cost rule ``2T² < d·p``) | ``"materialize"`` (every per-sample
            gradient) | ``"vmap"`` (torch.func for every layer): performance only, the
            result is the same in every mode. In ``auto`` and ``ghost`` a layer whose
            per-sample gradients are small (``per_sample.ghost.DENSE_ELEMENTS``, and per
            sample at most twice its input and output gradient) is materialised instead of
            book-kept; ``auto`` also streams the one book-kept layer per physical batch
            whose per-sample gradients made a chunk at a time, once every other norm is
            known, were measured fastest (``per_sample.stream``).
        seed: ``None`` for noise from OS entropy; an int for reproducible noise that is NOT
            secure.
        sample_rate: ``q``, the probability that a sample joins a logical batch (Poisson
            sampling: ``expected_batch_size / len(dataset)``). Needed for ``epsilon``.
            ``noise_multiplier`` and ``sample_rate`` may be changed between steps; each
            step is recorded in ``engine.ledger`` with the values it used.
        self_check: Verify on the first step that the per-sample gradients add up to the
            ordinary batch gradient (costs one extra backward, once).

    Edge cases:
        ==========================  ==================================================
        σ = 0, C = ∞                p.grad = sum of per-sample grads / expected_batch_size
        C = 0                       clipped sum is 0; p.grad is pure noise
        σ > 0, C = ∞                rejected (infinite noise)
        empty batch (B = 0)         p.grad is pure noise / expected_batch_size
        NaN/Inf in a sample         NonFiniteGradientError naming the sample; no step
        zero-norm sample            factor 1
        ==========================  ==================================================
    """

    def __init__(
        self,
        model: nn.Module,
        noise_multiplier: float,
        max_grad_norm: float | None = None,
        expected_batch_size: float | None = None,
        clipping: ClipRule | None = None,
        mode: str = "auto",
        seed: int | None = None,
        sample_rate: float | None = None,
        self_check: bool = True,
    ) -> None:
        model = distributed.unwrap(model)
        validate.check(model)
        self.model = model
        self.noise_multiplier = _check_sigma(noise_multiplier)
        self.expected_batch_size = _check_ebs(expected_batch_size)
        if mode not in MODES:
            raise ValueError(f"privgrad: mode={mode!r} is not one of {MODES}.")
        self.mode = mode
        self.clipping = _clip_rule(max_grad_norm, clipping)
        self.distributed = distributed.is_distributed()
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        entropy = (lambda: distributed.shared_seed(self._device)) if self.distributed else None
        if self.distributed and not distributed.all_equal(
                [seed is None, 0 if seed is None else int(seed)], self._device):
            raise ValueError(
                "privgrad: the ranks were given different noise seeds (e.g. seed=base + rank): "
                "their noise and p.grad would differ and the replicas drift apart. Fix: the "
                "same seed on every rank, or seed=None (a fresh seed is shared each step)."
            )
        self.noise = NoiseSource(seed, entropy)
        self._failed = False  # a physical batch of this step raised (distributed agreement)
        self.self_check = self_check
        self.sample_rate = None if sample_rate is None else check_sample_rate(sample_rate)
        self.ledger = PrivacyLedger()
        self.steps = 0
        self._unaccounted = 0  # steps taken without a sample_rate
        self._verified = False  # the first non-empty step is checked against autograd
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._params:
            raise ValueError(
                f"privgrad: {type(model).__name__} has no parameter with requires_grad=True, "
                "so a DPEngine on it would have nothing to train (parameters frozen when the "
                "engine is created are never trained by it). Fix: unfreeze the parameters to "
                "train (p.requires_grad_(True)) before creating the DPEngine."
            )
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.plan: ClipPlan = self.clipping.bind(list(self._params))
        if self.noise_multiplier > 0 and math.isinf(self.plan.sensitivity):
            raise ValueError(
                "privgrad: max_grad_norm=inf with noise_multiplier > 0 would add infinite "
                "noise. Fix: a finite max_grad_norm, or noise_multiplier=0 for non-private runs."
            )
        self._capture = Capture(plan_units(model, use_rules=mode != "vmap"))
        self._grads = guards.GradLedger()
        self._pending: list[tuple[Segment, BatchResult]] = []  # physical batches of this step

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the clipped sum: ``σ · sensitivity``."""
        return 0.0 if self.noise_multiplier == 0 else self.noise_multiplier * self.plan.sensitivity

    @property
    def max_grad_norm(self) -> float:
        """The current clipping threshold (changes every step under ``Adaptive``)."""
        return self.plan.sensitivity

    def backward(self, losses: torch.Tensor, keep: Iterable[str] | str = ()) -> StepTrace:
        """Computes the private gradient of one step and writes it to ``p.grad``.

        Equivalent to ``accumulate(losses, keep, retain=True)`` followed by ``step()``: if
        physical batches were accumulated before, they belong to this step too.

        Args:
            losses: Per-sample losses, shape ``(B,)`` (``reduction="none"``).
            keep: What the trace holds: per-sample gradients ``"pre_clip"``,
                ``"post_clip"``, and ``"clipped_sum"`` (one parameter-sized copy beside
                ``p.grad``; otherwise computed again when read). Anything not kept can
                still be asked for later, as long as what the model ran on is unchanged.

        Returns:
            The step's ``StepTrace`` (NOT PRIVATE except ``private_grad``).
        """
        self.accumulate(losses, keep, retain=True)
        return self.step()

    def accumulate(
        self, losses: torch.Tensor, keep: Iterable[str] | str = (), retain: bool = False
    ) -> int:
        """Adds one physical batch to the current logical step (no noise, no ``p.grad``).

        The per-sample gradients are clipped and summed now, so the batch's activations
        can be freed before the next physical batch; ``step()`` then adds the noise once
        and records one privacy event for the whole logical step.

        Args:
            losses: Per-sample losses of this physical batch, shape ``(b,)``.
            keep: What to hold for the step's trace (as in ``backward``).
            retain: Also hold the batch's recorded layer inputs and output gradients, so
                the trace can materialise any of its samples later (costs memory until
                the trace is dropped); the step can then also write the private gradient
                into the clipped sum instead of holding both (``release``).

        Returns:
            The number of samples accumulated so far in this logical step.
        """
        try:
            return self._accumulate(losses, keep, retain)
        except Exception:
            self._failed = True  # under torch.distributed every rank then refuses this step
            raise

    def _accumulate(
        self, losses: torch.Tensor, keep: Iterable[str] | str, retain: bool
    ) -> int:
        keep = _check_keep(keep)
        losses = guards.check_losses(losses)
        trainable = {n: p for n, p in self._params.items() if p.requires_grad}
        guards.check_any_trainable(trainable)
        if not self._pending:
            self._grads.check(trainable)
        elif set(trainable) != set(self._pending[0][1].layer_sq):
            raise GradientStateError(
                "privgrad: the set of trainable parameters changed between physical batches "
                "of one logical step. Fix: freeze or unfreeze parameters between steps only."
            )
        calls = self._capture.take()
        B = losses.shape[0]
        ios = []
        reference = reference_one = None
        if B > 0:
            if not losses.requires_grad:
                raise guards.not_connected(losses)
            if self.self_check and not self._verified:
                reference = _autograd(losses.sum(), trainable)
                reference_one = _autograd(losses[0], trainable) if B > 1 else None
            ios = output_grads(losses, calls)
            if not ios:
                raise guards.not_connected(losses)
            check_batch_sizes(ios, B)
        result = clip_batch(ios, self._names, trainable, self.plan, B, self.mode, keep, reference)
        if reference_one is not None:
            one = per_sample_grads(ios, self._names, B, torch.zeros(1, dtype=torch.long,
                                                                    device=losses.device))
            rtol = 3e-2 if any(io.half for io in ios) else 1e-3
            guards.check_sample(reference_one, {n: one[n] for n in trainable}, 0, rtol)
        if reference is not None:
            self._verified = True
        offset = sum(seg.size for seg, _ in self._pending)
        lazy = retain and len(result.kept) < len(KEEPABLE)
        segment = Segment(offset, B, ios if retain else None, result.kept,
                          functional_snapshot(ios) if lazy else {},
                          versions(ios) if retain else ())
        self._pending.append((segment, result))
        return offset + B

    def step(self) -> StepTrace:
        """Ends the logical step: adds the noise once and writes ``p.grad``.

        ``p.grad = (sum of the clipped sums of the accumulated physical batches + noise) /
        expected_batch_size``, one privacy event is recorded (before ``p.grad`` is
        written), and under ``Adaptive`` clipping the threshold is updated from a noisy
        count of unclipped samples. With nothing accumulated (an empty Poisson batch) the
        gradient is pure noise.

        Returns:
            The ``StepTrace`` of all samples of the logical step (NOT PRIVATE except
            ``private_grad``).
        """
        pending, self._pending = self._pending, []
        failed, self._failed = self._failed, False
        trainable = {n: p for n, p in self._params.items() if p.requires_grad}
        problem: Exception | None = None
        try:
            self._check_step(pending, trainable)
        except GradientStateError as e:
            problem = e
        if self.distributed and not distributed.all_equal(
                [int(failed or problem is not None), self.steps], self._device):
            problem = problem or GradientStateError(
                f"privgrad: step {self.steps + 1} failed on another rank (or the ranks are at "
                "different steps), so no rank takes it: every rank discards this logical "
                "step's batches and p.grad is not written. Fix: see the other rank's error; "
                "every rank must call step() once per logical step, also after a failed "
                "accumulate()."
            )
        if problem is not None:
            raise problem
        if not pending:
            empty = clip_batch([], self._names, trainable, self.plan, 0, self.mode)
            pending = [(Segment(0, 0, [], {}, {}), empty)]
        results = [r for _, r in pending]
        clipped_sum = {n: sum_fresh(r.clipped_sum[n] for r in results) for n in trainable}
        if self.distributed:  # the sum over every rank's samples, before the noise
            clipped_sum = distributed.all_reduce_sum(clipped_sum)
        # p.grad = (clipped sum + noise) / expected_batch_size, written into the clipped
        # sum's own tensors when the trace can compute it again (release.py).
        again = release.recompute_thunk(pending, self._names, trainable) if (
            release.recomputable(pending, clipped_sum, self.distributed)) else None
        private, noise, clipped = release.write_private_gradient(
            clipped_sum, self.noise, self.noise_std, self.expected_batch_size, again)
        norms = torch.cat([r.total_sq for r in results]).sqrt()
        factors = {g: torch.cat([r.factors[g] for r in results]) for g in results[0].factors}
        max_norm, noise_std = self.max_grad_norm, self.noise_std
        self._record_step(norms)  # before p.grad is written: a step is never taken unrecorded
        for n, p in trainable.items():
            p.grad = private[n].to(p.dtype)
            self._grads.record(n, p.grad)
        return StepTrace(
            norms=norms,
            layer_norms={n: torch.cat([r.layer_sq[n] for r in results]).sqrt() for n in trainable},
            clip_factors=factors[next(iter(factors))] if self.plan.is_flat else factors,
            param_clip_factors={n: factors[self.plan.group_of[n]] for n in trainable},
            noise_std=noise_std,
            expected_batch_size=self.expected_batch_size,
            batch_size=len(norms),
            max_grad_norm=max_norm,
            _segments=tuple(seg for seg, _ in pending),
            _noise_draw=noise,
            _clipped_sum=clipped,
            _names=self._names,
            _shapes={n: p.shape for n, p in trainable.items()},
        )

    def _check_step(self, pending: list, trainable: dict[str, nn.Parameter]) -> None:
        """Raises ``GradientStateError`` if this step must not be taken on this rank."""
        guards.check_any_trainable(trainable)
        if pending and set(trainable) != set(pending[0][1].layer_sq):
            raise GradientStateError(
                "privgrad: the set of trainable parameters changed between accumulate() and "
                "step(); the accumulated physical batches were clipped with the old set, so "
                "they are discarded and no step is taken. Fix: freeze or unfreeze parameters "
                "between logical steps only, then accumulate again."
            )
        if not pending:
            self._grads.check(trainable)

    def _record_step(self, norms: torch.Tensor) -> None:
        self.steps += 1
        rule = self.clipping
        if self.sample_rate is None:
            self._unaccounted += 1
        else:
            record_release(self.ledger, self.noise_multiplier, self.sample_rate, rule)
        if isinstance(rule, Adaptive):
            unclipped = float((norms <= self.max_grad_norm).sum())
            if self.distributed:  # the count over every rank's samples, then one release
                unclipped = distributed.sum_scalar(unclipped, self._device)
            count_noise = self.noise.scalar(rule.count_noise_multiplier)
            new = adaptive_next(rule, self.max_grad_norm, unclipped, count_noise,
                                self.expected_batch_size)
            self.plan = rule.bind(list(self._params), new)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """Privacy spent so far: ε at ``delta`` for every step recorded in the ledger.

        Args:
            delta: Target δ in (0, 1), typically below 1 / len(dataset).
            accountant: ``"pld"`` (tight, default) or ``"rdp"`` (looser upper bound).

        Returns:
            ε; ``inf`` if any step ran with ``noise_multiplier=0``.

        Raises:
            ValueError: If steps were taken without a ``sample_rate``.
        """
        unaccounted = self._unaccounted
        if unaccounted:
            raise ValueError(
                f"privgrad: {unaccounted} step(s) ran without a sample_rate, so their privacy "
                "cost is unknown. Fix: DPEngine(..., sample_rate=expected_batch_size / "
                "len(dataset)) with Poisson sampling (privgrad.data)."
            )
        return self.ledger.epsilon(delta, accountant)

    def state_dict(self) -> dict:
        """The engine's state: steps, privacy ledger, noise generator, clip threshold."""
        return {
            "steps": self.steps,
            "unaccounted": self._unaccounted,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "ledger": self.ledger.state_dict(),
            "noise": self.noise.state_dict(),
            "max_grad_norm": self.max_grad_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``: a restored engine reports the same ε."""
        self.steps = int(state["steps"])
        self._unaccounted = int(state.get("unaccounted", 0))
        self.noise_multiplier = _check_sigma(state["noise_multiplier"])
        self.sample_rate = state["sample_rate"]
        self.ledger.load_state_dict(state["ledger"])
        self.noise.load_state_dict(state["noise"])
        if isinstance(self.clipping, Adaptive) and "max_grad_norm" in state:
            self.plan = self.clipping.bind(list(self._params), state["max_grad_norm"])

    def close(self) -> None:
        """Removes privgrad's hooks from the model."""
        self._capture.close()

    def __enter__(self) -> DPEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _autograd(loss: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return dict(zip(params, grads, strict=True))


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(
            f"privgrad: noise_multiplier must be a finite number >= 0, got {sigma}. Fix: pick "
            "one for your budget with pg.accounting.calibrate_noise(...), or 0 for non-private."
        )
    return sigma


def _check_ebs(ebs: float | None) -> float:
    if ebs is None or not float(ebs) > 0 or not math.isfinite(float(ebs)):
        raise ValueError(
            f"privgrad: expected_batch_size must be a positive number, got {ebs}. It is the "
            "fixed normaliser of the private gradient (sample rate × dataset size under "
            "Poisson sampling). Fix: DPEngine(model, ..., expected_batch_size=256)."
        )
    return float(ebs)


def _clip_rule(max_grad_norm: float | None, clipping: ClipRule | None) -> ClipRule:
    if clipping is not None and max_grad_norm is not None:
        raise ValueError(
            "privgrad: pass either max_grad_norm (flat clipping) or clipping=..., not both: "
            "the clipping rule carries its own thresholds. Fix: drop max_grad_norm."
        )
    if clipping is not None:
        return clipping
    if max_grad_norm is None:
        raise ValueError(
            "privgrad: no clipping threshold. Fix: DPEngine(model, ..., max_grad_norm=1.0) "
            "or clipping=pg.clipping.PerLayer({...})."
        )
    return Flat(max_grad_norm)


def _check_keep(keep: Iterable[str] | str) -> tuple[str, ...]:
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    bad = [k for k in keep if k not in KEEP_OPTIONS]
    if bad:
        raise ValueError(f"privgrad: keep={bad} not understood; choose from {KEEP_OPTIONS}.")
    return keep
