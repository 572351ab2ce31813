"""Sample-wise clipping as one call, for frameworks that own their training loop.

``clipped_batch_gradients`` returns the sum of per-sample gradients, each clipped on its
whole-gradient L2 norm (all parameters together), divided by a denominator, with no noise
and no side effects (``p.grad`` untouched, no ledger). It runs the same per-sample core as
``DPEngine`` (``per_sample`` capture and rules, ``step.clip_batch``).

Formal guarantees:
    None by itself: the result is NOT private. Its L2 sensitivity, the most one sample can
    move it, is (``C`` = ``max_norm``; ``B`` the realised batch size):

    ======================================  ========================  ============
    denominator                             add / remove one          replace one
    ======================================  ========================  ============
    ``normalize_by=n`` (public, fixed)      ``C / n``                 ``2C / n``
    ``None``: the realised size ``B``       ``2C / B_max``            ``2C / B``
    ======================================  ========================  ============

    ``B_max`` is the larger of the two batches (``B + 1`` when one is added to ``B``,
    ``B`` when one is removed): adding ``x`` moves the mean by ``(g_x − mean) / (B + 1)``,
    whose norm reaches ``2C / (B + 1)`` when ``g_x`` opposes the others.

    Adding ``N(0, σ²C²)/n`` with ``normalize_by=n`` fixed before seeing the data is the
    Gaussian mechanism with noise multiplier ``σ`` under add/remove-one adjacency, as
    ``DPEngine`` with ``expected_batch_size=n``. The realised mean needs noise for
    ``2C / B`` at the smallest ``B`` the batch can have, and ``B`` itself is private.
    Use ``DPEngine`` to have the noise and the accounting done for you.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from privgrad import guards, validate
from privgrad.clipping import Flat
from privgrad.engine import MODES
from privgrad.per_sample.capture import Capture
from privgrad.per_sample.layer_io import check_batch_sizes, output_grads
from privgrad.per_sample.units import plan_units
from privgrad.step.clip_batch import clip_batch


def clipped_batch_gradients(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float | None,
    *,
    normalize_by: float | None = None,
    mode: str = "auto",
    check_mixing: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum of per-sample gradients clipped to ``max_norm``, over a denominator. NOT PRIVATE.

    Its sensitivity is ``max_norm / normalize_by`` (add/remove one sample) with a fixed
    ``normalize_by``, and ``2·max_norm / B`` for the realised mean (module docstring).

    Args:
        model: Any ``nn.Module`` that ``DPEngine`` accepts; it is not modified.
        loss_fn: ``loss_fn(model(inputs), targets)`` must return one loss per sample,
            shape ``(B,)`` (e.g. ``nn.CrossEntropyLoss(reduction="none")``).
        inputs: The batch, ``(B, ...)``.
        targets: Its targets.
        max_norm: ``C``; each sample's whole gradient is scaled by ``min(1, C/‖g_i‖)``.
            ``None`` gives the plain mean gradient.
        normalize_by: A public constant fixed before seeing the data (the expected batch
            size ``q·N`` under Poisson sampling): the result is the clipped sum divided by
            it, with sensitivity ``C / normalize_by``, and an empty batch gives zeros.
            ``None`` divides by the realised batch size ``B`` (the clipped mean: twice the
            sensitivity, and ``B`` is private).
        mode: ``"auto"``, ``"ghost"``, ``"materialize"`` or ``"vmap"``: the result is the
            same in every mode.
        check_mixing: On every call with ``B >= 2``, check that no loss depends on another
            sample's input (``∂losses[i]/∂x[j] = 0`` for ``i != j``, through the floating
            inputs of ``model`` and the outputs of its layers fed token ids: batch
            statistics or mixup in the forward, an in-batch loss), by three
            vector-Jacobian products (about one more backward pass). The stated
            sensitivity assumes independent samples; with ``False`` (or mixing done
            before ``model(inputs)``, which cannot be seen) that is yours to ensure.

    Always checked: no parameter or buffer of ``model`` is written during its forward
    (``Embedding(max_norm=...)``, running statistics) or during the backward passes (a
    gradient hook), since that would release the batch outside the sum. Not checked here
    (``DPEngine(self_check=True)`` does it): that the per-sample gradients add up to
    autograd's batch gradient.

    Returns:
        ``{param name: p.shape}`` = ``(1/n) Σ_i min(1, C/‖g_i‖) g_i`` for every trainable
        parameter, ``n = normalize_by`` or ``B``.

    Raises:
        InvalidLossError: If ``loss_fn`` does not return one loss per sample.
        UnsupportedModelError: If the model writes its own state, or (``check_mixing``) a
            loss depends on another sample's input.
        NonFiniteGradientError: If a sample's gradient has a NaN or Inf (names it).
        ValueError: For an empty batch without ``normalize_by`` (it has no mean) or a bad
            ``max_norm``/``normalize_by``/``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"privgrad: mode={mode!r} is not one of {MODES}.")
    if normalize_by is not None and not (0 < float(normalize_by) < math.inf):
        raise ValueError(
            f"privgrad: normalize_by={normalize_by!r} must be a positive finite number, the "
            "public denominator of the clipped sum. Fix: normalize_by=expected_batch_size "
            "(q·N, fixed before seeing the data)."
        )
    validate.check(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    plan = Flat(math.inf if max_norm is None else max_norm).bind(list(trainable))
    # No engine remembers a verified model here, so the mixing check runs on every call.
    capture = Capture(plan_units(model, use_rules=mode != "vmap"), root=model,
                      marking=check_mixing)
    try:
        losses = guards.check_losses(loss_fn(model(inputs), targets))
        guards.check_forward_writes(capture.take_writes())  # nothing learnt outside the sum
        capture.watch_passes()
        calls = capture.take()
        B = losses.shape[0]
        if B == 0 and normalize_by is None:
            raise ValueError(
                "privgrad: clipped_batch_gradients got an empty batch, which has no mean "
                "gradient. Fix: pass normalize_by=expected_batch_size (then an empty batch "
                "gives zeros), or use DPEngine (which releases noise)."
            )
        if B == 0:
            return {n: torch.zeros_like(p) for n, p in trainable.items()}
        if not losses.requires_grad:
            raise guards.not_connected(losses)
        if check_mixing:  # before output_grads, which frees the graph
            guards.check_no_mixing(guards.sample_mixing(losses, capture.take_marked()))
        ios = output_grads(losses, calls)
        if not ios:
            raise guards.not_connected(losses)
        check_batch_sizes(ios, B)
        result = clip_batch(ios, names, trainable, plan, B, mode)
        guards.check_forward_writes(capture.take_pass_writes(), during="backward")
    finally:
        capture.close()
    n = B if normalize_by is None else float(normalize_by)
    return {k: (s / n).to(trainable[k].dtype) for k, s in result.clipped_sum.items()}
