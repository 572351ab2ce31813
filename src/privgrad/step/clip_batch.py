"""One physical batch of a logical step: per-sample norms -> clip factors -> clipped sum.

A pure function of the recorded layer calls (``per_sample.layer_io.LayerIO``) and the
bound clipping plan, in a straight line: split the calls into book-kept ones and ones
whose per-sample gradients are materialised (``per_sample.ghost.split``), their squared
norms, the factors of the clipping plan, the clipped sum. ``step.release`` then sums the
physical batches of the logical step and adds the noise once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from privgrad import guards
from privgrad.clipping import ClipPlan, group_sq_sums
from privgrad.per_sample import chunks, ghost
from privgrad.per_sample.capture import Call
from privgrad.per_sample.layer_io import LayerIO, materialize

KEEPABLE = ("pre_clip", "post_clip")
"""Per-sample gradients a step can hold (``keep=``)."""


@dataclass(frozen=True)
class BatchResult:
    """What one physical batch of ``B`` samples contributes to its logical step. NOT PRIVATE.

    Attributes:
        layer_sq: ``{param name: (B,)}`` squared per-sample norms.
        total_sq: ``(B,)`` squared per-sample norms over all trainable parameters.
        factors: ``{group name: (B,)}`` clip factors.
        param_factors: ``{param name: (B,)}`` the factor applied to each parameter.
        clipped_sum: ``{param name: p.shape}`` sum over the batch of clipped gradients.
        kept: ``{"pre_clip"|"post_clip": {param name: (B, *p.shape)}}`` as asked by ``keep``.
    """

    layer_sq: dict[str, torch.Tensor]
    total_sq: torch.Tensor
    factors: dict[str, torch.Tensor]
    param_factors: dict[str, torch.Tensor]
    clipped_sum: dict[str, torch.Tensor]
    kept: dict[str, dict[str, torch.Tensor]]


def clip_batch(
    ios: list[LayerIO],
    names: dict[int, str],
    trainable: Mapping[str, nn.Parameter],
    plan: ClipPlan,
    batch_size: int,
    mode: str,
    keep: tuple[str, ...] = (),
    reference: Mapping[str, torch.Tensor | None] | None = None,
    checked: int | None = None,
) -> BatchResult:
    """Per-sample norms, clip factors and the clipped sum of one physical batch.

    Args:
        ios: The batch's recorded layer calls with their output gradients.
        names: ``id(parameter) -> name``.
        trainable: ``{name: parameter}`` of the trainable parameters.
        plan: The bound clipping rule.
        batch_size: ``B``.
        mode: ``"auto"``, ``"ghost"``, ``"materialize"`` or ``"vmap"`` (performance only).
        keep: Per-sample gradients to return materialised (``"pre_clip"``, ``"post_clip"``).
        reference: ``{name: autograd gradient of (w * losses).sum()}`` to self-check
            against, with ``w = self_check_weights(B, checked)``, or ``None``.
        checked: How many leading samples ``reference`` covers (``self_check_samples``;
            ``None``: all ``B``).

    Returns:
        The batch's ``BatchResult``.
    """
    B = batch_size
    materialize_all = mode in ("materialize", "vmap") or any(k in KEEPABLE for k in keep)
    ghost_ios, dense_ios = ([], ios) if materialize_all else ghost.split(
        ios, names, B, small_dense=mode == "auto")
    # 1. squared per-sample norms of every trainable parameter
    if B > 0:
        psg = materialize(dense_ios, names, B)
    else:
        psg = {n: p.new_zeros(0, *p.shape) for n, p in trainable.items()}
    layer_sq = ghost.squared_norms(ghost_ios, names)
    layer_sq |= {n: chunks.squared_norms(g) for n, g in psg.items()}
    guards.check_complete(trainable, layer_sq)
    layer_sq = {n: layer_sq[n] for n in trainable}
    group_sq = group_sq_sums(layer_sq, plan.group_of)
    total_sq = _total_sq(layer_sq, group_sq, plan)
    guards.check_finite(total_sq, layer_sq)
    if reference is not None:  # first step: weighted per-sample gradients add up to autograd's
        w = self_check_weights(B, B if checked is None else checked, total_sq.device)
        weights = {n: w.to(s.dtype) for n, s in layer_sq.items()}
        sums = {n: chunks.weighted_sum(weights[n], g) for n, g in psg.items()}
        sums |= ghost.clipped_sums(ghost_ios, names, weights)
        guards.self_check(reference, sums,
                          {n: (weights[n] * s.sqrt()).sum() for n, s in layer_sq.items()},
                          self_check_rtol(ios, trainable))
    # 2. clip factors
    factors = plan.factors({g: s.sqrt() for g, s in group_sq.items()})
    param_factors = {n: factors[plan.group_of[n]] for n in trainable}
    # 3. the clipped sum: book-kept calls by their rule, the others by a weighted sum
    clipped_sum = ghost.clipped_sums(ghost_ios, names, param_factors)
    clipped_sum |= {n: chunks.weighted_sum(param_factors[n], g) for n, g in psg.items()}
    kept = {}
    if "pre_clip" in keep:
        kept["pre_clip"] = psg
    if "post_clip" in keep:
        kept["post_clip"] = {n: chunks.scaled(param_factors[n], g) for n, g in psg.items()}
    return BatchResult(
        layer_sq=layer_sq,
        total_sq=total_sq,
        factors=factors,
        param_factors=param_factors,
        clipped_sum={n: clipped_sum[n] for n in trainable},
        kept=kept,
    )


def self_check_rtol(ios: Iterable[LayerIO], trainable: Mapping[str, nn.Parameter]) -> float:
    """Tolerance of the first step's checks against autograd: wider when 16-bit is involved.

    16-bit when a recorded layer ran in 16 bits (``LayerIO.half``: autocast) or a trained
    parameter is 16-bit (its autograd reference is rounded in 16 bits).
    """
    half = any(io.half for io in ios) or any(p.dtype in chunks.HALF for p in trainable.values())
    return 3e-2 if half else 1e-3


def self_check_weights(batch_size: int, checked: int, device: torch.device) -> torch.Tensor:
    """``(B,)`` weights of the first step's check: ``2^-(i mod 3)`` for ``i < checked``, else 0.

    The check compares ``Σ_i w_i g_i`` computed the way the clipped sum is (each rule's
    ``clipped_sum`` with ``w`` as the factors, weighted sums of materialised gradients)
    with autograd's gradient of ``Σ_i w_i losses[i]``. Unequal weights make it a check of
    the factors too: a clipped sum that ignored them, squared them or gave them to the
    wrong samples would pass with all-ones weights. Powers of two are exact in every
    float dtype, so ``w · losses`` rounds nothing even in 16 bits.
    """
    i = torch.arange(batch_size, device=device)
    return torch.where(i < checked, torch.exp2(-(i % 3).double()), 0.0).float()


SELF_CHECK_16_BIT = 16
"""Samples the first step's batch-gradient check covers when the model computes in 16 bits."""


def self_check_samples(
    calls: Iterable[Call], trainable: Mapping[str, nn.Parameter], batch_size: int
) -> int:
    """How many leading samples the first step's batch-gradient check covers.

    All ``B`` of them, unless a trainable parameter or a recorded layer input is 16-bit:
    then the first ``SELF_CHECK_16_BIT``. PyTorch's CPU kernels accumulate a 16-bit weight
    gradient over the batch in 16 bits, so autograd's gradient of a large batch is no
    reference (bfloat16, 2048 aligned samples: the conv's 77% and the embedding's 78% off,
    the conv's 4% off at 128 samples, 0.3% at 8 to 32), while the clipped sums it is
    compared with are accumulated in float32. The check on the first samples is the same
    identity (their per-sample gradients add up to the gradient of their summed losses),
    and ``guards.check_sample`` still checks one sample on its own.

    Args:
        calls: The batch's recorded calls.
        trainable: ``{name: parameter}``.
        batch_size: ``B``.
    """
    half = any(p.dtype in chunks.HALF for p in trainable.values()) or any(
        isinstance(t, torch.Tensor) and t.dtype in chunks.HALF for c in calls for t in c.args)
    return min(batch_size, SELF_CHECK_16_BIT) if half else batch_size


def _total_sq(
    layer_sq: Mapping[str, torch.Tensor], group_sq: Mapping[str, torch.Tensor], plan: ClipPlan
) -> torch.Tensor:
    """``(B,)`` squared norm of each sample's whole gradient (``StepTrace.norms``).

    With one clipping group it is the very tensor that group's factors are computed from
    (``min(1, C / sqrt(total))``), so the reported norms and the applied factors agree to
    the last bit, and a sample counted unclipped (``norm <= C``) has factor 1 exactly.
    Callers pass at least one trainable parameter (``guards.check_any_trainable``).
    """
    if plan.is_flat:
        (total,) = group_sq.values()
        return total
    return sum(layer_sq.values())
