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


def group_norms(
    layer_sq_norms: Mapping[str, torch.Tensor], group_of: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Per-sample norm of each group from per-parameter squared norms.

    Args:
        layer_sq_norms: ``{param name: (B,)}`` squared per-sample norms.
        group_of: ``{param name: group name}``.

    Returns:
        ``{group name: (B,)}`` L2 norms.
    """
    sq: dict[str, torch.Tensor] = {}
    for name, s in layer_sq_norms.items():
        g = group_of[name]
        sq[g] = sq[g] + s if g in sq else s
    return {g: s.sqrt() for g, s in sq.items()}


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
        """L2 sensitivity of the clipped sum: ``sqrt(sum_g C_g²)``."""
        return math.sqrt(sum(c * c for c in self.max_norms.values()))

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

    def bind(self, names: Sequence[str]) -> ClipPlan:
        """Binds the rule to the trainable parameter names."""
        c = _check_norm(self.max_norm, "Automatic max_norm")
        if not self.stability > 0:
            raise ValueError(
                f"privgrad: Automatic(stability={self.stability}) must be > 0, or a zero-norm "
                "sample would get an infinite factor. Fix: Automatic(max_norm, stability=0.01)."
            )
        return ClipPlan({n: "all" for n in names}, {"all": c}, stability=float(self.stability))


ClipRule = Flat | PerLayer | Automatic
