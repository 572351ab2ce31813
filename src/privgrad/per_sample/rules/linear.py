"""Per-sample rules for ``nn.Linear`` on inputs of any rank ``(B, *, d)``."""

from __future__ import annotations

import torch
from torch import nn

from privgrad.per_sample import chunks
from privgrad.per_sample.rule import FLOAT64_COST, Formula, LayerRule, trainable


def _flat(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshapes ``A (B, *, d)`` and ``G (B, *, p)`` to ``(B, T, d)`` and ``(B, T, p)``."""
    B = A.shape[0]
    return A.reshape(B, -1, A.shape[-1]), G.reshape(B, -1, G.shape[-1])


def _bias_grads(G3: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, p)`` per-sample bias gradients of ``G3 (B, T, p)``: a view when ``T = 1``.

    On single vectors (an MLP) a sum over one position would copy ``G`` for nothing.
    ``dtype``: the result's (the sum over positions accumulated in it), default ``G3``'s.
    """
    dtype = G3.dtype if dtype is None else dtype
    return G3[:, 0].to(dtype) if G3.shape[1] == 1 else G3.sum(dim=1, dtype=dtype)


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
        out["bias"] = _bias_grads(G3)
    return out


def norm_formulas(
    module: nn.Linear, A: torch.Tensor, G: torch.Tensor
) -> dict[str, dict[str, Formula]]:
    """The exact formulas of the squared per-sample norms, with their costs.

    For ``T = 1`` the weight gradient is an outer product and its squared norm is
    ``‖a‖²‖g‖²`` (``outer``). For ``T > 1``: the ghost norm ``sum((A Aᵀ) ⊙ (G Gᵀ))``
    (``ghost``: ``T²(d + p)`` multiply-adds per sample, two ``T × T`` intermediates), or
    the norm of the materialised ``Gᵀ A`` (``materialized``: ``T·d·p``, a ``p × d`` one).

    The ghost norm is computed in float64 (and its cost counted ``FLOAT64_COST`` times):
    it is a sum of ``T²`` signed terms as large as the sample's squared mass
    (``masses``), and a sample whose positions cancel (``a_0 = a_1``, ``g_1 = −g_0 + δ``)
    has a norm far below them. In float32 its rounding error, about ``2^-24·M²``, was
    larger than the norm at a cancellation of ``M/‖g‖ = 10³`` — the factor came out 1
    and the sample moved the clipped sum by ``10·C``. In float64 its worst case up to
    the cancellation ``ghost.MAX_CANCELLATION`` (beyond which the mass bounds the norm)
    is ``(d + p + T²)·2^-53·MAX_CANCELLATION²`` relative: 6e-7 at ``T = 64``,
    ``d = p = 768``; 1e-4 at ``T = 1024``, ``d + p = 10⁴``.

    Args:
        module: The layer.
        A: Input ``(B, *, d)``.
        G: Output gradient ``(B, *, p)``.

    Returns:
        ``{"weight": {...}, "bias": {...}}``, trainable parameters only.
    """
    A3, G3 = _flat(A, G)
    T, d, p = A3.shape[1], A3.shape[2], G3.shape[2]

    def outer(s: slice) -> torch.Tensor:
        return chunks.squared_norms(A3[s]) * chunks.squared_norms(G3[s])

    def ghost(s: slice) -> torch.Tensor:
        a, g = A3[s].double(), G3[s].double()
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    def materialized(s: slice) -> torch.Tensor:
        return chunks.squared_norms(torch.bmm(G3[s].transpose(1, 2), A3[s]))

    def bias(s: slice) -> torch.Tensor:
        return chunks.squared_norms(_bias_grads(G3[s]))

    out = {}
    if trainable(module.weight):
        out["weight"] = {"outer": Formula(outer, d + p, 0, ghost=True)} if T == 1 else {
            "ghost": Formula(ghost, FLOAT64_COST * T * T * (d + p),
                             FLOAT64_COST * max(T * max(d, p), 2 * T * T), ghost=True),
            "materialized": Formula(materialized, T * d * p, p * d, ghost=False),
        }
    if trainable(module.bias):
        out["bias"] = {"sum": Formula(bias, T * p, p, ghost=True)}
    return out


def masses(module: nn.Module, A: torch.Tensor, G: torch.Tensor) -> dict[str, Formula]:
    """``{"weight": Formula}``: ``Σ_t ‖a_t‖·‖g_t‖`` per sample (float64), for ``T > 1``.

    It bounds the weight gradient ``Σ_t g_t a_tᵀ``'s norm and has no cancellation
    (``rule.MassesFn``). Left out for ``T = 1`` (the ``outer`` norm is a product of two
    norms, which cannot cancel) and for the bias, whose norm is taken of the very
    per-sample sum ``Σ_t g_t`` that ``clipped_sum`` adds up.
    """
    A3, G3 = _flat(A, G)
    if A3.shape[1] == 1 or not trainable(module.weight):
        return {}

    def weight(s: slice) -> torch.Tensor:
        return (chunks.row_norms(A3[s]).double() * chunks.row_norms(G3[s]).double()).sum(1)

    return {"weight": Formula(weight, A3.shape[1] * (A3.shape[2] + G3.shape[2]), 0, ghost=True)}


def clipped_sum(
    module: nn.Linear, A: torch.Tensor, G: torch.Tensor, factors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum_i f_i g_i`` as the matmul ``(f ⊙ G)ᵀ A`` over all samples and positions.

    The factor scales the smaller of ``A`` and ``G`` (``chunks.scale_smaller``), on the
    CPU a chunk of samples at a time (``_weighted_weight_grad``). For 16-bit ``A`` and
    ``G`` the scaled and the unscaled operand are float32 (exact widening, the factor
    applied in float32) and the matmul accumulates in float32; the sums are float32
    (``chunks.accumulation_dtype``). Float32 and float64 calls are not converted.

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
        out["weight"] = _weighted_weight_grad(A3, G3, factors["weight"])
    if "bias" in factors:
        wide = chunks.accumulation_dtype(G3.dtype)
        out["bias"] = factors["bias"].to(wide) @ _bias_grads(G3, wide)
    return out


SCALED_ELEMENTS = 1 << 15
"""Largest scaled copy of ``A`` or ``G`` per chunk of ``clipped_sum`` on the CPU, in elements
(128 KiB of float32), unless that would take more than ``MAX_SCALED_CHUNKS`` chunks."""

MAX_SCALED_CHUNKS = 4
"""At most this many chunks (matmuls) per ``clipped_sum``: many small matmuls cost more than
the scaled copies they save (docs/performance.md)."""


def _weighted_weight_grad(A3: torch.Tensor, G3: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``(p, d)`` = ``Σ_i f_i G_iᵀ A_i`` for ``A3 (B, T, d)``, ``G3 (B, T, p)``, ``f (B,)``.

    On the CPU the scaled copy is made a chunk of samples at a time (``SCALED_ELEMENTS``,
    ``MAX_SCALED_CHUNKS``) and each chunk's product is accumulated into the result
    (``addmm_``). A scaled copy of the whole ``A`` or ``G`` is as large as the layer's
    activations; in an MLP at B = 256 it was the step's peak memory, above the gradients
    and the recorded inputs and output gradients. On other devices, one matmul.

    16-bit inputs: each chunk's two operands are float32 (``chunks.scale_smaller``), so
    the products and their sum are float32: two float32 copies of a chunk rather than
    one 16-bit copy, the price of a clipped sum that one sample moves by at most ``C``.
    """
    B, T = A3.shape[0], A3.shape[1]
    per_sample = T * min(A3.shape[2], G3.shape[2])
    step = max(chunks.chunk_size(B, per_sample, A3.device, SCALED_ELEMENTS),
               -(-B // MAX_SCALED_CHUNKS))
    out = None
    for start in range(0, B, step):
        s = slice(start, min(start + step, B))
        A3s, G3s = chunks.scale_smaller(A3[s], G3[s], f[s])
        left, right = G3s.reshape(-1, G3.shape[2]).T, A3s.reshape(-1, A3.shape[2])
        if out is None:
            out = left @ right
        else:
            out.addmm_(left, right)
        del A3s, G3s, left, right  # one chunk's scaled copy at a time
    if out is None:  # no samples
        return G3.new_zeros(G3.shape[2], A3.shape[2], dtype=chunks.accumulation_dtype(G3.dtype))
    return out


RULES = (LayerRule(nn.Linear, per_sample_grads, norm_formulas, clipped_sum, masses),)
"""The Linear rule."""


# Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP): a Linear
# whose weight is stored transposed, ``(d, p)``: ``y = x @ W + b``. Its per-sample
# gradients are the transposes of a Linear's, so the norms are the same formulas.


def conv1d_per_sample_grads(
    module: nn.Module, A: torch.Tensor, G: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{"weight": (B, d, p), "bias": (B, p)}`` of a ``Conv1D``, trainable parameters only."""
    A3, G3 = _flat(A, G)
    out = {}
    if trainable(module.weight):
        out["weight"] = torch.bmm(A3.transpose(1, 2), G3)
    if trainable(module.bias):
        out["bias"] = _bias_grads(G3)
    return out


def conv1d_clipped_sum(
    module: nn.Module, A: torch.Tensor, G: torch.Tensor, factors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{"weight": (d, p), "bias": (p,)}``: ``sum_i f_i g_i`` of a ``Conv1D``."""
    A3, G3 = _flat(A, G)
    out = {}
    if "weight" in factors:
        out["weight"] = _weighted_weight_grad(G3, A3, factors["weight"])  # Σ f Aᵀ G
    if "bias" in factors:
        wide = chunks.accumulation_dtype(G3.dtype)
        out["bias"] = factors["bias"].to(wide) @ _bias_grads(G3, wide)
    return out


NAMED_RULES = {
    "transformers.pytorch_utils.Conv1D": LayerRule(
        nn.Module, conv1d_per_sample_grads, norm_formulas, conv1d_clipped_sum, masses),
}
"""Rules for classes of optional libraries, by ``module.qualname`` (never imported here)."""
