"""From recorded calls to per-sample gradients of every trainable parameter.

``output_grads`` runs the one backward pass privgrad needs: the gradient of the summed
per-sample losses with respect to each recorded layer output (never the ordinary weight
gradients). ``per_sample_grads`` turns those into per-sample parameter gradients, using
each unit's rule or the functional fallback, and sums the contributions of tied
parameters and of modules called several times.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from privgrad.errors import InvalidLossError
from privgrad.per_sample import functional
from privgrad.per_sample.capture import Call


@dataclass(frozen=True)
class LayerIO:
    """A recorded call together with the gradient of the summed loss at its outputs.

    Attributes:
        call: The call (inputs ``A`` and output shapes).
        grads: One entry per output leaf: ``G``, or ``None`` if it did not reach the loss.
        half: Whether the layer ran in 16-bit precision (e.g. under ``torch.autocast``).
    """

    call: Call
    grads: list[torch.Tensor | None]
    half: bool = False

    @property
    def A(self) -> torch.Tensor:
        """The layer input of a rule unit, shape ``(B, ...)``."""
        return self.call.args[0]

    @property
    def G(self) -> torch.Tensor:
        """The output gradient of a rule unit, shape ``(B, ...)``."""
        return self.grads[0]


def output_grads(losses: torch.Tensor, calls: list[Call]) -> list[LayerIO]:
    """Gradient of ``losses.sum()`` at every recorded output.

    Args:
        losses: Per-sample losses, shape ``(B,)``.
        calls: Recorded calls; those not connected to ``losses`` are dropped.

    Returns:
        One ``LayerIO`` per call that reached the loss, in call order.
    """
    flat = [(c, k, e) for c in calls for k, e in enumerate(c.edges) if e is not None]
    if not flat:
        return []
    grads = torch.autograd.grad(losses.sum(), [e for _, _, e in flat], allow_unused=True)
    per_call: dict[int, list[torch.Tensor | None]] = {}
    for (c, k, _), g in zip(flat, grads, strict=True):
        per_call.setdefault(id(c), [None] * len(c.edges))[k] = g
    out = []
    for c in calls:
        gs = per_call.get(id(c))
        if gs is not None and any(g is not None for g in gs):
            out.append(_common_dtype(c, gs) if c.unit.rule is not None else LayerIO(c, gs))
    return out


def _common_dtype(call: Call, grads: list[torch.Tensor | None]) -> LayerIO:
    """Brings a rule call's ``A`` and ``G`` to one floating dtype (autocast mixes them).

    Under ``torch.autocast`` a Linear's input may be float32 while its output gradient is
    bfloat16; the per-sample gradient is computed in the widest of the two and of the
    layer's parameters, which is also the dtype of ``p.grad``.
    """
    A, G = call.args[0], grads[0]
    if G is None:
        return LayerIO(call, grads)
    half = any(t.dtype in _HALF for t in (A, G))
    dtype = G.dtype
    for t in (A, *call.unit.params.values()):
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    if G.dtype != dtype:
        grads = [G.to(dtype), *grads[1:]]
    if A.is_floating_point() and A.dtype != dtype:
        call = replace(call, args=(A.to(dtype),))
    return LayerIO(call, grads, half)


_HALF = (torch.float16, torch.bfloat16)


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


def per_sample_grads(
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
            grads = functional.per_sample_grads(io.call, io.grads, batch_size, samples, at_step)
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
