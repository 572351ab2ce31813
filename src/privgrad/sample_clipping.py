"""Sample-wise clipping as one call, for frameworks that own their training loop.

``clipped_batch_gradients`` returns the batch mean of per-sample gradients, each clipped
on its whole-gradient L2 norm (all parameters together), with no noise and no side
effects (``p.grad`` untouched, no ledger). It runs the same per-sample core as
``DPEngine`` (``per_sample`` capture and rules, ``physical.clip_batch``).

Formal guarantees:
    None by itself: the result is NOT private. Adding ``N(0, σ²C²)/B`` noise to it is the
    Gaussian mechanism with L2 sensitivity ``C/B`` (add/remove one sample, fixed ``B``
    denominators). Use ``DPEngine`` to have the noise and the accounting done for you.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from privgrad import guards, validate
from privgrad.clipping import Flat
from privgrad.engine import MODES
from privgrad.per_sample.batch import check_batch_sizes, output_grads
from privgrad.per_sample.capture import Capture
from privgrad.per_sample.plan import plan_units
from privgrad.physical import clip_batch


def clipped_batch_gradients(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float | None,
    *,
    mode: str = "auto",
) -> dict[str, torch.Tensor]:
    """Mean over the batch of per-sample gradients clipped to ``max_norm``. NOT PRIVATE.

    Args:
        model: Any ``nn.Module`` that ``DPEngine`` accepts; it is not modified.
        loss_fn: ``loss_fn(model(inputs), targets)`` must return one loss per sample,
            shape ``(B,)`` (e.g. ``nn.CrossEntropyLoss(reduction="none")``).
        inputs: The batch, ``(B, ...)``.
        targets: Its targets.
        max_norm: ``C``; each sample's whole gradient is scaled by ``min(1, C/‖g_i‖)``.
            ``None`` gives the plain mean gradient.
        mode: ``"auto"``, ``"ghost"``, ``"materialize"`` or ``"vmap"``: the result is the
            same in every mode.

    Returns:
        ``{param name: p.shape}`` = ``(1/B) Σ_i min(1, C/‖g_i‖) g_i`` for every trainable
        parameter.

    Raises:
        InvalidLossError: If ``loss_fn`` does not return one loss per sample.
        NonFiniteGradientError: If a sample's gradient has a NaN or Inf (names it).
        ValueError: For an empty batch (it has no mean) or a bad ``max_norm``/``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"privgrad: mode={mode!r} is not one of {MODES}.")
    validate.check(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    plan = Flat(math.inf if max_norm is None else max_norm).bind(list(trainable))
    capture = Capture(plan_units(model, use_rules=mode != "vmap"))
    try:
        losses = guards.check_losses(loss_fn(model(inputs), targets))
        calls = capture.take()
        B = losses.shape[0]
        if B == 0:
            raise ValueError(
                "privgrad: clipped_batch_gradients got an empty batch, which has no mean "
                "gradient. Fix: skip empty batches, or use DPEngine (which releases noise)."
            )
        if not losses.requires_grad:
            raise guards.not_connected(losses)
        ios = output_grads(losses, calls)
        if not ios:
            raise guards.not_connected(losses)
        check_batch_sizes(ios, B)
        result = clip_batch(ios, names, trainable, plan, B, mode)
    finally:
        capture.close()
    return {n: (s / B).to(trainable[n].dtype) for n, s in result.clipped_sum.items()}
