"""Checks that run inside ``DPEngine.backward``; each raises with what, why and the fix."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

from privgrad.errors import (
    GradientStateError,
    InvalidLossError,
    MissingGradientError,
    NonFiniteGradientError,
    UnsupportedModelError,
)
from privgrad.per_sample.capture import Marked
from privgrad.per_sample.state import StateWrite


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
        """Raises if any ``p.grad`` still holds a gradient that would be overwritten.

        A ``p.grad`` the engine wrote must be ``None`` or zero by the next step. Changed in
        place since (its version moved) is not taken for ``zero_grad(set_to_none=False)``
        unless it is zero: a non-private ``loss.backward()`` also accumulates in place
        (refused as it happens by the engine's ``GradAccumulationGuard``; this catches
        whatever bypassed it, e.g. an in-place op on ``p.grad``).
        """
        for name, p in params.items():
            g = p.grad
            if g is None:
                continue
            ref, version = self._written.get(name, (None, None))
            if ref is not None and ref() is g:
                if g._version == version or bool(g.any()):
                    since = "" if g._version == version else (
                        " (changed in place since it was written, and not zero)")
                    raise GradientStateError(
                        f"privgrad: p.grad of '{name}' still holds the private gradient of the "
                        f"previous step{since}: engine.backward was called again without "
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
    """Compares a weighted sum of per-sample gradients with autograd's batch gradient.

    A mismatch means a parameter was used outside the module that owns it (e.g. a tied
    weight used as ``x @ emb.weight.T`` in a parent's forward) or a layer mixes samples.

    Args:
        reference: ``{name: grad of (w * losses).sum()}`` from ordinary autograd.
        sums: ``{name: p.shape}`` ``Σ_i w_i g_i`` as the clipped sum computes it.
        scales: ``{name: ()}`` ``Σ_i w_i ‖g_i‖``.
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
                "h @ embedding.weight.T in a parent module), or a layer mixes samples, or "
                "privgrad's rule for its layer weights the samples wrongly (the check weights "
                "them unequally). Nothing was released. Fix: use the owning module to apply "
                "it (e.g. an nn.Linear whose weight is the tied Parameter), or report the "
                "model structure as a bug."
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
                "batch), or the model or the loss mixes samples (batch statistics, an "
                "in-batch contrastive loss). Fix: give shared inputs the batch dimension "
                "(emb(torch.arange(T).expand(B, T))), compute each sample's loss from that "
                "sample alone, and replace sample-mixing layers "
                "(privgrad.validate.problems(model) lists known ones)."
            )


def check_norms(
    layer_sq: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    samples: Sequence[int],
    rtol: float = 1e-3,
) -> None:
    """Compares the per-sample norms the factors come from with the gradients' own norms.

    The norms of book-kept calls come from a rule's norm formula (a ghost norm, a Gram
    matrix), not from the gradient, so the gradient checks (``self_check``,
    ``check_sample``) do not see a formula that is wrong. A norm that is too small gives
    a factor that lets the sample contribute more than ``C``: checked at two samples
    (the first and the last: a formula that mixes up samples is off at one of them).
    Only a norm below the gradient's is refused: one above it clips harder, which is
    what ``per_sample.ghost.squared_norms`` does on purpose for a sample whose gradient
    cancels (its norm is at least its mass over ``ghost.MAX_CANCELLATION``).

    Args:
        layer_sq: ``{name: (B,)}`` squared per-sample norms as the step clips with them.
        grads: ``{name: (k, *shape)}`` materialised gradients of ``samples``.
        samples: The ``k`` sample indices ``grads`` holds.
        rtol: Tolerance relative to the norm of the sample's whole gradient.
    """
    for j, i in enumerate(samples):
        norms = {n: float(g[j].double().norm()) for n, g in grads.items()}
        total = sum(v * v for v in norms.values()) ** 0.5
        for name, want in norms.items():
            got = float(layer_sq[name][i].double().sqrt())
            eps = torch.finfo(grads[name].dtype).eps
            if want - got > rtol * total + eps ** 0.5 * max(norms.values()):
                raise UnsupportedModelError(
                    f"privgrad: the per-sample norm of '{name}' for sample {i} is {got:.6e} by "
                    f"the formula its layer's rule computes it with, but {want:.6e} as the "
                    "norm of that sample's gradient: clip factors from it would not bound the "
                    "sample's contribution. This is a bug in privgrad's rule for that layer "
                    "type (or a module whose forward differs from the class it is named as). "
                    "Nothing was released. Fix: DPEngine(mode=\"materialize\") takes every "
                    "norm from the materialised gradients; please report the layer."
                )


def grad_accumulated(name: str) -> GradientStateError:
    """The error for a backward pass that accumulated into ``p.grad`` of ``name``."""
    return GradientStateError(
        f"privgrad: a backward pass accumulated a gradient into p.grad of '{name}', a "
        "parameter this DPEngine trains (loss.backward() or torch.autograd.backward on the "
        "model's output). That gradient is neither clipped nor noised: an optimizer.step() "
        "would apply it and release the batch without privacy. The backward pass was "
        f"stopped and p.grad of '{name}' set to None. Fix: train with "
        "engine.backward(losses) only; for a non-private evaluation run the forward under "
        "torch.no_grad(), or take its gradients with torch.autograd.grad(loss, inputs), "
        "which leaves p.grad alone (engine.close() removes this guard with the engine)."
    )


def check_forward_writes(writes: Sequence[StateWrite], during: str = "forward") -> None:
    """Raises if a recorded forward (or privgrad's backward) wrote the model's state.

    Whatever a forward writes into the model from the batch (running statistics, an
    Embedding's ``max_norm`` renormalisation of the batch's rows, a buffer updated from
    the input), or a hook from the batch's gradients during privgrad's backward passes,
    is released with the model without clipping or noise.

    Args:
        writes: From ``Capture.take_writes()`` or ``Capture.take_pass_writes()``.
        during: ``"forward"`` or ``"backward"``: which pass wrote them.

    Raises:
        UnsupportedModelError: Naming each module and tensor written (five at most), how,
            and the fix.
    """
    if not writes:
        return
    lines = [_describe(w, during) for w in writes[:5]]
    more = f"\n- ... and {len(writes) - 5} more" if len(writes) > 5 else ""
    what = ("the model's forward pass" if during == "forward" else
            "a hook run during privgrad's backward pass (e.g. a tensor hook registered in the "
            "forward), or code run between the forward and engine.backward (the loss),")
    source = "the batch" if during == "forward" else "the batch's unclipped gradients"
    raise UnsupportedModelError(
        f"privgrad: {what} wrote parameters or buffers of the model:\n- "
        + "\n- ".join(lines) + more + f"\nWhat a {during} pass writes into the model comes "
        f"from {source} and is released with the model, with no clipping and no noise, so "
        "this batch is refused: nothing of it was accumulated, p.grad is untouched and no "
        "step is taken. The model already holds the written values: restore its parameters "
        "and buffers from before this batch (e.g. model.load_state_dict(saved_state)) before "
        "training on or releasing it."
    )


_HOW = {
    "in place": "changed its {kind} '{name}' in place",
    "replaced": "assigned a new tensor to its {kind} '{name}' (like self.{name} = x.mean(0))",
    "added": "registered a new {kind} '{name}'",
    "removed": "removed its {kind} '{name}'",
}


def _describe(w: StateWrite, during: str = "forward") -> str:
    where = f"module '{w.path}'" if w.path else "the model itself"
    cls = type(w.module).__name__
    what = _HOW[w.how].format(kind=w.kind, name=w.name)
    why, fix = _write_hint(w, cls, during)
    return f"{where} ({cls}) {what} during the {during} pass{why}. Fix: {fix}"


def _spectral_norm(w: StateWrite) -> str | None:
    """The layer's path if ``w`` is spectral norm's power-iteration state, else ``None``."""
    if isinstance(w.module, _SpectralNorm) and w.name in ("_u", "_v"):
        return w.path.split(".parametrizations.")[0] if ".parametrizations." in w.path else ""
    if w.name.endswith(("_u", "_v")) and any(
            isinstance(h, SpectralNorm) for h in w.module._forward_pre_hooks.values()):
        return w.path
    return None


def _write_hint(w: StateWrite, cls: str, during: str = "forward") -> tuple[str, str]:
    """Why such a write happens and how to avoid it: known layers first, then in general."""
    m, prefix = w.module, f"{w.path}." if w.path else ""
    if during == "backward":
        return ("", f"never write self.{w.name} from a gradient hook: a statistic of the "
                "gradients must be computed from the private gradient engine.step() writes "
                "into p.grad (clipped and noised), after the step")
    layer = _spectral_norm(w)
    if layer is not None:
        ref = f"model.{layer}" if layer else "model"
        return (
            " (spectral norm's power iteration updates u and v in place on every forward "
            "in training mode; they come from the weights only, but privgrad cannot tell a "
            "write in the recorded forward from one made from the batch)",
            "use torch.nn.utils.parametrizations.spectral_norm (the hook API "
            "torch.nn.utils.spectral_norm is not supported), keep that layer in eval mode "
            f"for the training forward ({ref}.eval(): the weight is still divided by the "
            "stored estimate of its norm) and run the power iteration from the weights alone "
            f"after each optimizer.step(): with torch.no_grad(): {ref}.train(); "
            f"{ref}.weight; {ref}.eval()",
        )
    if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.max_norm is not None:
        return (
            f" (max_norm={m.max_norm} renormalises in place the rows of the batch's tokens, "
            "so the released weights reveal which tokens the batch held)",
            f"nn.{cls}(..., max_norm=None); to bound the rows, renormalise after each "
            f"optimizer.step(), from released values only: with torch.no_grad(): "
            f"model.{prefix}weight.renorm_(2, 0, {m.max_norm})",
        )
    if isinstance(m, _BatchNorm | _InstanceNorm) and w.kind == "buffer":
        return (
            " (running statistics are averages over the batch's inputs)",
            "pg.validate.fix(model) (GroupNorm instead of BatchNorm, "
            "track_running_stats=False for InstanceNorm)",
        )
    if w.kind == "parameter":
        return ("", f"a parameter may change only by optimizer.step() on the private "
                f"gradient: remove the write to self.{w.name} from {cls}.forward (no in-place "
                "op on it, no .data assignment)")
    return ("", f"never write self.{w.name} in {cls}.forward: give it its value before "
            "training, from public data or from the parameters and shapes only (a cache such "
            "as a position table: fill it by one forward at the largest size under "
            "torch.no_grad() before creating the DPEngine); state learned from the data must "
            "be an nn.Parameter trained through engine.backward")


@dataclass(frozen=True)
class Mixing:
    """How much one marked tensor's other samples reach the losses, for ``check_no_mixing``.

    Attributes:
        where: The tensor (``Marked.where``).
        dim: The dim taken as the samples (0, or 1 for a sequence-first input).
        cross: ``‖∂losses[0]/∂x[j ≠ 0]‖ / scale``: exactly 0 when the samples are independent.
        cross_sample: The sample ``j != 0`` with the largest ``‖∂losses[0]/∂x[j]‖``.
        signs: ``‖∂(s·losses)/∂x - s ⊙ ∂(1·losses)/∂x‖ / ‖∂(1·losses)/∂x‖`` for a fixed
            random sign vector ``s``: 0 (up to rounding) when the samples are independent.
        signs_sample: The sample with the largest difference.
    """

    where: str
    dim: int
    cross: float
    cross_sample: int
    signs: float
    signs_sample: int


def sample_mixing(losses: torch.Tensor, marked: Sequence[Marked]) -> list[Mixing]:
    """Measures whether a loss depends on another sample's input: ``∂losses[i]/∂x[j]``.

    For every marked tensor ``x`` with ``B`` samples on dim 0 (or 1: sequence-first), three
    vector-Jacobian products through the model: with ``e_0`` (``losses[0]`` must not
    depend on any ``x[j]``, ``j != 0``: catches any mixing that involves sample 0, like
    batch statistics or an in-batch contrastive loss), with ``1`` and with a fixed random
    sign vector ``s`` (independent samples give ``∂(s·L)/∂x[j] = s_j ∂(1·L)/∂x[j]`` for
    every ``j``; a dependence of ``losses[i]`` on ``x[j]`` shows whenever ``s_i != s_j``).
    Run before the graph is freed; the verdict is ``check_no_mixing``'s. A layer output
    marked ``broadcast`` with a size-1 dim 0 (``(1, T, d)``: position embeddings shared by
    the batch) is not tried on dim 1, so such an output of token ids fed sequence-first
    with length 1 is not checked (the model's own floating inputs always are).

    Args:
        losses: ``(B,)`` per-sample losses, graph alive.
        marked: From ``Capture.take_marked()``.

    Returns:
        One ``Mixing`` per marked tensor that the losses depend on and candidate sample
        dim; empty when ``B < 2``.
    """
    B = losses.shape[0]
    xs = [m for m in marked if m.tensor.requires_grad and B in m.tensor.shape[:2]]
    if B < 2 or not xs:
        return []
    # A fixed generator: the check is deterministic and leaves the user's RNG alone.
    signs = torch.randint(0, 2, (B,), generator=torch.Generator().manual_seed(0x5EED)) * 2.0 - 1
    signs[:2] = torch.tensor([1.0, -1.0])  # B = 2 is then fully checked
    signs = signs.to(device=losses.device, dtype=losses.dtype)
    tensors = [m.tensor for m in xs]
    vjps = [torch.autograd.grad(v, tensors, retain_graph=True, allow_unused=True)
            for v in (losses[0], losses.sum(), (losses * signs).sum())]
    out = []
    for k, m in enumerate(xs):
        grads = [g[k] for g in vjps]
        if all(g is None for g in grads):
            continue  # not used by the forward
        shape = m.tensor.shape
        # (1, B, ...) from a broadcast (embedding of (1, T) position ids, T == B) is one
        # row shared by all samples: dim 1 is not the samples there.
        dims = [d for d in (0, 1) if d < len(shape) and shape[d] == B
                and not (d == 1 and m.broadcast and shape[0] == 1)]
        for dim in dims:
            g0, g1, gs = (torch.zeros(B, 1, dtype=torch.double, device=losses.device)
                          if g is None else g.double().movedim(dim, 0).reshape(B, -1)
                          for g in grads)
            rows0, rows1 = g0.norm(dim=1), g1.norm(dim=1)
            scale = max(float(rows0.max()), float(rows1.max()))
            diff = (gs - signs.double()[:, None] * g1).norm(dim=1)
            out.append(Mixing(
                m.where, dim,
                float(rows0[1:].norm()) / scale if scale > 0 else 0.0,
                1 + int(rows0[1:].argmax()),
                float(diff.norm()) / max(float(rows1.norm()), 1e-300),
                int(diff.argmax()),
            ))
    return out


def check_no_mixing(found: Sequence[Mixing], rtol: float = 1e-3) -> None:
    """Raises ``UnsupportedModelError`` if a loss depends on another sample's input.

    A tensor passes if one of its candidate sample dims passes both tests.

    Args:
        found: From ``sample_mixing``.
        rtol: Tolerance of the sign comparison (rounding). The ``e_0`` test allows
            ``1e-6`` whatever the dtype: without mixing there is no path, so exactly 0.
    """
    failed: dict[str, Mixing] = {}
    passed = set()
    for m in found:
        if m.cross > 1e-6 or m.signs > rtol:
            failed.setdefault(m.where, m)
        else:
            passed.add(m.where)
    for where, m in failed.items():
        if where in passed:
            continue
        if m.cross > 1e-6:
            what = (f"losses[0] depends on sample {m.cross_sample}'s {where} (the gradient "
                    f"of losses[0] with respect to the other samples' rows has {m.cross:.2e} "
                    "times the norm of the samples' own")
        else:
            what = (f"sample {m.signs_sample}'s {where} reaches another sample's loss (the "
                    f"gradients of two sign-weighted sums of the losses differ by {m.signs:.2e}"
                    " relative")
        raise UnsupportedModelError(
            f"privgrad: {what}): the model or the loss mixes the samples of a batch, e.g. "
            "batch statistics ((x - x.mean(0)) / x.std(0)) or in-batch mixup/shuffling in a "
            "forward, or a loss that compares samples (in-batch contrastive). Removing one "
            "sample then changes the other samples' gradients, so clipping each sample's "
            "gradient no longer bounds its contribution and the privacy guarantee is void; "
            "nothing was accumulated. Fix: compute each sample's loss from that sample alone "
            "(normalise with constants from public data or per sample, nn.LayerNorm; augment "
            "per sample in the data pipeline; a per-sample loss instead of an in-batch one). "
            "Dims 0 and 1 (where of size B) were both tried as the batch."
        )
