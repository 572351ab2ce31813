"""Which axis of a functional call's inputs and outputs holds the samples, and the re-run.

``forward`` re-runs a module's own ``forward`` with given parameter values (no hooks of the
module itself). ``input_batch_dims`` finds each input's batch axis from the module's
convention for the argument it was passed as and from shapes, resolving ambiguous ones by
running samples alone; ``output_batch_dims`` finds each output's by running sample 0 alone.
Whether the losses see the outputs per sample along those axes is ``layout``'s check.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from privgrad.errors import UnsupportedModelError
from privgrad.per_sample.capture import Call, suspended
from privgrad.per_sample.chunks import HALF

_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[set, set[int]]]] = (
    weakref.WeakKeyDictionary()
)  # module -> {input signature: ({(leaf, shape) known shared}, {leaf known per-sample})}


class _Forward(nn.Module):
    """Calls ``inner.forward`` directly: the re-run skips the inner module's own hooks.

    The recorded inputs are those the forward received, after every forward pre-hook
    ran, and the recorded output is the forward's own (capture's hook runs before any
    other forward hook). Running the hooks again would apply a pre-hook twice (a
    pre-hook doubling the input gave per-sample gradients off by 97%).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)


def forward(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """``module.forward(*args, **kwargs)`` with ``params`` in place of its parameters.

    A temporary wrapper holds the module (nothing is set on the module itself), so
    ``functional_call`` substitutes the parameters without running the module's hooks;
    hooks of its submodules run as they did in the recorded forward.
    """
    return functional_call(_Forward(module), {f"inner.{n}": p for n, p in params.items()},
                           args, kwargs)


def _candidate_dims(module: nn.Module, call: Call, leaves: list[Any], B: int) -> list[int | None]:
    """Batch axis of each input leaf by shape (``None``: certainly shared by all samples).

    The axis comes from what the module declares (``batch_first``) and from the forward
    argument the leaf was passed as, positionally or by keyword: ``nn.MultiheadAttention``
    with ``batch_first=False`` has its batch on dim 1 of ``query``/``key``/``value`` but on
    dim 0 of ``key_padding_mask``; an RNN's ``hx`` has it on dim 1.
    """
    names = _leaf_names(module, call)
    dims: list[int | None] = []
    for x, (name, positional) in zip(leaves, names, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            dims.append(None)
            continue
        d = _declared_dim(module, name, positional, x)
        dims.append(d if d is not None and x.dim() > d and x.shape[d] == B else None)
    return dims


def _leaf_names(module: nn.Module, call: Call) -> list[tuple[str | None, bool]]:
    """``(forward argument, passed positionally)`` of each input leaf (``tree_flatten`` order)."""
    try:
        sig = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        sig = []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in sig if p.kind in kinds]
    names: list[tuple[str | None, bool]] = []
    for i, a in enumerate(call.args):
        name = positional[i] if i < len(positional) else None
        names += [(name, True)] * len(tree_flatten(a)[0])
    for key, v in call.kwargs.items():
        names += [(key, False)] * len(tree_flatten(v)[0])
    return names


_SEQUENCE = {"query", "key", "value"}


def _declared_dim(module: nn.Module, name: str | None, positional: bool,
                  x: torch.Tensor) -> int | None:
    """The batch axis of an input passed as ``name``, by the module's own convention."""
    seq_first = getattr(module, "batch_first", True) is False
    if isinstance(module, nn.MultiheadAttention):
        if name in _SEQUENCE:
            return (1 if seq_first else 0) if x.dim() == 3 else None
        if name == "key_padding_mask":
            return 0 if x.dim() == 2 else None
        if name == "attn_mask":  # (L, S) shared; (B·heads, L, S) per sample only for 1 head
            return 0 if x.dim() == 3 and module.num_heads == 1 else None
        return 0
    if isinstance(module, nn.RNNBase):
        if name == "hx":  # (layers, B, H); (layers, H) is unbatched
            return 1 if x.dim() == 3 else None
        return (1 if seq_first else 0) if x.dim() == 3 else None  # (T, H) is unbatched
    return 1 if seq_first and positional and x.dim() == 3 else 0  # (T, B, E) positionally


def _signature(leaves: list[Any]) -> tuple:
    return tuple(x.dim() if isinstance(x, torch.Tensor) else None for x in leaves)


def input_batch_dims(
    module: nn.Module, params: dict, call: Call, leaves: list[Any], spec: Any, B: int
) -> list[int | None]:
    """Batch axis of each input leaf; ambiguous leaves are resolved by a probe."""
    dims = _candidate_dims(module, call, leaves, B)
    shared, batched = _KNOWN.setdefault(module, {}).setdefault(_signature(leaves), (set(), set()))
    dims = [None if (k, _shape(leaves[k])) in shared else d for k, d in enumerate(dims)]
    cands = [k for k, d in enumerate(dims) if d is not None]
    unknown = [k for k in cands if k not in batched]
    if B > 1 and len(cands) > 1 and unknown:
        found = _probe_shared(module, params, leaves, dims, unknown, spec, B)
        shared.update((k, _shape(leaves[k])) for k in found)
        batched.update(k for k in cands if k not in found)
        dims = [None if k in found else d for k, d in enumerate(dims)]
    return dims


def _shape(x: Any) -> tuple | None:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _probe_shared(
    module: nn.Module, params: dict, leaves: list[Any], dims: list[int | None],
    unknown: list[int], spec: Any, B: int,
) -> frozenset[int]:
    """The smallest set of ``unknown`` leaves that must be shared for the forward to split."""
    n_cands = sum(d is not None for d in dims)
    with torch.no_grad(), suspended():
        args, kwargs = tree_unflatten(leaves, spec)
        full = tree_flatten(forward(module, params, args, kwargs))[0]
        subsets = itertools.chain.from_iterable(
            itertools.combinations(unknown, r) for r in range(min(len(unknown), 3) + 1)
        )
        for subset in subsets:
            if len(subset) == n_cands:
                continue  # at least one input must be per-sample
            trial = [None if k in subset else d for k, d in enumerate(dims)]
            if all(_splits(module, params, leaves, trial, spec, full, B, i) for i in (0, B - 1)):
                return frozenset(subset)
    raise UnsupportedModelError(
        f"privgrad: cannot tell which inputs of {type(module).__name__} are per-sample: "
        "running a sample alone does not reproduce the batched output for any choice of "
        f"shared inputs (input leaves {unknown} have the batch size {B} on their batch "
        "axis). Either the module mixes samples (not allowed in DP-SGD) or it is "
        "nondeterministic. Fix: make it per-sample and deterministic, or register a "
        "per-sample rule for it (privgrad.per_sample.registry)."
    )


def _splits(
    module: nn.Module, params: dict, leaves: list[Any], dims: list[int | None], spec: Any,
    full: list[Any], B: int, i: int,
) -> bool:
    """Whether running sample ``i`` alone under ``dims`` matches the batched outputs."""
    try:
        args, kwargs = tree_unflatten(narrow(leaves, dims, i), spec)
        one = tree_flatten(forward(module, params, args, kwargs))[0]
    except (RuntimeError, ValueError, IndexError, AssertionError):
        return False
    for f, o in zip(full, one, strict=True):
        if not isinstance(f, torch.Tensor) or f.dim() == 0:
            continue
        d = next((k for k, (a, b) in enumerate(zip(f.shape, o.shape, strict=False))
                  if a == B and b == 1), None)
        if d is None or f.dim() != o.dim():
            return False
        ref = f.narrow(d, i, 1)
        if ref.shape != o.shape or not ref.is_floating_point():
            if not torch.equal(ref, o):
                return False
            continue
        tol = 1e-3 if ref.dtype in (*HALF, torch.float32) else 1e-7
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if not torch.allclose(ref, o, rtol=tol, atol=tol * max(scale, 1e-6)):
            return False
    return True


def narrow(leaves: list[Any], dims: list[int | None], i: int) -> list[Any]:
    """Sample ``i`` of each leaf along its batch axis, kept as a batch of one."""
    return [x if d is None else x.narrow(d, i, 1) for x, d in zip(leaves, dims, strict=True)]


def output_batch_dims(
    module: nn.Module, params: dict, in_leaves: list, in_dims: list, spec: Any,
    out_shapes: list[torch.Size | None], B: int,
) -> list[int | None]:
    """Finds each output's batch axis by running the module on sample 0 alone."""
    args, kwargs = tree_unflatten(narrow(in_leaves, in_dims, 0), spec)
    with torch.no_grad(), suspended():
        probe = tree_flatten(forward(module, params, args, kwargs))[0]
    dims: list[int | None] = []
    for full, one in zip(out_shapes, probe, strict=True):
        d = None
        if full is not None and len(full) > 0:
            for k, (a, b) in enumerate(zip(full, one.shape, strict=True)):
                if a == B and b == 1:
                    d = k
                    break
        dims.append(d)
    return dims
