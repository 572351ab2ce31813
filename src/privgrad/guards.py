"""Checks that run inside ``DPEngine.backward``; each raises with what, why and the fix."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch

from privgrad.errors import (
    GradientStateError,
    InvalidLossError,
    MissingGradientError,
    NonFiniteGradientError,
    UnsupportedModelError,
)


def check_losses(losses: object) -> torch.Tensor:
    """Returns ``losses`` if it is one floating value per sample, shape ``(B,)``."""
    if not isinstance(losses, torch.Tensor):
        raise InvalidLossError(
            f"privgrad: engine.backward expects a tensor of per-sample losses, got "
            f"{type(losses).__name__}. Fix: losses = F.cross_entropy(out, y, reduction='none')."
        )
    if losses.dim() != 1:
        if losses.dim() == 0:
            why = ("got a scalar: the loss was already reduced over the batch (e.g. "
                   "reduction='mean'), so the samples' gradients cannot be separated")
            fix = "F.cross_entropy(out, y, reduction='none')"
        else:
            why = f"got shape {tuple(losses.shape)}"
            fix = "losses.flatten(1).sum(1) (or .mean(1)) to get one loss per sample"
        raise InvalidLossError(
            f"privgrad: engine.backward needs one loss per sample, shape (B,); {why}. Fix: {fix}."
        )
    if not losses.is_floating_point():
        raise InvalidLossError(
            f"privgrad: losses have dtype {losses.dtype}; they must be floating point."
        )
    return losses


def not_connected(losses: torch.Tensor) -> InvalidLossError:
    """The error for losses that do not depend on any trainable parameter of the model."""
    why = ("do not require grad (computed under torch.no_grad(), detached, or the model's "
           "parameters are all frozen)" if not losses.requires_grad else
           "do not depend on any recorded layer of this model (computed from another model, "
           "or the forward ran before the DPEngine was created, or under torch.no_grad())")
    return InvalidLossError(
        f"privgrad: the losses {why}. Fix: create the DPEngine first, then run "
        "losses = loss_fn(model(x), y, reduction='none') with gradients enabled and pass them "
        "to engine.backward(losses)."
    )


class GradLedger:
    """Remembers which ``p.grad`` tensors the engine wrote, to catch a missing ``zero_grad``.

    Only weak references and version counters are kept; nothing is stored on tensors.
    """

    def __init__(self) -> None:
        self._written: dict[str, tuple[weakref.ref, int]] = {}

    def record(self, name: str, grad: torch.Tensor) -> None:
        """Notes that ``grad`` was written as the gradient of ``name``."""
        self._written[name] = (weakref.ref(grad), grad._version)

    def check(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Raises if any ``p.grad`` still holds a gradient that would be overwritten."""
        for name, p in params.items():
            g = p.grad
            if g is None:
                continue
            ref, version = self._written.get(name, (None, None))
            if ref is not None and ref() is g:
                if g._version == version:
                    raise GradientStateError(
                        f"privgrad: p.grad of '{name}' still holds the private gradient of the "
                        "previous step: engine.backward was called again without "
                        "optimizer.zero_grad(). engine.backward writes each step's private "
                        "gradient, it does not accumulate (that would add noise twice and "
                        "break the accounting). Fix: call optimizer.step(); "
                        "optimizer.zero_grad() between steps."
                    )
                continue
            if bool(g.any()):
                raise GradientStateError(
                    f"privgrad: p.grad of '{name}' holds a gradient privgrad did not write "
                    "(did you call loss.backward() as well?). It would be overwritten and "
                    "lost, or, if kept, leak non-private information. Fix: call only "
                    "engine.backward(losses), and optimizer.zero_grad() before it."
                )


def check_finite(
    sq_norms: torch.Tensor, layer_sq_norms: Mapping[str, torch.Tensor]
) -> None:
    """Raises naming the first sample and parameter with a NaN or Inf gradient.

    Args:
        sq_norms: ``(B,)`` total squared norms.
        layer_sq_norms: ``{name: (B,)}``.
    """
    if bool(torch.isfinite(sq_norms).all()):
        return
    i = int((~torch.isfinite(sq_norms)).nonzero()[0])
    params = [n for n, s in layer_sq_norms.items() if not bool(torch.isfinite(s[i]))]
    kind = "NaN" if bool(torch.isnan(sq_norms[i])) else "Inf"
    raise NonFiniteGradientError(
        f"privgrad: sample {i} of the batch has a {kind} gradient in parameter(s) "
        f"{params[:5]}. Clipping cannot bound a non-finite gradient, and one such sample "
        "would poison the sum of all; the step was not taken and p.grad is untouched. Fix: "
        f"find why sample {i} is not finite (torch.isfinite(x[{i}]).all(), its loss value, "
        "a log of 0 or a division by 0), and drop or repair it before engine.backward."
    )


def check_any_trainable(trainable: Mapping[str, torch.nn.Parameter]) -> None:
    """Raises ``GradientStateError`` when every parameter the engine trains is frozen."""
    if not trainable:
        raise GradientStateError(
            "privgrad: every parameter this DPEngine trains has been frozen "
            "(requires_grad=False) since it was created, so there is no gradient to clip "
            "and no step to take. Fix: unfreeze at least one of them "
            "(p.requires_grad_(True)) before engine.backward / accumulate / step."
        )


def check_complete(
    trainable: Mapping[str, torch.nn.Parameter], got: Mapping[str, torch.Tensor]
) -> None:
    """Raises if a trainable parameter received no per-sample gradient."""
    missing = [n for n in trainable if n not in got]
    if missing:
        raise MissingGradientError(
            f"privgrad: trainable parameter(s) {missing[:5]} received no per-sample gradient: "
            "they were not used in the forward pass that produced these losses, or were "
            "unfrozen after the DPEngine was created. Their private gradient would be pure "
            "noise. Fix: freeze them with p.requires_grad_(False) (and build the DPEngine "
            "after freezing/unfreezing), or make sure the forward uses them."
        )


def self_check(
    reference: Mapping[str, torch.Tensor | None],
    sums: Mapping[str, torch.Tensor],
    scales: Mapping[str, torch.Tensor],
    rtol: float = 1e-3,
) -> None:
    """Compares the sum of per-sample gradients with autograd's batch gradient.

    A mismatch means a parameter was used outside the module that owns it (e.g. a tied
    weight used as ``x @ emb.weight.T`` in a parent's forward) or a layer mixes samples.

    Args:
        reference: ``{name: grad of losses.sum()}`` from ordinary autograd.
        sums: ``{name: p.shape}`` sum over samples of the per-sample gradients.
        scales: ``{name: ()}`` sum over samples of the per-sample gradient norms.
        rtol: Tolerance relative to ``scales[name]``; a floor of ``sqrt(eps)`` times the
            largest scale absorbs rounding in parameters whose batch gradient cancels.
    """
    scale_of = {n: float(s) for n, s in scales.items()}
    floor = max(scale_of.values(), default=0.0)
    for name, total in sums.items():
        ref = reference.get(name)
        ref = torch.zeros_like(total) if ref is None else ref
        err = float((total - ref).norm())
        scale = scale_of[name] + 1e-30
        if err > rtol * scale + torch.finfo(total.dtype).eps ** 0.5 * floor:
            raise MissingGradientError(
                f"privgrad: the per-sample gradients of '{name}' do not add up to its batch "
                f"gradient (relative error {err / scale:.2e}). The parameter is used outside "
                "the forward of the module that owns it (e.g. a tied weight used as "
                "h @ embedding.weight.T in a parent module), or a layer mixes samples. Fix: "
                "use the owning module to apply it (e.g. an nn.Linear whose weight is the "
                "tied Parameter), or report the model structure as a bug."
            )


def check_sample(
    reference: Mapping[str, torch.Tensor | None],
    got: Mapping[str, torch.Tensor],
    i: int,
    rtol: float = 1e-3,
) -> None:
    """Compares sample ``i``'s per-sample gradient with autograd's gradient of its loss.

    Catches what the sum check cannot: a layer whose input is shared by all samples but
    happens to have ``B`` rows (``nn.Embedding`` on ``torch.arange(T)`` with ``T == B``),
    or a layer that mixes samples.

    Args:
        reference: ``{name: grad of losses[i]}`` from ordinary autograd.
        got: ``{name: (1, *shape)}`` sample ``i``'s gradient from the per-sample core.
        i: The sample.
        rtol: Tolerance relative to the norm of sample ``i``'s whole gradient.
    """
    floor = max((float(g.norm()) for g in got.values()), default=0.0)
    total = sum(float(g.double().square().sum()) for g in got.values()) ** 0.5
    for name, g in got.items():
        ref = reference.get(name)
        ref = torch.zeros_like(g[0]) if ref is None else ref
        err = float((g[0] - ref).norm())
        if err > rtol * total + torch.finfo(g.dtype).eps ** 0.5 * floor:
            raise UnsupportedModelError(
                f"privgrad: sample {i}'s gradient of '{name}' computed per sample differs from "
                f"autograd's gradient of losses[{i}] (error {err:.2e} vs norm {total:.2e}). "
                "A layer's input is shared by all samples yet has the batch size on dim 0 "
                "(e.g. nn.Embedding on torch.arange(T) with T == B, broadcast over the "
                "batch), or a layer mixes samples. Fix: give shared inputs the batch "
                "dimension (emb(torch.arange(T).expand(B, T))), and replace sample-mixing "
                "layers (privgrad.validate.problems(model) lists known ones)."
            )
