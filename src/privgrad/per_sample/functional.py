"""Generic per-sample gradients with ``torch.func``: the fallback for any module.

For a recorded call ``y = f(θ, x)`` with output gradient ``G``, sample ``i``'s gradient
is ``∇_θ ⟨f(θ, x_i), G_i⟩`` where ``x_i`` keeps a batch axis of size 1. It is computed
with ``vmap(grad(...))`` over the batch; modules that ``vmap`` cannot batch (``nn.GRU``,
``nn.MultiheadAttention`` in current PyTorch) fall back, with one warning, to a loop of
per-sample backward passes — slow but exact.

This is valid only for modules that treat samples independently: validate.py rejects
the known sample-mixing layers, and ``DPEngine``'s first-step self-check catches others.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from privgrad.errors import InvalidLossError, UnsupportedModelError
from privgrad.per_sample.capture import Call, suspended

_WARNED: set[type] = set()


def _input_batch_dims(module: nn.Module, call: Call, leaves: list[Any], B: int) -> list[int | None]:
    """Batch axis of each input leaf (``None``: shared by all samples)."""
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
        dims.append(d if x.shape[d] == B else None)
    return dims


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
    if B == 1:
        return [0 if s is not None and len(s) > 0 else None for s in out_shapes]
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
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every parameter claimed by a functional unit.

    Args:
        call: A recorded call of the unit.
        grad_outputs: Gradient of the summed loss w.r.t. each leaf of the call's output
            (``tree_flatten`` order), ``None`` where the output did not reach the loss.
        batch_size: ``B``, the number of samples in the call.
        samples: Optional indices, shape ``(k,)``: only those samples are computed.

    Returns:
        ``{name relative to the module: (B or k, *param.shape)}``.
    """
    unit, module = call.unit, call.unit.module
    _check_no_randomness(unit.path or "<model>", module)
    params = {n: p.detach() for n, p in unit.params.items()}
    in_leaves, spec = tree_flatten((call.args, call.kwargs))
    B = batch_size
    in_dims = _input_batch_dims(module, call, in_leaves, B)
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
        in_leaves = [x if d is None else x.index_select(d, samples)
                     for x, d in zip(in_leaves, in_dims, strict=True)]
        grad_outputs = [g if g is None or out_dims[k] is None
                        else g.index_select(out_dims[k], samples)
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
            return _looped(module, unit.params, in_leaves, in_dims, spec, grad_outputs,
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


def _looped(module, params, in_leaves, in_dims, spec, grad_outputs, out_dims, used, B):  # noqa: ANN001, ANN202
    names = list(params)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(B):
        args, kwargs = tree_unflatten(_narrow(in_leaves, in_dims, i), spec)
        with torch.enable_grad():
            outs = tree_flatten(module(*args, **kwargs))[0]
            grads = torch.autograd.grad(
                [outs[k] for k in used],
                [params[n] for n in names],
                [grad_outputs[k].narrow(out_dims[k], i, 1) for k in used],
                allow_unused=True,
            )
        for n, g in zip(names, grads, strict=True):
            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}
