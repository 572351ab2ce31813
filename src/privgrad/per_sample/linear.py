"""Per-sample rules for ``nn.Linear`` on inputs of any rank ``(B, *, d)``."""

from __future__ import annotations

import torch
from torch import nn

from privgrad.per_sample import chunks
from privgrad.per_sample.registry import LayerRule, register, trainable


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
        ``{"weight": (B, p, d), "bias": (B, p)}``, trainable parameters only.
    """
    A3, G3 = _flat(A, G)
    out = {}
    if trainable(module.weight):
        out["weight"] = torch.bmm(G3.transpose(1, 2), A3)
    if trainable(module.bias):
        out["bias"] = G3.sum(dim=1)
    return out


def use_ghost_norm(T: int, d: int, p: int) -> bool:
    """The cost rule: ghost wins when ``2T² < d·p``.

    The ghost norm ⟨AAᵀ, GGᵀ⟩ costs 2T²(d+p) per sample; materialising the gradient 2Tdp.
    """
    return 2 * T * T < d * p


def squared_norms(
    module: nn.Linear, A: torch.Tensor, G: torch.Tensor, strategy: str = "cost"
) -> dict[str, torch.Tensor]:
    """Squared per-sample gradient norms without materialising ``(B, p, d)`` unless cheaper.

    For ``T = 1`` the weight gradient is an outer product and its squared norm is
    ``‖a‖²‖g‖²``. For ``T > 1`` the ghost norm is ``sum((A Aᵀ) ⊙ (G Gᵀ))``.

    Args:
        module: The layer.
        A: Input ``(B, *, d)``.
        G: Output gradient ``(B, *, p)``.
        strategy: ``"cost"`` or ``"measure"`` pick by the cost rule (reliable for a
            matmul); ``"ghost"`` always uses the ghost formula.

    Returns:
        ``{"weight": (B,), "bias": (B,)}``, trainable parameters only.
    """
    A3, G3 = _flat(A, G)
    B, T, d, p = A3.shape[0], A3.shape[1], A3.shape[2], G3.shape[2]

    def ghost(s: slice) -> torch.Tensor:
        a, g = A3[s], G3[s]
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    def materialised(s: slice) -> torch.Tensor:
        return chunks.squared_norms(torch.bmm(G3[s].transpose(1, 2), A3[s]))

    out = {}
    if trainable(module.weight):
        if T == 1:
            out["weight"] = chunks.squared_norms(A3) * chunks.squared_norms(G3)
        elif strategy == "ghost" or use_ghost_norm(T, d, p):
            out["weight"] = chunks.per_sample_chunked(ghost, B, 2 * T * T, A.device)
        else:
            out["weight"] = chunks.per_sample_chunked(materialised, B, p * d, A.device)
    if trainable(module.bias):
        out["bias"] = chunks.squared_norms(G3.sum(dim=1))
    return out


def clipped_sum(
    module: nn.Linear, A: torch.Tensor, G: torch.Tensor, factors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum_i f_i g_i`` as one matmul ``(f ⊙ G)ᵀ A`` over all samples and positions.

    The factor scales the smaller of ``A`` and ``G`` (``chunks.scale_smaller``).

    Args:
        module: The layer.
        A: Input ``(B, *, d)``.
        G: Output gradient ``(B, *, p)``.
        factors: ``{"weight": (B,), "bias": (B,)}`` clip factors of the parameters to sum
            (a frozen parameter has no entry and is skipped).

    Returns:
        ``{"weight": (p, d), "bias": (p,)}``.
    """
    A3, G3 = _flat(A, G)
    out = {}
    if "weight" in factors:
        A3s, G3s = chunks.scale_smaller(A3, G3, factors["weight"])
        out["weight"] = G3s.reshape(-1, G3.shape[2]).T @ A3s.reshape(-1, A3.shape[2])
    if "bias" in factors:
        out["bias"] = factors["bias"].to(G3.dtype) @ G3.sum(1)
    return out


register(LayerRule(nn.Linear, per_sample_grads, squared_norms, clipped_sum))
