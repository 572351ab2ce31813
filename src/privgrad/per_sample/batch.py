"""From recorded calls to per-sample gradients of every trainable parameter.

``output_grads`` runs the one backward pass privgrad needs: the gradient of the summed
per-sample losses with respect to each recorded layer output (never the ordinary weight
gradients). ``per_sample_grads`` turns those into per-sample parameter gradients, using
each unit's rule or the functional fallback, and sums the contributions of tied
parameters and of modules called several times.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    call: Call
    grads: list[torch.Tensor | None]

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
            out.append(LayerIO(c, gs))
    return out


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
                "losses of shape (B,), e.g. F.cross_entropy(out, y, reduction='none')."
            )


def per_sample_grads(
    ios: list[LayerIO],
    names: dict[int, str],
    batch_size: int,
    samples: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every parameter reached by the recorded calls.

    Args:
        ios: Calls with their output gradients.
        names: ``id(parameter) -> name`` as in ``model.named_parameters()``.
        batch_size: ``B``.
        samples: Optional indices ``(k,)``: compute only those samples.

    Returns:
        ``{parameter name: (B or k, *shape)}``; tied parameters and repeated calls are summed.
    """
    out: dict[str, torch.Tensor] = {}
    for io in ios:
        unit = io.call.unit
        if unit.rule is not None:
            A, G = io.A, io.G
            if samples is not None:
                A, G = A.index_select(0, samples), G.index_select(0, samples)
            grads = unit.rule.per_sample_grads(unit.module, A, G)
        else:
            grads = functional.per_sample_grads(io.call, io.grads, batch_size, samples)
        for rel, g in grads.items():
            p = unit.params.get(rel)
            if p is None or not p.requires_grad:
                continue
            name = names[id(p)]
            out[name] = out[name] + g if name in out else g
    return out
