"""Per-sample rules for ``nn.Embedding`` (``padding_idx`` rows receive no gradient)."""

from __future__ import annotations

import torch
from torch import nn

from privgrad.per_sample.chunks import accumulation_dtype
from privgrad.per_sample.rule import Formula, LayerRule


def _rows(module: nn.Embedding, A: torch.Tensor, G: torch.Tensor):
    """Token ids ``(B, T)`` and gradient rows ``(B, T, D)``, padding rows zeroed."""
    B, D = A.shape[0], module.embedding_dim
    idx = A.reshape(B, -1).long()
    rows = G.reshape(B, -1, D)
    if module.padding_idx is not None:
        rows = rows * (idx != module.padding_idx).unsqueeze(-1).to(rows.dtype)
    return idx, rows


def norm_formulas(
    module: nn.Embedding, A: torch.Tensor, G: torch.Tensor
) -> dict[str, dict[str, Formula]]:
    """Squared per-sample norms by summing gradient rows per unique (sample, token).

    Never builds the ``(B, V, D)`` gradient nor a ``B·T·V`` one-hot: memory ``O(B·T·D)``.

    Returns:
        ``{"weight": {"rows": Formula}}``.
    """
    T, D = A[0].numel(), module.embedding_dim

    def rows(s: slice) -> torch.Tensor:
        a, b = A[s], A[s].shape[0]
        V = module.num_embeddings
        idx, grad_rows = _rows(module, a, G[s])
        key = (idx + V * torch.arange(b, device=idx.device).unsqueeze(1)).reshape(-1)
        uniq, inverse = torch.unique(key, return_inverse=True)
        summed = grad_rows.new_zeros(len(uniq), grad_rows.shape[-1])
        summed.index_add_(0, inverse, grad_rows.reshape(-1, grad_rows.shape[-1]))
        sq = grad_rows.new_zeros(b)
        sq.index_add_(0, torch.div(uniq, V, rounding_mode="floor"), summed.square().sum(1))
        return sq

    # One pass over the sample's T rows; the whole batch at once (its sort is global).
    return {"weight": {"rows": Formula(rows, flops=T * D, memory=0, ghost=True)}}


def clipped_sum(
    module: nn.Embedding, A: torch.Tensor, G: torch.Tensor, factors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum_i f_i g_i`` by one scatter-add of the scaled rows: ``{"weight": (V, D)}``.

    16-bit rows are scaled by the (float32) factors in float32 and added up in float32,
    and the sum is float32 (``chunks.accumulation_dtype``); float32 and float64 rows are
    not converted.
    """
    idx, rows = _rows(module, A, G)
    wide = accumulation_dtype(rows.dtype)
    scaled = rows * factors["weight"].to(wide).view(-1, 1, 1)  # float32 for 16-bit rows
    out = rows.new_zeros(module.num_embeddings, module.embedding_dim, dtype=wide)
    out.index_add_(0, idx.reshape(-1), scaled.reshape(-1, rows.shape[-1]))
    return {"weight": out}


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
    idx, rows = _rows(module, A, G)
    flat_idx = (idx + V * torch.arange(B, device=idx.device).unsqueeze(1)).reshape(-1)
    grad = torch.zeros(B * V, D, dtype=G.dtype, device=G.device)
    grad.index_add_(0, flat_idx, rows.reshape(-1, D))
    return {"weight": grad.view(B, V, D)}


RULES = (LayerRule(nn.Embedding, per_sample_grads, norm_formulas, clipped_sum),)
"""The embedding rule."""
