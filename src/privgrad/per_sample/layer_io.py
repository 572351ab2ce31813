"""From recorded calls to per-sample gradients of every trainable parameter.

``output_grads`` runs the one backward pass privgrad needs: the gradient of the summed
per-sample losses with respect to each recorded layer output (never the ordinary weight
gradients), preceded, on a batch layout not seen before, by one pass with weighted losses
that verifies which axis of each output is the batch (``layout``). ``per_sample_grads``
turns those into per-sample parameter gradients, using each unit's rule or the functional
fallback, and sums the contributions of tied parameters and of modules called several
times.

A call's outputs may be computed from one another (``nn.LSTMCell``'s ``h`` from ``c``, a
module returning ``(y, f(y))`` or ``(y, y)``): the gradient at each is autograd's total,
so the same tensor returned twice keeps one gradient, and the outputs others are computed
from are marked (``LayerIO.sources``) for the functional re-run to count each path once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.autograd.graph import GradientEdge

from privgrad.errors import InvalidLossError
from privgrad.per_sample import functional, layout
from privgrad.per_sample.capture import Call
from privgrad.per_sample.chunks import HALF


@dataclass(frozen=True)
class LayerIO:
    """A recorded call together with the gradient of the summed loss at its outputs.

    Attributes:
        call: The call (inputs ``A`` and output shapes).
        grads: One entry per output leaf: ``G``, or ``None`` if it did not reach the loss
            (or repeats an earlier leaf's tensor: one value, counted once).
        half: Whether the layer ran in 16-bit precision (e.g. under ``torch.autocast``).
        batch_dims: Per output leaf, the axes along which the losses see it per sample
            (``layout.valid_dims``); ``None`` for one sample.
        sources: Output leaves that other outputs of the same call are computed from
            (``c`` of ``nn.LSTMCell``, whose ``h = o·tanh(c)``); their ``G`` includes the
            paths through those outputs (``functional`` accounts for it).
    """

    call: Call
    grads: list[torch.Tensor | None]
    half: bool = False
    batch_dims: layout.Dims | None = None
    sources: frozenset[int] = frozenset()

    @property
    def A(self) -> torch.Tensor:
        """The layer input of a rule unit, shape ``(B, ...)``."""
        return self.call.args[0]

    @property
    def G(self) -> torch.Tensor:
        """The output gradient of a rule unit, shape ``(B, ...)``."""
        return self.grads[0]


def output_grads(
    losses: torch.Tensor, calls: list[Call], verified: layout.Verified | None = None
) -> list[LayerIO]:
    """Gradient of ``losses.sum()`` at every recorded output, with the batch axes checked.

    On a batch whose layout ``verified`` has not seen, one more backward pass with a
    distinct weight per loss comes first (``layout``): it refuses a rule call whose rows
    are not its samples and gives the functional fallback the axes it may split along.
    The pass for ``G`` comes last and frees the graph, as the one pass did before.

    Args:
        losses: Per-sample losses, shape ``(B,)``.
        calls: Recorded calls; those not connected to ``losses`` are dropped.
        verified: The layouts already checked (an engine's own); ``None`` checks every call.

    Returns:
        One ``LayerIO`` per call that reached the loss, in call order.

    Raises:
        UnsupportedModelError: A rule call's dim 0 is not the batch (names the module).
    """
    B = losses.shape[0]
    verified = layout.Verified() if verified is None else verified
    leaves = {id(c): _distinct_edges(c) for c in calls}
    flat = [(c, k, e) for c in calls for k, e in leaves[id(c)]]
    if not flat:
        return []
    keys = {id(c): layout.layout_key(c, B) for c in calls} if B > 1 else {}
    unchecked = [c for c in calls if B > 1 and verified.get(keys[id(c)]) is None]
    weighted = torch.autograd.grad(
        losses, [e for _, _, e in flat], grad_outputs=layout.sample_weights(B, losses),
        retain_graph=True, allow_unused=True) if unchecked else ()
    grads = torch.autograd.grad(losses.sum(), [e for _, _, e in flat], allow_unused=True)
    per_call: dict[int, list[torch.Tensor | None]] = {}
    gw: dict[int, dict[int, torch.Tensor | None]] = {}
    for n, ((c, k, _), g) in enumerate(zip(flat, grads, strict=True)):
        per_call.setdefault(id(c), [None] * len(c.edges))[k] = g
        if weighted:
            gw.setdefault(id(c), {})[k] = weighted[n]
    fresh = _check_layouts(losses, unchecked, per_call, gw, keys, verified) if unchecked else {}
    out = []
    for c in calls:
        gs = per_call.get(id(c))
        if gs is not None and any(g is not None for g in gs):
            dims = fresh.get(id(c)) or (verified.get(keys[id(c)]) if B > 1 else None)
            if c.unit.rule is not None:
                out.append(_common_dtype(c, gs, dims))
            else:
                out.append(LayerIO(c, gs, batch_dims=dims, sources=_sources(leaves[id(c)])))
    return out


def _distinct_edges(call: Call) -> list[tuple[int, GradientEdge]]:
    """``(leaf index, edge)`` of the outputs that carry a gradient, each edge once.

    A module returning the same tensor twice (``(y, y)``) has one output value: were both
    leaves given the gradient at it, the functional re-run would count it twice.
    """
    seen: set[tuple[object, int]] = set()
    out = []
    for k, e in enumerate(call.edges):
        if e is not None and (e.node, e.output_nr) not in seen:
            seen.add((e.node, e.output_nr))
            out.append((k, e))
    return out


def _sources(leaves: list[tuple[int, GradientEdge]]) -> frozenset[int]:
    """The output leaves of one call that another of its outputs is computed from.

    Autograd's gradient at such a leaf ``k`` is total: it includes the paths through the
    outputs computed from it (``dL/dc`` of ``nn.LSTMCell`` includes the path through
    ``h = o·tanh(c)``), which the functional re-run would count again when it
    differentiates ``⟨h, G_h⟩``. Found by walking the graph back from each output; a node
    created before the earliest output looked for cannot lie on a path to it (autograd
    numbers nodes in creation order), so the walk stays inside the module's forward.
    """
    if len(leaves) < 2:
        return frozenset()
    seq = {k: e.node._sequence_nr() for k, e in leaves}
    found: set[int] = set()
    for j, e in leaves:
        targets = {(t.node, t.output_nr): k for k, t in leaves
                   if k != j and k not in found and seq[k] <= seq[j]}
        if targets:
            found |= _reached(e.node, targets, min(seq[k] for k in targets.values()))
    return frozenset(found)


def _reached(start: object, targets: dict[tuple[object, int], int], floor: int) -> set[int]:
    """The ``targets`` values whose edge some path from ``start`` goes through."""
    hit: set[int] = set()
    seen, stack = {start}, [start]
    while stack:
        for nxt, nr in stack.pop().next_functions:
            if nxt is None:
                continue
            k = targets.get((nxt, nr))
            if k is not None:
                hit.add(k)
            if nxt not in seen and nxt._sequence_nr() >= floor:
                seen.add(nxt)
                stack.append(nxt)
    return hit


def _check_layouts(
    losses: torch.Tensor,
    calls: list[Call],
    per_call: dict[int, list[torch.Tensor | None]],
    weighted: dict[int, dict[int, torch.Tensor | None]],
    keys: dict[int, object],
    verified: layout.Verified,
) -> dict[int, layout.Dims]:
    """Valid batch axes of each call's outputs, from the weighted-loss gradients.

    Refuses a rule call whose dim 0 is not valid; records informative results in
    ``verified``. Returns ``{id(call): dims}`` for the calls checked.
    """
    B = losses.shape[0]
    w = layout.sample_weights(B, losses)
    fresh: dict[int, layout.Dims] = {}
    for c in calls:
        gs, gw = per_call.get(id(c)), weighted.get(id(c), {})
        if gs is None or not any(g is not None for g in gs):
            continue
        half = any(g is not None and g.dtype in HALF for g in gs) or (
            c.unit.rule is not None and c.args[0].dtype in HALF)
        dims = tuple(
            None if gs[k] is None or gw.get(k) is None
            else layout.valid_dims(gs[k], gw[k], w, B, half)
            for k in range(len(gs)))
        if c.unit.rule is not None:
            layout.check_rule_call(c, dims, B)
        fresh[id(c)] = dims
        if layout.informative(gs):
            verified.add(keys[id(c)], dims)
    return fresh


def _common_dtype(
    call: Call, grads: list[torch.Tensor | None], dims: layout.Dims | None = None
) -> LayerIO:
    """Brings a rule call's ``A`` and ``G`` to one floating dtype (autocast mixes them).

    Under ``torch.autocast`` a Linear's input may be float32 while its output gradient is
    bfloat16; the per-sample gradient is computed in the widest of the two and of the
    layer's parameters, which is also the dtype of ``p.grad``.
    """
    A, G = call.args[0], grads[0]
    if G is None:
        return LayerIO(call, grads, batch_dims=dims)
    half = any(t.dtype in HALF for t in (A, G))
    dtype = G.dtype
    for t in (A, *call.unit.params.values()):
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    if G.dtype != dtype:
        grads = [G.to(dtype), *grads[1:]]
    if A.is_floating_point() and A.dtype != dtype:
        call = replace(call, args=(A.to(dtype),))
    return LayerIO(call, grads, half, dims)



def check_batch_sizes(ios: list[LayerIO], batch_size: int) -> None:
    """Raises if a layer saw a batch size other than the number of losses."""
    for io in ios:
        if io.call.unit.rule is None:
            continue
        if io.A.shape[0] != batch_size:
            raise InvalidLossError(
                f"privgrad: module '{io.call.unit.path}' ({type(io.call.unit.module).__name__}) "
                f"received a batch of {io.A.shape[0]} samples along dim 0, but the losses have "
                f"{batch_size} entries. Per-sample gradients need the batch on dim 0 of every "
                "layer input and one loss per sample. Fix: use batch-first inputs and pass "
                "losses of shape (B,), e.g. F.cross_entropy(out, y, reduction='none'); if "
                "this layer's input is shared by all samples (positions torch.arange(T)), "
                "give it the batch dimension: layer(torch.arange(T).expand(B, T))."
            )


def materialize(
    ios: list[LayerIO],
    names: dict[int, str],
    batch_size: int,
    samples: torch.Tensor | None = None,
    snapshot: dict[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every parameter reached by the recorded calls.

    Args:
        ios: Calls with their output gradients.
        names: ``id(parameter) -> name`` as in ``model.named_parameters()``.
        batch_size: ``B``.
        samples: Optional indices ``(k,)``: compute only those samples.
        snapshot: ``id(parameter) -> value at the step`` for the parameters of functional
            units (their per-sample gradients depend on the weights; an optimizer step
            changes those in place). Default: the current values.

    Returns:
        ``{parameter name: (B or k, *shape)}``; tied parameters and repeated calls are summed.
    """
    out: dict[str, torch.Tensor] = {}
    for io in ios:
        unit = io.call.unit
        if unit.rule is not None:
            A, G = io.A, io.G
            if samples is not None:
                at = samples.to(A.device)
                A, G = A.index_select(0, at), G.index_select(0, at)
            grads = unit.rule.per_sample_grads(unit.module, A, G)
        else:
            at_step = None if snapshot is None else {
                rel: snapshot.get(id(p), p) for rel, p in unit.params.items()
            }
            grads = functional.grads(io.call, io.grads, batch_size, samples, at_step,
                                                io.batch_dims, io.sources)
        for rel, g in grads.items():
            p = unit.params.get(rel)
            if p is None or not p.requires_grad:
                continue
            name = names[id(p)]
            out[name] = out[name] + g if name in out else g
    return out


def functional_snapshot(ios: list[LayerIO]) -> dict[int, torch.Tensor]:
    """Copies of the parameters that functional units' per-sample gradients depend on."""
    return {
        id(p): p.detach().clone()
        for io in ios if io.call.unit.rule is None
        for p in io.call.unit.params.values()
    }


def _tensors(tree: object) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (cheaper than ``tree_flatten``)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for leaf in tree:
            yield from _tensors(leaf)
    elif isinstance(tree, dict):
        for leaf in tree.values():
            yield from _tensors(leaf)


def recorded_tensors(ios: list[LayerIO]) -> list[torch.Tensor]:
    """Every tensor a trace relies on.

    The calls' inputs and output gradients, and the buffers of functional units (their
    forward runs again and reads them).
    """
    return [t for io in ios for t in (
        *_tensors((io.call.args, io.call.kwargs, io.grads)),
        *(io.call.unit.module.buffers() if io.call.unit.rule is None else ()))]


def versions(ios: list[LayerIO]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per call, ``(memory address, in-place version)`` of each of its recorded tensors.

    ``Tensor._version`` (private in PyTorch, the counter autograd uses for the same
    check) counts in-place changes of a tensor and of every view of its memory; the
    address catches a buffer replaced by another tensor (0 for tensors without a single
    storage, such as sparse ones). Inference tensors have no counter and are skipped.
    """
    return tuple(tuple((t.data_ptr() if t.layout == torch.strided else 0, t._version)
                       for t in recorded_tensors([io]) if not t.is_inference()) for io in ios)


def first_modified(
    ios: list[LayerIO], recorded: tuple[tuple[tuple[int, int], ...], ...]
) -> LayerIO | None:
    """The first call whose recorded tensors changed in place since ``versions`` was taken.

    ``recorded`` empty: nothing was taken, so nothing is checked.
    """
    if not recorded:
        return None
    return next((io for io, was in zip(ios, recorded, strict=True)
                 if versions([io])[0] != was), None)
