"""Generic per-sample gradients with ``torch.func``: the fallback for any module.

For a recorded call ``y = f(θ, x)`` with output gradient ``G``, sample ``i``'s gradient
is ``∇_θ ⟨f(θ, x_i), G_i⟩`` where ``x_i`` keeps a batch axis of size 1. It is computed
with ``vmap(grad(...))`` over the batch; modules that ``vmap`` cannot batch (``nn.GRU``,
``nn.MultiheadAttention`` in current PyTorch) fall back, with one warning, to a loop of
per-sample backward passes — slow but exact.

This is valid only for modules that treat samples independently: validate.py rejects
the known sample-mixing layers, and ``DPEngine``'s first-step self-check catches others.

Which inputs carry the batch: an input whose batch axis does not have size ``B`` is shared
by all samples. When several inputs do have size ``B`` there (``q, k, v`` of attention, or
a ``(T, D)`` position table with ``T == B``), the split is confirmed once per module by
running samples alone and comparing with the batched forward; a shared input is never
sliced by accident.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from privgrad.errors import InvalidLossError, UnsupportedModelError
from privgrad.per_sample.capture import Call, suspended

_WARNED: set[type] = set()
_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[set, set[int]]]] = (
    weakref.WeakKeyDictionary()
)  # module -> {input signature: ({(leaf, shape) known shared}, {leaf known per-sample})}


def _candidate_dims(module: nn.Module, call: Call, leaves: list[Any], B: int) -> list[int | None]:
    """Batch axis of each input leaf by shape (``None``: certainly shared by all samples)."""
    first = 1 if getattr(module, "batch_first", True) is False else 0
    dims: list[int | None] = []
    n_pos = len(tree_flatten(call.args)[0])
    is_rnn = isinstance(module, nn.RNNBase)
    for k, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            dims.append(None)
            continue
        hidden = is_rnn and 0 < k < n_pos  # hx / (h0, c0): (layers, B, H)
        seq_first = k < n_pos and first == 1 and x.dim() == 3  # (T, B, E)
        d = 1 if hidden or seq_first else 0
        dims.append(d if x.dim() > d and x.shape[d] == B else None)
    return dims


def _signature(leaves: list[Any]) -> tuple:
    return tuple(x.dim() if isinstance(x, torch.Tensor) else None for x in leaves)


def _input_batch_dims(
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
        full = tree_flatten(functional_call(module, params, args, kwargs))[0]
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
        args, kwargs = tree_unflatten(_narrow(leaves, dims, i), spec)
        one = tree_flatten(functional_call(module, params, args, kwargs))[0]
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
        tol = 1e-3 if ref.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-7
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if not torch.allclose(ref, o, rtol=tol, atol=tol * max(scale, 1e-6)):
            return False
    return True


def _narrow(leaves: list[Any], dims: list[int | None], i: int) -> list[Any]:
    return [x if d is None else x.narrow(d, i, 1) for x, d in zip(leaves, dims, strict=True)]


def _check_no_randomness(path: str, module: nn.Module) -> None:
    for name, sub in module.named_modules():
        is_dropout = isinstance(sub, nn.modules.dropout._DropoutNd)
        p = sub.p if is_dropout else getattr(sub, "dropout", None)
        if sub.training and isinstance(p, float) and p > 0:
            where = f"{path}.{name}" if name else path
            raise UnsupportedModelError(
                f"privgrad: module '{where}' ({type(sub).__name__}) applies dropout (p={p}) "
                "inside a module whose per-sample gradients are computed by re-running its "
                "forward (no per-sample rule is registered for it). The re-run would draw a "
                "different dropout mask, so the gradients would be wrong. Fix: set its "
                "dropout to 0 (e.g. nn.MultiheadAttention(..., dropout=0.0)) and apply "
                "nn.Dropout outside it, or call model.eval() for this module."
            )


def _output_batch_dims(
    module: nn.Module, params: dict, in_leaves: list, in_dims: list, spec: Any,
    out_shapes: list[torch.Size | None], B: int,
) -> list[int | None]:
    """Finds each output's batch axis by running the module on sample 0 alone."""
    args, kwargs = tree_unflatten(_narrow(in_leaves, in_dims, 0), spec)
    with torch.no_grad(), suspended():
        probe = tree_flatten(functional_call(module, params, args, kwargs))[0]
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


def per_sample_grads(
    call: Call,
    grad_outputs: list[torch.Tensor | None],
    batch_size: int,
    samples: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every parameter claimed by a functional unit.

    Args:
        call: A recorded call of the unit.
        grad_outputs: Gradient of the summed loss w.r.t. each leaf of the call's output
            (``tree_flatten`` order), ``None`` where the output did not reach the loss.
        batch_size: ``B``, the number of samples in the call.
        samples: Optional indices, shape ``(k,)``: only those samples are computed.
        params: The parameter values the call ran with, by name relative to the module
            (default: the module's current parameters).

    Returns:
        ``{name relative to the module: (B or k, *param.shape)}``.
    """
    unit, module = call.unit, call.unit.module
    _check_no_randomness(unit.path or "<model>", module)
    source = unit.params if params is None else params
    params = {n: p.detach() for n, p in source.items()}
    in_leaves, spec = tree_flatten((call.args, call.kwargs))
    B = batch_size
    used_all = [k for k, g in enumerate(grad_outputs) if g is not None]
    if B == 1:  # the call's whole gradient is sample 0's: no batch axis needed
        with suspended():
            one = _whole(module, params, in_leaves, spec, grad_outputs, used_all)
        k = 1 if samples is None else len(samples)
        return {n: g.expand(k, *g.shape[1:]).clone() for n, g in one.items()}
    in_dims = _input_batch_dims(module, params, call, in_leaves, spec, B)
    if all(d is None for d in in_dims):
        raise InvalidLossError(
            f"privgrad: no input of module '{unit.path}' ({type(module).__name__}) has the "
            f"batch size {B} of the losses along its batch axis. Fix: pass one loss per "
            "sample, shape (B,), e.g. reduce a (T, B) loss of a sequence-first model with "
            "losses.sum(0)."
        )
    out_dims = _output_batch_dims(module, params, in_leaves, in_dims, spec, call.out_shapes, B)
    used = [
        k for k, (g, d) in enumerate(zip(grad_outputs, out_dims, strict=True))
        if g is not None and d is not None
    ]
    if samples is not None:
        in_leaves = [x if d is None else x.index_select(d, samples.to(x.device))
                     for x, d in zip(in_leaves, in_dims, strict=True)]
        grad_outputs = [g if g is None or out_dims[k] is None
                        else g.index_select(out_dims[k], samples.to(g.device))
                        for k, g in enumerate(grad_outputs)]
        B = len(samples)
    if B == 0:
        return {n: p.new_zeros(0, *p.shape) for n, p in params.items()}
    with suspended():
        try:
            return _vmapped(module, params, in_leaves, in_dims, spec, grad_outputs, out_dims, used)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if type(module) not in _WARNED:
                _WARNED.add(type(module))
                warnings.warn(
                    f"privgrad: torch.func.vmap cannot batch {type(module).__name__} "
                    f"('{unit.path}'): {str(e).splitlines()[0][:160]}. Falling back to a "
                    "per-sample loop (exact, slower).",
                    stacklevel=3,
                )
            return _looped(module, params, in_leaves, in_dims, spec, grad_outputs,
                           out_dims, used, B)


def _vmapped(module, params, in_leaves, in_dims, spec, grad_outputs, out_dims, used):  # noqa: ANN001, ANN202
    tensor_pos = [k for k, d in enumerate(in_dims) if d is not None]
    g_used = [grad_outputs[k] for k in used]

    def sample_loss(p, batched, gs):  # noqa: ANN001, ANN202
        leaves = list(in_leaves)
        for k, x in zip(tensor_pos, batched, strict=True):
            leaves[k] = x.unsqueeze(in_dims[k])
        args, kwargs = tree_unflatten(leaves, spec)
        outs = tree_flatten(functional_call(module, p, args, kwargs))[0]
        total = 0.0
        for k, g in zip(used, gs, strict=True):
            total = total + (outs[k] * g.unsqueeze(out_dims[k])).sum()
        return total

    batched = [in_leaves[k] for k in tensor_pos]
    return vmap(
        grad(sample_loss),
        in_dims=(None, [in_dims[k] for k in tensor_pos], [out_dims[k] for k in used]),
    )(params, batched, g_used)


def _whole(module, params, in_leaves, spec, grad_outputs, used):  # noqa: ANN001, ANN202
    """Gradient of the whole call, as the single sample's gradient ``(1, *shape)``."""
    names = list(params)
    leaf_params = {n: p.detach().requires_grad_() for n, p in params.items()}
    args, kwargs = tree_unflatten(in_leaves, spec)
    with torch.enable_grad():
        outs = tree_flatten(functional_call(module, leaf_params, args, kwargs))[0]
        grads = torch.autograd.grad(
            [outs[k] for k in used], [leaf_params[n] for n in names],
            [grad_outputs[k] for k in used], allow_unused=True,
        )
    return {n: (torch.zeros_like(params[n]) if g is None else g).unsqueeze(0)
            for n, g in zip(names, grads, strict=True)}


def _looped(module, params, in_leaves, in_dims, spec, grad_outputs, out_dims, used, B):  # noqa: ANN001, ANN202
    names = list(params)
    leaf_params = {n: p.detach().requires_grad_() for n, p in params.items()}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(B):
        args, kwargs = tree_unflatten(_narrow(in_leaves, in_dims, i), spec)
        with torch.enable_grad():
            outs = tree_flatten(functional_call(module, leaf_params, args, kwargs))[0]
            grads = torch.autograd.grad(
                [outs[k] for k in used],
                [leaf_params[n] for n in names],
                [grad_outputs[k].narrow(out_dims[k], i, 1) for k in used],
                allow_unused=True,
            )
        for n, g in zip(names, grads, strict=True):
            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}
