"""Per-sample rules for ``nn.Embedding`` (``padding_idx`` rows receive no gradient)."""

from __future__ import annotations

import torch
from torch import nn

from privgrad.per_sample.registry import LayerRule, register


def per_sample_grads(
    module: nn.Embedding, A: torch.Tensor, G: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of an Embedding.

    Args:
        module: The layer.
        A: Token indices, shape ``(B, *)``.
        G: Output gradient, shape ``(B, *, D)``.

    Returns:
        ``{"weight": (B, V, D)}``: row ``v`` of sample ``i`` is the sum of ``G`` over the
        positions of sample ``i`` holding token ``v``; the ``padding_idx`` row is zero.
    """
    B = A.shape[0]
    V, D = module.num_embeddings, module.embedding_dim
    idx = A.reshape(B, -1).long()
    rows = G.reshape(B, -1, D)
    if module.padding_idx is not None:
        rows = rows * (idx != module.padding_idx).unsqueeze(-1).to(rows.dtype)
    flat_idx = (idx + V * torch.arange(B, device=idx.device).unsqueeze(1)).reshape(-1)
    grad = torch.zeros(B * V, D, dtype=G.dtype, device=G.device)
    grad.index_add_(0, flat_idx, rows.reshape(-1, D))
    return {"weight": grad.view(B, V, D)}


register(LayerRule(nn.Embedding, per_sample_grads))
