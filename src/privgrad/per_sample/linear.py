"""Per-sample rules for ``nn.Linear`` on inputs of any rank ``(B, *, d)``."""

from __future__ import annotations

import torch
from torch import nn

from privgrad.per_sample.registry import LayerRule, register


def _flat(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshapes ``A (B, *, d)`` and ``G (B, *, p)`` to ``(B, T, d)`` and ``(B, T, p)``."""
    B = A.shape[0]
    return A.reshape(B, -1, A.shape[-1]), G.reshape(B, -1, G.shape[-1])


def per_sample_grads(
    module: nn.Linear, A: torch.Tensor, G: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a Linear layer.

    Args:
        module: The layer.
        A: Layer input, shape ``(B, *, d)``.
        G: Gradient of the summed loss w.r.t. the layer output, shape ``(B, *, p)``.

    Returns:
        ``{"weight": (B, p, d), "bias": (B, p)}`` (bias only if the layer has one).
    """
    A3, G3 = _flat(A, G)
    out = {"weight": torch.bmm(G3.transpose(1, 2), A3)}
    if module.bias is not None:
        out["bias"] = G3.sum(dim=1)
    return out


register(LayerRule(nn.Linear, per_sample_grads))
