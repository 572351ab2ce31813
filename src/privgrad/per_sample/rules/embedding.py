"""Per-sample rules for ``nn.Embedding`` (``padding_idx`` rows receive no gradient)."""

from __future__ import annotations

import torch
from torch import nn

from privgrad.per_sample import chunks
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


def _summed_rows(
    module: nn.Embedding, A: torch.Tensor, G: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's gradient row per token it holds: ``(keys (n,), rows (n, D))``.

    ``key = sample · V + token`` over the ``n`` distinct (sample, token) pairs, sorted;
    the rows of a token's positions are summed in position order, in ``accumulation_dtype``
    (float32 for 16-bit rows). The norm and the clipped sum both use these very rows, so
    a sample's contribution is its factor times the tensor its norm was taken of.
    """
    b, V = A.shape[0], module.num_embeddings
    idx, rows = _rows(module, A, G)
    rows = rows.to(accumulation_dtype(rows.dtype))
    key = (idx + V * torch.arange(b, device=idx.device).unsqueeze(1)).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = rows.new_zeros(len(uniq), rows.shape[-1])
    summed.index_add_(0, inverse, rows.reshape(-1, rows.shape[-1]))
    return uniq, summed


def norm_formulas(
    module: nn.Embedding, A: torch.Tensor, G: torch.Tensor
) -> dict[str, dict[str, Formula]]:
    """Squared per-sample norms of the summed rows (``_summed_rows``).

    Never builds the ``(B, V, D)`` gradient nor a ``B·T·V`` one-hot: memory ``O(B·T·D)``.

    Returns:
        ``{"weight": {"rows": Formula}}``.
    """
    T, D, V = A[0].numel(), module.embedding_dim, module.num_embeddings

    def rows(s: slice) -> torch.Tensor:
        uniq, summed = _summed_rows(module, A[s], G[s])
        # a row's D squares are summed pairwise in float32; a sample's up to T rows are
        # added in float64, where float32 could round each one down
        sq = summed.new_zeros(A[s].shape[0], dtype=torch.float64)
        sq.index_add_(0, torch.div(uniq, V, rounding_mode="floor"),
                      summed.square().sum(1).double())
        return sq

    # One pass over the sample's T rows; the whole batch at once (its sort is global).
    return {"weight": {"rows": Formula(rows, flops=T * D, memory=0, ghost=True)}}


def masses(module: nn.Embedding, A: torch.Tensor, G: torch.Tensor) -> dict[str, Formula]:
    """``{"weight": Formula}``: ``Σ_t ‖row_t‖`` per sample (padding rows excluded).

    A bound on the weight gradient's norm without cancellation (``rule.MassesFn``). The
    norm and the clipped sum are of the same summed rows on the CPU; on a GPU,
    ``index_add_`` sums them in no fixed order, so the two can round differently, by at
    most a rounding of the mass.
    """
    if not module.weight.requires_grad:
        return {}

    def weight(s: slice) -> torch.Tensor:
        return chunks.row_norms(_rows(module, A[s], G[s])[1]).sum(1, dtype=torch.float64)

    return {"weight": Formula(weight, A[0].numel() * module.embedding_dim, 0, ghost=True)}


def clipped_sum(
    module: nn.Embedding, A: torch.Tensor, G: torch.Tensor, factors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum_i f_i g_i`` by one scatter-add of the scaled summed rows: ``{"weight": (V, D)}``.

    Each sample's row of a token is the sum ``_summed_rows`` forms for the norm, scaled by
    the factor (float32 for 16-bit rows) and added into the table once: adding a
    sample's ``T`` rows one at a time would round them relative to the running row, and a
    sample with rows ``+X, ε, …, −X`` at one token moved the sum by 3.2·C that way. The
    sum is in ``chunks.accumulation_dtype``; float32 and float64 rows are not converted.
    """
    V = module.num_embeddings
    uniq, summed = _summed_rows(module, A, G)
    f = factors["weight"].to(summed.dtype)[torch.div(uniq, V, rounding_mode="floor")]
    out = summed.new_zeros(V, module.embedding_dim)
    out.index_add_(0, uniq % V, summed.mul_(f.unsqueeze(1)))  # summed is ours
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


RULES = (LayerRule(nn.Embedding, per_sample_grads, norm_formulas, clipped_sum, masses),)
"""The embedding rule."""
