"""Generic per-sample gradients with ``torch.func``: the fallback for any module.

For a recorded call ``y = f(θ, x)`` with output gradient ``G``, sample ``i``'s gradient
is ``∇_θ ⟨f(θ, x_i), G_i⟩`` where ``x_i`` keeps a batch axis of size 1. It is computed
with ``vmap(grad(...))`` over the batch; modules that ``vmap`` cannot batch (``nn.GRU``,
``nn.MultiheadAttention`` in current PyTorch) fall back, with one warning, to a loop of
per-sample backward passes — slow but exact.

This is valid only for modules that treat samples independently: validate.py rejects
the known sample-mixing layers, and ``DPEngine``'s first-step self-check catches others.

The re-run calls the module's ``forward`` itself, not ``module(...)``: the recorded inputs
are those the forward received (after the forward pre-hooks) and the recorded outputs are
the forward's own (capture records before any other forward hook), so running the hooks
again would apply them twice. Outputs that other outputs of the call are computed from
(``batch.LayerIO.sources``) get exactly their recorded gradient (``_gradient_is``).

Which inputs carry the batch: the module's convention for the argument (``batch_first``;
``query``/``key``/``value`` versus ``key_padding_mask`` of attention; an RNN's ``hx``), and
an input whose batch axis does not have size ``B`` is shared by all samples. When several
inputs do have size ``B`` there (``q, k, v`` of attention, or a ``(T, D)`` position table
with ``T == B``), the split is confirmed once per module by running samples alone and
comparing with the batched forward; a shared input is never sliced by accident. Which
axis of each output is the batch is checked against the losses (``layout``): an output
split along another axis, or without a batch axis but carrying a parameter gradient, is
refused.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn.modules.module import _global_forward_pre_hooks
from torch.utils._pytree import tree_flatten, tree_unflatten

from privgrad.errors import InvalidLossError, UnsupportedModelError
from privgrad.per_sample import layout
from privgrad.per_sample.axes import forward, input_batch_dims, narrow, output_batch_dims
from privgrad.per_sample.capture import Call, suspended

_WARNED: set[type] = set()


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


def grads(
    call: Call,
    grad_outputs: list[torch.Tensor | None],
    batch_size: int,
    samples: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    batch_dims: layout.Dims | None = None,
    sources: frozenset[int] = frozenset(),
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
        batch_dims: Per output leaf, the axes along which the losses see it per sample
            (``layout.valid_dims``); an output read along another axis is refused.
            ``None``: not checked (one sample).
        sources: Output leaves that other outputs of the call are computed from; their
            ``grad_outputs`` are autograd's totals (``batch.LayerIO.sources``).

    Returns:
        ``{name relative to the module: (B or k, *param.shape)}``.

    Raises:
        UnsupportedModelError: An output would be split along an axis the losses do not
            see per sample, or has no batch axis but carries a parameter gradient.
    """
    unit, module = call.unit, call.unit.module
    _check_no_randomness(unit.path or "<model>", module)
    source = unit.params if params is None else params
    params = {n: p.detach() for n, p in source.items()}
    in_leaves, spec = tree_flatten((call.args, call.kwargs))
    B = batch_size
    used_all = [k for k, g in enumerate(grad_outputs) if g is not None]
    _check_pre_hooks(call, params, in_leaves, spec, grad_outputs, used_all)
    if B == 1:  # the call's whole gradient is sample 0's: no batch axis needed
        with suspended():
            one = _whole(module, params, in_leaves, spec, grad_outputs, used_all, sources)
        k = 1 if samples is None else len(samples)
        return {n: g.expand(k, *g.shape[1:]).clone() for n, g in one.items()}
    in_dims = input_batch_dims(module, params, call, in_leaves, spec, B)
    if all(d is None for d in in_dims):
        raise InvalidLossError(
            f"privgrad: no input of module '{unit.path}' ({type(module).__name__}) has the "
            f"batch size {B} of the losses along its batch axis. Fix: pass one loss per "
            "sample, shape (B,), e.g. reduce a (T, B) loss of a sequence-first model with "
            "losses.sum(0)."
        )
    out_dims = output_batch_dims(module, params, in_leaves, in_dims, spec, call.out_shapes, B)
    _check_output_dims(call, params, in_leaves, spec, grad_outputs, out_dims, batch_dims, B)
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
            return _vmapped(module, params, in_leaves, in_dims, spec, grad_outputs, out_dims,
                            used, sources)
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
                           out_dims, used, B, sources)


def _user_pre_hooks(module: nn.Module) -> list[Any]:
    """The forward pre-hooks that run before ``module.forward`` other than privgrad's own."""
    hooks = [*_global_forward_pre_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if not getattr(h, "__module__", "").startswith("privgrad.")]


def _check_pre_hooks(
    call: Call, params: dict, in_leaves: list, spec: Any, grad_outputs: list, used: list[int]
) -> None:
    """Refuses a pre-hook that computes what the forward uses from claimed parameters.

    The re-run calls ``forward`` with the inputs the pre-hooks produced, without running
    them again (an input transform would apply twice). A pre-hook that sets a tensor from
    parameters (``torch.nn.utils.weight_norm``'s ``weight`` from ``weight_g``/``weight_v``)
    is then not reproduced, and the parameters it reads would get zero per-sample
    gradients: found by one whole-batch re-run (only for modules with such hooks).
    """
    module = call.unit.module
    hooks = _user_pre_hooks(module)
    if not hooks or not used:
        return
    names = list(params)
    leaf = {n: p.detach().requires_grad_() for n, p in params.items()}
    args, kwargs = tree_unflatten(in_leaves, spec)
    with suspended(), torch.enable_grad():
        outs = tree_flatten(forward(module, leaf, args, kwargs))[0]
        pairs = [(outs[k], grad_outputs[k]) for k in used
                 if isinstance(outs[k], torch.Tensor) and outs[k].requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], [leaf[n] for n in names],
                                    [g for _, g in pairs], allow_unused=True) if pairs else ()
    unused = [n for n, g in zip(names, grads, strict=True) if g is None] if pairs else names
    if unused:
        unit = call.unit
        kinds = sorted({getattr(h, "__qualname__", None) or type(h).__name__ for h in hooks})
        raise UnsupportedModelError(
            f"privgrad: module '{unit.path}' ({type(module).__name__}) has a forward "
            f"pre-hook ({', '.join(kinds)}) and its forward does not use the parameter(s) "
            f"{unused} that it trains: the pre-hook computes what the forward uses from "
            "them (as torch.nn.utils.weight_norm / spectral_norm do). privgrad re-runs the "
            "forward per sample without the module's hooks (they ran already: an input "
            "transform would be applied twice), so these parameters' per-sample gradients "
            "would be zero. Fix: use the parametrization API, e.g. "
            "torch.nn.utils.parametrizations.weight_norm(layer), or compute the weight "
            "inside forward."
        )


def _check_output_dims(
    call: Call, params: dict, in_leaves: list, spec: Any, grad_outputs: list,
    out_dims: list[int | None], batch_dims: layout.Dims | None, B: int,
) -> None:
    """Refuses an output the re-run would split along the wrong axis, or drop.

    An output with a gradient but no batch axis (a batch mean, an auxiliary loss over the
    batch) is left out of the re-run; that is exact only if no claimed parameter's
    gradient flows through it, which one whole-batch backward pass of that output tells.
    """
    unit = call.unit
    for k, (g, d) in enumerate(zip(grad_outputs, out_dims, strict=True)):
        if g is None:
            continue
        if d is not None:
            if batch_dims is not None:
                layout.check_functional_dim(call, k, d, batch_dims, B)
            continue
        with suspended():
            through = _whole(unit.module, params, in_leaves, spec, grad_outputs, [k], frozenset())
        if any(bool((t != 0).any()) for t in through.values()):
            raise UnsupportedModelError(
                f"privgrad: output {k} of module '{unit.path}' ({type(unit.module).__name__})"
                f" has no batch axis (shape {tuple(call.out_shapes[k])}, batch size {B}) but "
                "reaches the losses and carries a gradient of the module's parameters: that "
                "gradient is one sum over all samples, which cannot be split into per-sample "
                "parts, so it would be missing from every sample's gradient and norm. Fix: "
                "return it per sample, with the batch on one axis (a (B, ...) tensor, not a "
                "batch mean or a loss over the batch), or compute it outside this module "
                "from per-sample outputs."
            )


def _gradient_is(out: torch.Tensor, g: torch.Tensor, source: bool) -> None:
    """Makes the re-run's gradient at a source output exactly its recorded ``G``.

    ``G`` of an output that other outputs of the call are computed from is autograd's
    total: it already holds the paths through those outputs. In the re-run those paths
    add their part again at this output; replacing the sum by ``G`` counts each path once
    (``nn.LSTMCell``: 32% off without it).
    """
    if source and out.requires_grad:
        out.register_hook(lambda _: g)


def _vmapped(module, params, in_leaves, in_dims, spec, grad_outputs, out_dims, used,
             sources):
    tensor_pos = [k for k, d in enumerate(in_dims) if d is not None]
    g_used = [grad_outputs[k] for k in used]

    def sample_loss(p, batched, gs):
        leaves = list(in_leaves)
        for k, x in zip(tensor_pos, batched, strict=True):
            leaves[k] = x.unsqueeze(in_dims[k])
        args, kwargs = tree_unflatten(leaves, spec)
        outs = tree_flatten(forward(module, p, args, kwargs))[0]
        total = 0.0
        for k, g in zip(used, gs, strict=True):
            g = g.unsqueeze(out_dims[k])
            _gradient_is(outs[k], g, k in sources)
            total = total + (outs[k] * g).sum()
        return total

    batched = [in_leaves[k] for k in tensor_pos]
    return vmap(
        grad(sample_loss),
        in_dims=(None, [in_dims[k] for k in tensor_pos], [out_dims[k] for k in used]),
    )(params, batched, g_used)


def _whole(module, params, in_leaves, spec, grad_outputs, used, sources):
    """Gradient of the whole call, as the single sample's gradient ``(1, *shape)``."""
    names = list(params)
    leaf_params = {n: p.detach().requires_grad_() for n, p in params.items()}
    args, kwargs = tree_unflatten(in_leaves, spec)
    with torch.enable_grad():
        outs = tree_flatten(forward(module, leaf_params, args, kwargs))[0]
        for k in used:
            _gradient_is(outs[k], grad_outputs[k], k in sources)
        grads = torch.autograd.grad(
            [outs[k] for k in used], [leaf_params[n] for n in names],
            [grad_outputs[k] for k in used], allow_unused=True,
        )
    return {n: (torch.zeros_like(params[n]) if g is None else g).unsqueeze(0)
            for n, g in zip(names, grads, strict=True)}


def _looped(module, params, in_leaves, in_dims, spec, grad_outputs, out_dims, used, B,
            sources):
    names = list(params)
    leaf_params = {n: p.detach().requires_grad_() for n, p in params.items()}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(B):
        args, kwargs = tree_unflatten(narrow(in_leaves, in_dims, i), spec)
        with torch.enable_grad():
            outs = tree_flatten(forward(module, leaf_params, args, kwargs))[0]
            gs = [grad_outputs[k].narrow(out_dims[k], i, 1) for k in used]
            for k, g in zip(used, gs, strict=True):
                _gradient_is(outs[k], g, k in sources)
            grads = torch.autograd.grad(
                [outs[k] for k in used], [leaf_params[n] for n in names], gs, allow_unused=True,
            )
        for n, g in zip(names, grads, strict=True):
            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}
