"""Clipping rules: per-sample norms → per-sample clip factors.

A rule is a small immutable object. ``DPEngine`` binds it to the model's trainable
parameter names, which yields a ``ClipPlan``: which group each parameter belongs to, the
threshold of each group, and the L2 sensitivity of the clipped sum (the noise std is
``noise_multiplier * sensitivity``). The math is in pure functions.

Formal guarantees:
    For every rule, the clipped per-sample gradient ``f_i g_i`` of any sample has L2 norm
    (over all parameters) at most ``plan.sensitivity``, so adding or removing one sample
    changes the clipped sum by at most ``plan.sensitivity`` in L2 norm.

Edge cases (flat clipping, factor ``f = min(1, C / ‖g‖)``):

    ==================  ==========================================
    case                factor
    ==================  ==========================================
    C = 0               0 (every gradient is zeroed)
    C = ∞               1 (no clipping; only valid with σ = 0)
    ‖g‖ = 0             1 (the gradient is zero anyway)
    ‖g‖ ≤ C             1
    NaN / Inf in g      never reaches here: DPEngine raises first
    empty batch         factors of shape (0,)
    ==================  ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Flat clip factors ``min(1, C / norm)``, with factor 1 for a zero norm.

    Args:
        norms: Per-sample L2 norms, shape ``(B,)``.
        max_norm: The threshold ``C >= 0`` (``math.inf`` disables clipping).

    Returns:
        Factors, shape ``(B,)``, in ``[0, 1]``.
    """
    ones = torch.ones_like(norms)
    if math.isinf(max_norm):
        return ones
    return torch.where(norms > max_norm, max_norm / norms, ones)


def automatic_factors(norms: torch.Tensor, max_norm: float, stability: float) -> torch.Tensor:
    """Normalised ("automatic") clip factors ``C / (norm + γ)`` (Bu et al., 2023).

    Args:
        norms: Per-sample L2 norms, shape ``(B,)``.
        max_norm: ``C``, the sensitivity.
        stability: ``γ > 0``.

    Returns:
        Factors, shape ``(B,)``; every clipped norm is ``C·norm/(norm+γ) < C``.
    """
    return max_norm / (norms + stability)


def adaptive_update(
    max_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """One geometric step of adaptive clipping (Andrew et al., 2021).

    ``C ← C · exp(−η (b̃ − γ))`` where ``b̃`` is the (noisy) fraction of samples whose
    norm was at most ``C``: the threshold grows while fewer than a ``γ`` fraction is
    unclipped and shrinks otherwise, so it tracks the ``γ``-quantile of the norms.

    Args:
        max_norm: The current ``C > 0``.
        unclipped_fraction: ``b̃``, noisy count of unclipped samples / expected batch size.
        target_quantile: ``γ`` in [0, 1].
        learning_rate: ``η > 0``.

    Returns:
        The next threshold.
    """
    return max_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def group_sq_sums(
    layer_sq_norms: Mapping[str, torch.Tensor], group_of: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``{group name: (B,)}`` sums of per-parameter squared norms, added in their order."""
    sq: dict[str, torch.Tensor] = {}
    for name, s in layer_sq_norms.items():
        g = group_of[name]
        sq[g] = sq[g] + s if g in sq else s
    return sq


@dataclass(frozen=True)
class ClipPlan:
    """A clipping rule bound to a model's parameters.

    Attributes:
        group_of: ``{param name: group name}``.
        max_norms: ``{group name: threshold C_g}``.
        stability: ``None`` for ``min(1, C/norm)``; ``γ`` for automatic clipping.
    """

    group_of: dict[str, str]
    max_norms: dict[str, float]
    stability: float | None = None

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the clipped sum: ``sqrt(sum_g C_g²)``.

        Computed without overflow (``math.hypot``): ``C = 1e300`` stays ``1e300``.
        """
        return math.hypot(*self.max_norms.values())

    @property
    def is_flat(self) -> bool:
        """``True`` if one factor applies to all parameters of a sample."""
        return len(self.max_norms) == 1

    def factors(self, norms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{group: (B,) factors}`` from ``{group: (B,) norms}``."""
        if self.stability is None:
            return {g: clip_factors(n, self.max_norms[g]) for g, n in norms.items()}
        return {
            g: automatic_factors(n, self.max_norms[g], self.stability) for g, n in norms.items()
        }


def _check_norm(value: float, what: str) -> float:
    value = float(value)
    if not value >= 0:
        raise ValueError(
            f"privgrad: {what} must be >= 0 (math.inf disables clipping), got {value}. "
            "Fix: pass a positive clipping threshold such as 1.0."
        )
    return value


@dataclass(frozen=True)
class Flat:
    """Clip each sample's whole gradient (all parameters together) to L2 norm ``max_norm``."""

    max_norm: float

    def bind(self, names: Sequence[str]) -> ClipPlan:
        """Binds the rule to the trainable parameter names."""
        c = _check_norm(self.max_norm, "max_grad_norm")
        return ClipPlan({n: "all" for n in names}, {"all": c})


@dataclass(frozen=True)
class PerLayer:
    """Clip groups of parameters separately, each to its own threshold.

    Args:
        max_norms: Either one float — every parameter is its own group with that
            threshold — or ``{key: threshold}`` where a key is a parameter name
            (``"fc1.weight"``) or a module path (``"fc1"``, grouping all parameters under
            it). Every trainable parameter must match exactly one key (the longest match
            wins).

    The noise is calibrated to the total sensitivity ``sqrt(sum_g C_g²)``.
    """

    max_norms: Mapping[str, float] | float = field(default=1.0)

    def bind(self, names: Sequence[str]) -> ClipPlan:
        """Binds the rule to the trainable parameter names."""
        if not isinstance(self.max_norms, Mapping):
            c = _check_norm(self.max_norms, "PerLayer max_norms")
            return ClipPlan({n: n for n in names}, {n: c for n in names})
        keys = {k: _check_norm(v, f"PerLayer max_norms['{k}']") for k, v in self.max_norms.items()}
        group_of: dict[str, str] = {}
        for n in names:
            matches = [k for k in keys if n == k or n.startswith(k + ".")]
            if not matches:
                raise ValueError(
                    f"privgrad: trainable parameter '{n}' matches no key of "
                    f"PerLayer(max_norms={{...}}) (keys: {sorted(keys)}). Every trainable "
                    "parameter needs a threshold, or its gradient would be unclipped. Fix: add "
                    f"'{n}' or its module path to max_norms, or freeze it with "
                    "p.requires_grad_(False)."
                )
            group_of[n] = max(matches, key=len)
        used = set(group_of.values())
        unused = sorted(set(keys) - used)
        if unused:
            raise ValueError(
                f"privgrad: PerLayer keys {unused} match no trainable parameter. Fix: use names "
                "from model.named_parameters() or module paths from model.named_modules()."
            )
        return ClipPlan(group_of, {k: keys[k] for k in keys if k in used})


@dataclass(frozen=True)
class Automatic:
    """Normalised clipping: factor ``C / (norm + γ)`` for every sample (Bu et al., 2023).

    Args:
        max_norm: ``C``, the sensitivity of the clipped sum.
        stability: ``γ > 0``; small values make all clipped norms close to ``C``.
    """

    max_norm: float
    stability: float = 0.01

    def __post_init__(self) -> None:
        c = _check_norm(self.max_norm, "Automatic max_norm")
        if not math.isfinite(c):
            raise ValueError(
                "privgrad: Automatic(max_norm=inf) would scale every gradient by infinity. "
                "Fix: a finite max_norm such as 1.0 (it is the sensitivity)."
            )
        if not (self.stability > 0 and math.isfinite(self.stability)):
            raise ValueError(
                f"privgrad: Automatic(stability={self.stability}) must be > 0, or a zero-norm "
                "sample would get an infinite factor. Fix: Automatic(max_norm, stability=0.01)."
            )

    def bind(self, names: Sequence[str]) -> ClipPlan:
        """Binds the rule to the trainable parameter names."""
        c = float(self.max_norm)
        return ClipPlan({n: "all" for n in names}, {"all": c}, stability=float(self.stability))


@dataclass(frozen=True)
class Adaptive:
    """Flat clipping whose threshold follows a quantile of the norms (Andrew et al., 2021).

    After each logical step the engine releases a noisy count of the samples whose norm was
    at most the current ``C`` (noise ``N(0, count_noise_multiplier²)``, sensitivity 1) and
    moves ``C`` geometrically toward the ``target_quantile`` of the per-sample norms (see
    ``adaptive_update``). The count is a second Gaussian release on the same Poisson
    sample: the engine records each step as ``shared_sample_step(q, [σ, σ_count])``, so
    ``engine.epsilon`` includes it.

    Args:
        target_quantile: ``γ``: the fraction of samples to leave unclipped (0.5: median).
        initial_max_norm: ``C`` of the first step.
        learning_rate: ``η`` of the geometric update (0.2 in the paper).
        count_noise_multiplier: ``σ_b``, std of the noise on the count; the paper uses
            about ``expected_batch_size / 20``.
    """

    target_quantile: float = 0.5
    initial_max_norm: float = 1.0
    learning_rate: float = 0.2
    count_noise_multiplier: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(
                f"privgrad: Adaptive(target_quantile={self.target_quantile}) must be in [0, 1]. "
                "Fix: Adaptive(target_quantile=0.5) tracks the median norm."
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(
                f"privgrad: Adaptive(learning_rate={self.learning_rate}) must be > 0. "
                "Fix: Adaptive(learning_rate=0.2)."
            )
        if not (self.count_noise_multiplier > 0 and math.isfinite(self.count_noise_multiplier)):
            raise ValueError(
                f"privgrad: Adaptive(count_noise_multiplier={self.count_noise_multiplier}) must "
                "be > 0: the count of unclipped samples is released, so it needs noise. Fix: "
                "about expected_batch_size / 20."
            )
        _positive_norm(self.initial_max_norm)

    def bind(self, names: Sequence[str], max_norm: float | None = None) -> ClipPlan:
        """Binds the rule with threshold ``max_norm`` (default ``initial_max_norm``)."""
        c = _positive_norm(self.initial_max_norm if max_norm is None else max_norm)
        return ClipPlan({n: "all" for n in names}, {"all": c})


def _positive_norm(c: float) -> float:
    c = _check_norm(c, "Adaptive initial_max_norm")
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(
            f"privgrad: Adaptive(initial_max_norm={c}) must be positive and finite. "
            "Fix: Adaptive(initial_max_norm=1.0)."
        )
    return c


def adaptive_next(
    rule: Adaptive, max_norm: float, unclipped: float, count_noise: float, expected: float
) -> float:
    """The next threshold of ``rule`` from a noisy count of unclipped samples (or clients).

    Args:
        rule: The ``Adaptive`` rule (target quantile, learning rate).
        max_norm: The current ``C``.
        unclipped: How many norms were ``<= C`` this step (summed over ranks if any).
        count_noise: The ``N(0, σ_b²)`` draw added to the count before its release.
        expected: The expected number of samples (or clients) per step.

    Returns:
        ``adaptive_update(C, (unclipped + noise) / expected, γ, η)``.
    """
    return adaptive_update(max_norm, (unclipped + count_noise) / expected,
                           rule.target_quantile, rule.learning_rate)


def released_noise_multipliers(rule: object, noise_multiplier: float) -> tuple[float, ...]:
    """σ of each Gaussian release of one step under ``rule``, the gradient's first.

    ``Adaptive`` clipping also releases a noisy count on the same Poisson sample
    (``PrivacyLedger.record_sampled`` accounts the two together).
    """
    if isinstance(rule, Adaptive):
        return (noise_multiplier, rule.count_noise_multiplier)
    return (noise_multiplier,)


ClipRule = Flat | PerLayer | Automatic | Adaptive
