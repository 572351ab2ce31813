"""One physical batch of a logical step: per-sample norms, clip factors, clipped sum.

Pure functions of the recorded layer calls (``per_sample.batch.LayerIO``) and the bound
clipping plan; ``DPEngine`` sums the results of the physical batches of one logical step
and adds the noise once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from privgrad import guards
from privgrad.clipping import ClipPlan, group_norms
from privgrad.per_sample import chunks, ghost
from privgrad.per_sample.batch import LayerIO, per_sample_grads
from privgrad.trace import clip


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
        reference: ``{name: autograd gradient of losses.sum()}`` to self-check against,
            or ``None``.

    Returns:
        The batch's ``BatchResult``.
    """
    B = batch_size
    materialize_all = mode in ("materialize", "vmap") or bool(keep)
    ghost_ios, dense_ios = ([], ios) if materialize_all else ghost.split(ios, names, B)
    if B > 0:
        psg = per_sample_grads(dense_ios, names, B)
    else:
        psg = {n: p.new_zeros(0, *p.shape) for n, p in trainable.items()}
    strategy = "measure" if mode == "auto" else "cost"
    layer_sq = ghost.squared_norms(ghost_ios, names, strategy)
    layer_sq |= {n: chunks.squared_norms(g) for n, g in psg.items()}
    guards.check_complete(trainable, layer_sq)
    layer_sq = {n: layer_sq[n] for n in trainable}
    dtype = next(iter(layer_sq.values())).dtype if layer_sq else torch.float32
    total_sq = sum(layer_sq.values()) if layer_sq else torch.zeros(B, dtype=dtype)
    guards.check_finite(total_sq, layer_sq)
    if reference is not None:
        ones = {n: torch.ones_like(s) for n, s in layer_sq.items()}
        sums = {n: g.sum(0) for n, g in psg.items()}
        sums |= ghost.clipped_sums(ghost_ios, names, ones)
        rtol = 3e-2 if any(io.half for io in ios) else 1e-3
        guards.self_check(reference, sums, {n: s.sqrt().sum() for n, s in layer_sq.items()}, rtol)
    factors = plan.factors(group_norms(layer_sq, plan.group_of))
    param_factors = {n: factors[plan.group_of[n]] for n in trainable}
    clipped_sum = ghost.clipped_sums(ghost_ios, names, param_factors)
    clipped_sum |= {
        n: torch.tensordot(param_factors[n].to(g.dtype), g, dims=1) for n, g in psg.items()
    }
    kept = {}
    if "pre_clip" in keep:
        kept["pre_clip"] = psg
    if "post_clip" in keep:
        kept["post_clip"] = {n: clip(param_factors[n], g, None) for n, g in psg.items()}
    return BatchResult(
        layer_sq=layer_sq,
        total_sq=total_sq,
        factors=factors,
        param_factors=param_factors,
        clipped_sum={n: clipped_sum[n] for n in trainable},
        kept=kept,
    )
