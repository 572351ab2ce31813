"""One physical batch of a logical step: per-sample norms, clip factors, clipped sum.

Pure functions of the recorded layer calls (``per_sample.batch.LayerIO``) and the bound
clipping plan; ``DPEngine`` sums the results of the physical batches of one logical step
and adds the noise once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from privgrad import guards
from privgrad.clipping import ClipPlan, group_sq_sums
from privgrad.errors import TraceReleasedError
from privgrad.per_sample import chunks, ghost, stream
from privgrad.per_sample.batch import LayerIO, per_sample_grads
from privgrad.per_sample.capture import Call
from privgrad.trace import KEEPABLE, Segment, check_unchanged, clip


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
        recomputable: ``clipped_sum_again`` computes the clipped sum again cheaply and
            bit for bit from the recorded calls: they were split into book-kept and
            materialised calls (modes ``"auto"``/``"ghost"``, nothing kept) and CPU
            autocast was off.
        streamed: Index in the batch's recorded calls of the call whose per-sample
            gradients were streamed (``per_sample.stream``), or ``None``.
    """

    layer_sq: dict[str, torch.Tensor]
    total_sq: torch.Tensor
    factors: dict[str, torch.Tensor]
    param_factors: dict[str, torch.Tensor]
    clipped_sum: dict[str, torch.Tensor]
    kept: dict[str, dict[str, torch.Tensor]]
    recomputable: bool
    streamed: int | None = None


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
        keep: Per-sample gradients to return materialised (``"pre_clip"``, ``"post_clip"``);
            ``"clipped_sum"``: the step must hold the clipped sum (not ``recomputable``).
        reference: ``{name: autograd gradient of losses[:checked].sum()}`` to
            self-check against, or ``None``.
        checked: How many leading samples ``reference`` covers (``self_check_samples``;
            ``None``: all ``B``).

    Returns:
        The batch's ``BatchResult``.
    """
    B = batch_size
    materialize_all = mode in ("materialize", "vmap") or any(k in KEEPABLE for k in keep)
    ghost_ios, dense_ios = _split(ios, names, B, materialize_all)
    chosen = stream.choose(ghost_ios, B) if mode == "auto" else None
    streamed = None if chosen is None else ghost_ios.pop(chosen)
    if B > 0:
        psg = per_sample_grads(dense_ios, names, B)
    else:
        psg = {n: p.new_zeros(0, *p.shape) for n, p in trainable.items()}
    strategy = "measure" if mode == "auto" else "cost"
    layer_sq = ghost.squared_norms(ghost_ios, names, strategy)
    layer_sq |= {n: chunks.squared_norms(g) for n, g in psg.items()}
    streamed_sum, others = {}, {}
    if streamed is not None:  # last: every other norm is known
        own = _trainable_names(streamed, names)
        guards.check_complete(trainable, layer_sq | dict.fromkeys(own.values()))
        others = group_sq_sums({n: layer_sq[n] for n in trainable if n not in own.values()},
                               plan.group_of)
        streamed_sq, streamed_sum = _stream(streamed, own, others, plan, B)
        layer_sq |= streamed_sq
    guards.check_complete(trainable, layer_sq)
    layer_sq = {n: layer_sq[n] for n in trainable}
    group_sq = group_sq_sums(layer_sq, plan.group_of)
    if streamed is not None:  # the streamed call's groups exactly as its chunks had them
        mine = {n: layer_sq[n] for n in own.values()}
        group_sq |= _own_group_sq(mine, lambda g: others.get(g), plan)
    total_sq = _total_sq(layer_sq, group_sq, plan)
    guards.check_finite(total_sq, layer_sq)
    if reference is not None:
        k = B if checked is None else checked
        first = torch.arange(B, device=total_sq.device) < k  # all ones when k = B
        ones = {n: first.to(s.dtype) for n, s in layer_sq.items()}
        sums = {n: g[:k].sum(0, dtype=chunks.accumulation_dtype(g.dtype)) for n, g in psg.items()}
        book_kept = ghost_ios + ([] if streamed is None else [streamed])
        sums |= ghost.clipped_sums(book_kept, names, ones)
        guards.self_check(reference, sums, {n: s[:k].sqrt().sum() for n, s in layer_sq.items()},
                          self_check_rtol(ios, trainable))
    factors = plan.factors({g: s.sqrt() for g, s in group_sq.items()})
    param_factors = {n: factors[plan.group_of[n]] for n in trainable}
    clipped_sum = _clipped_sums(ghost_ios, psg, names, param_factors) | streamed_sum
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
        recomputable=not materialize_all and "clipped_sum" not in keep and not _cpu_autocast(),
        streamed=None if streamed is None else next(
            i for i, io in enumerate(ios) if io is streamed),
    )


def self_check_rtol(ios: Iterable[LayerIO], trainable: Mapping[str, nn.Parameter]) -> float:
    """Tolerance of the first step's checks against autograd: wider when 16-bit is involved.

    16-bit when a recorded layer ran in 16 bits (``LayerIO.half``: autocast) or a trained
    parameter is 16-bit (its autograd reference is rounded in 16 bits).
    """
    half = any(io.half for io in ios) or any(p.dtype in chunks.HALF for p in trainable.values())
    return 3e-2 if half else 1e-3


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


def _trainable_names(io: LayerIO, names: dict[int, str]) -> dict[str, str]:
    """``{attr: param name}`` of a rule call's trainable parameters."""
    return {a: names[id(p)] for a, p in io.call.unit.params.items() if p.requires_grad}


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


def _own_group_sq(
    own_sq: Mapping[str, torch.Tensor],
    others: Callable[[str], torch.Tensor | None],
    plan: ClipPlan,
) -> dict[str, torch.Tensor]:
    """``{group: (B,) squared norms}`` of the groups of the streamed call's parameters.

    Each group's squared norm is the other calls' sum (``others(group)``) plus the
    streamed call's own, in its order: elementwise, so a chunk's factors are exactly the
    corresponding slice of the batch's.
    """
    sq: dict[str, torch.Tensor] = {}
    for n, v in own_sq.items():
        g = plan.group_of[n]
        if g in sq:
            sq[g] = sq[g] + v
        else:
            base = others(g)
            sq[g] = v if base is None else base + v
    return sq


def _stream(
    io: LayerIO,
    own: dict[str, str],
    others: Mapping[str, torch.Tensor],
    plan: ClipPlan,
    batch_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Streams ``io`` (``per_sample.stream``) with factors from the other calls' norms.

    Args:
        io: The streamed call.
        own: ``{attr: param name}`` of its trainable parameters.
        others: ``{group: (B,)}`` the other parameters' squared norms summed per group
            (``clipping.group_sq_sums``).
        plan: The bound clipping plan.
        batch_size: ``B``.

    Returns:
        ``({name: (B,) squared norms}, {name: clipped sum})`` for ``own``'s parameters.
    """
    def factors_for(s: slice, chunk_sq: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mine = {n: chunk_sq[a] for a, n in own.items() if a in chunk_sq}  # own's order
        sq = _own_group_sq(mine, lambda g: others[g][s] if g in others else None, plan)
        groups = plan.factors({g: v.sqrt() for g, v in sq.items()})
        return {a: groups[plan.group_of[own[a]]] for a in chunk_sq}

    sq, sums = stream.run(io, batch_size, factors_for)
    return {own[a]: v for a, v in sq.items()}, {own[a]: v for a, v in sums.items()}


def _stream_again(
    io: LayerIO, names: dict[int, str], param_factors: Mapping[str, torch.Tensor],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """The streamed call's clipped sum with the batch's factors (``clipped_sum_again``)."""
    own = _trainable_names(io, names)
    _, sums = stream.run(io, batch_size, lambda s, sq: {a: param_factors[own[a]][s] for a in sq})
    return {own[a]: v for a, v in sums.items()}


def _split(
    ios: list[LayerIO], names: dict[int, str], batch_size: int, materialize_all: bool
) -> tuple[list[LayerIO], list[LayerIO]]:
    """``(book-kept calls, calls to materialise)``, for the step and ``clipped_sum_again``."""
    return ([], ios) if materialize_all else ghost.split(ios, names, batch_size)


def _clipped_sums(
    ghost_ios: list[LayerIO],
    psg: Mapping[str, torch.Tensor],
    names: dict[int, str],
    param_factors: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{param name: p.shape}``: book-kept calls by their rule, the others by a weighted sum.

    In ``chunks.accumulation_dtype`` of each parameter's per-sample values: float32 for
    16-bit ones (factors applied and products summed in float32), their own dtype
    otherwise.
    """
    out = ghost.clipped_sums(ghost_ios, names, param_factors)
    out |= {n: chunks.weighted_sum(param_factors[n], g) for n, g in psg.items()}
    return out


def clipped_sum_again(
    parts: Sequence[tuple[Segment, Mapping[str, torch.Tensor], int | None]],
    names: dict[int, str],
    trainable: Mapping[str, nn.Parameter],
    threads: int,
) -> dict[str, torch.Tensor]:
    """The clipped sum of a logical step, computed again from its recorded calls.

    Bit for bit what ``clip_batch`` returned and ``sum_fresh`` summed over the physical
    batches, for batches that were ``BatchResult.recomputable`` and retained:
    the same split, the same rules in the same order on the same ``A``, ``G`` and factors
    (a measured choice is remembered, so it is the same choice), CPU autocast off as it
    was at the step, and the step's number of CPU threads (a BLAS may split a reduction
    differently with another count). The engine writes the private gradient into the
    clipped sum's own tensors (``release``), and the trace asks for this.

    Args:
        parts: Per physical batch, its ``Segment`` (with ``ios``), its
            ``{param name: (size,)}`` factors and ``BatchResult.streamed``.
        names: ``id(parameter) -> name``.
        trainable: ``{name: parameter}`` trainable at the step, in order.
        threads: ``torch.get_num_threads()`` at the step.

    Returns:
        ``{param name: p.shape}``.

    Raises:
        TraceReleasedError: A recorded tensor was modified in place since the step, or a
            parameter was frozen or unfrozen since.
    """
    for seg, _, _ in parts:
        check_unchanged(seg)
    reached = {names[id(p)]: p for seg, _, _ in parts for io in seg.ios
               for p in io.call.unit.params.values()}
    changed = sorted(n for n, p in reached.items() if p.requires_grad != (n in trainable))
    if changed:
        raise TraceReleasedError(
            f"privgrad: parameter {changed[0]!r} was frozen or unfrozen since this step, so its "
            "clipped sum can no longer be computed again from the recorded layer calls. Fix: "
            "read trace.clipped_sum / trace.private_grad before changing requires_grad, or "
            "take the step with keep='clipped_sum' to hold it."
        )
    sums = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for seg, param_factors, streamed in parts:
            with torch.autocast("cpu", enabled=False):  # as at the step (recomputable)
                ghost_ios, dense_ios = _split(seg.ios, names, seg.size, False)
                psg = per_sample_grads(dense_ios, names, seg.size, None, seg.snapshot)
                last = None if streamed is None else seg.ios[streamed]
                ghost_ios = [io for io in ghost_ios if io is not last]
                part = _clipped_sums(ghost_ios, psg, names, param_factors)
                if last is not None:
                    part |= _stream_again(last, names, param_factors, seg.size)
                sums.append(part)
    finally:
        torch.set_num_threads(before)
    return {n: sum_fresh(s[n] for s in sums) for n in trainable}


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def sum_fresh(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of fresh tensors (one physical batch: that batch's own tensor, no copy)."""
    first, *rest = tensors
    if not rest:
        return first
    total = first.clone()
    for t in rest:
        total += t
    return total
