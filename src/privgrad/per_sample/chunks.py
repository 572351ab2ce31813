"""Per-sample reductions that never allocate a large intermediate.

A per-sample norm that goes through a large intermediate (an im2col matrix ``(B, d, L)``,
per-sample gradients ``(B, p, d)``, Gram matrices ``(B, L, L)``) is computed a chunk of
samples at a time, so that the intermediate never exceeds ``CHUNK_ELEMENTS`` elements.
The result is exactly the same (each sample's value depends on that sample alone); it is
faster on CPU, where a freshly allocated tensor of tens of MB costs a page fault per 4 KB
page on every step, while a few-MB one is reused from the heap and stays in cache; and it
bounds the extra memory of a step.

Precision: a clipped sum of 16-bit values is accumulated in float32
(``accumulation_dtype``). Summed in 16 bits, the sum's own rounding (relative ``2^-8`` for
bfloat16, on a value up to ``B·C`` long when the samples' gradients are aligned) would let
one sample move it by several ``C``; and a factor rounded to 16 bits before it is applied
can make a clipped contribution ``C·(1 + 2^-9)`` long. So the factors (float32, from
float32 norms) are applied to the 16-bit per-sample values in float32 and the products
summed in float32: ``scale_smaller``, ``weighted_sum`` and each rule's ``clipped_sum``.
For float32 and float64 values nothing is converted or copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch

Out = TypeVar("Out", torch.Tensor, dict[str, torch.Tensor])

HALF = (torch.float16, torch.bfloat16)
"""The 16-bit floating dtypes, whose clipped sums are accumulated in float32."""

CHUNK_ELEMENTS = 1 << 19
"""Largest intermediate per chunk on the CPU, in elements (2 MiB of float32)."""

CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
"""Largest intermediate per chunk on other devices (256 MiB of float32): a GPU caches
its allocations, and small chunks would only add kernel launches and Python overhead."""


def chunk_size(
    batch_size: int,
    elements_per_sample: int,
    device: torch.device | None = None,
    cpu_budget: int | None = None,
) -> int:
    """Samples per chunk (at least 1) whose intermediates fit the device's budget.

    ``chunk · elements_per_sample <= CHUNK_ELEMENTS`` (or ``cpu_budget``) on the CPU (or
    when ``device`` is ``None``), ``<= CHUNK_ELEMENTS_ACCELERATOR`` elsewhere.
    """
    budget = (CHUNK_ELEMENTS if cpu_budget is None else cpu_budget) if (
        device is None or device.type == "cpu") else CHUNK_ELEMENTS_ACCELERATOR
    return max(1, min(int(batch_size), budget // max(1, int(elements_per_sample))))


def per_sample_chunked(
    fn: Callable[[slice], Out],
    batch_size: int,
    elements_per_sample: int,
    device: torch.device | None = None,
) -> Out:
    """Concatenates ``fn(chunk)`` over batch chunks.

    Each chunk's values are copied into the ``(B, ...)`` result as soon as they are
    computed, so at most one chunk's values exist beside the result (``torch.cat`` of
    all the chunks would briefly hold the result twice).

    Args:
        fn: Maps a slice of sample indices to that chunk's per-sample values: a tensor
            ``(b, ...)`` or a dict of them.
        batch_size: ``B``.
        elements_per_sample: Size of ``fn``'s largest intermediate per sample.
        device: Where ``fn`` computes (its chunk budget, ``chunk_size``).

    Returns:
        ``(B, ...)`` values (or a dict of them), identical to ``fn(slice(0, B))``.
    """
    step = chunk_size(batch_size, elements_per_sample, device)
    if step >= batch_size:
        return fn(slice(0, batch_size))
    out = None
    for start in range(0, batch_size, step):
        part = fn(slice(start, min(start + step, batch_size)))
        parts = part if isinstance(part, dict) else {None: part}
        if out is None:
            out = {k: v.new_empty(batch_size, *v.shape[1:]) for k, v in parts.items()}
        for k, v in parts.items():
            out[k][start:start + v.shape[0]] = v
    return out if isinstance(part, dict) else out[None]


NORM_BLOCK_ELEMENTS = 1 << 18
"""Elements of ``x`` squared at a time by ``squared_norms``."""


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sums of squares of each sample's row of ``x (B, ...)``, accurately.

    A clip factor is only as good as this sum: computed too small, it lets the sample
    contribute more than ``C``. ``torch.linalg.vector_norm`` in float32 accumulates
    without pairwise summation on the CPU (a row of 16.8M values 0.1 came out 1.9% short
    on one thread; a Linear(4096) sample then contributed 1.0125·C), so the squares are
    summed by ``torch.sum`` (pairwise on the CPU) a block of columns at a time
    (``NORM_BLOCK_ELEMENTS`` on the CPU, so the squared block stays in cache; a GPU's
    reduction is a tree, and its blocks are ``CHUNK_ELEMENTS_ACCELERATOR``) and the sums are
    added in float64. Half precision is squared in float32. The result is float32 for
    16-bit and float32 ``x``, float64 for float64.
    """
    B, N = x.shape[0], math.prod(x.shape[1:])
    rows = x.reshape(B, N)
    wide = accumulation_dtype(rows.dtype)
    acc = torch.zeros(B, dtype=torch.float64, device=x.device)
    budget = NORM_BLOCK_ELEMENTS if x.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
    cols = max(1, min(N, max(1024, budget // max(B, 1))))
    per = max(1, budget // cols)  # samples per block
    for r in range(0, B, per):
        for c in range(0, N, cols):
            block = rows[r:r + per, c:c + cols].to(wide)
            acc[r:r + per] += (block * block).sum(1, dtype=wide)
    return acc.to(wide)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """``(*x.shape[:-1])`` Euclidean norms of ``x``'s last dimension, float32 or wider.

    For a per-sample mass (``rule.MassesFn``) this is enough: the mass only sets a floor a
    thousand times below itself, so ``vector_norm``'s float32 accumulation (a few percent
    short over millions of values, ``squared_norms``) moves that floor by as much.
    """
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32 if x.dtype in HALF else None)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a clipped sum of ``dtype`` values is accumulated in: float32 for 16 bits.

    Every other dtype is its own (no conversion, no copy for float32 and float64).
    """
    return torch.float32 if dtype in HALF else dtype


def scale_smaller(
    A: torch.Tensor, G: torch.Tensor, factors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales sample ``i`` of the smaller of ``A (B, ...)`` and ``G (B, ...)`` by ``f_i``.

    A weight gradient is bilinear in each sample's ``(A_i, G_i)``, so ``sum_i f_i g_i`` is
    the ordinary weight gradient of either scaled pair; scaling the smaller one copies
    less (a language-model head's ``G`` is vocabulary-wide, a first conv's ``A`` is small).

    Both come back in ``accumulation_dtype``: for 16-bit ``A`` and ``G``, the product
    ``f_i · x`` is taken in float32 (the factor is not rounded to 16 bits) and the other
    one is widened exactly, so that the weight-gradient kernel they go to accumulates in
    float32. Float32 and float64 tensors are used as they are.

    Returns:
        ``(A', G')`` with exactly one of them scaled.
    """
    wide = accumulation_dtype(G.dtype)
    f = factors.to(wide)
    if A.numel() < G.numel():
        return A * f.view(-1, *([1] * (A.dim() - 1))), G.to(wide)
    return A.to(wide), G * f.view(-1, *([1] * (G.dim() - 1)))


def weighted_sum(factors: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``Σ_i f_i g_i`` for ``factors (B,)`` and materialised ``grads (B, *shape)``: ``shape``.

    Float32 and float64 gradients: one ``tensordot`` (the factors in the gradients' dtype).
    16-bit gradients: the factors (float32) are applied in float32 and the products summed
    in float32 (the result is float32), a chunk of samples widened at a time
    (``chunk_size``), so no float32 copy of all ``B`` per-sample gradients is made.
    """
    wide = accumulation_dtype(grads.dtype)
    if wide == grads.dtype:
        return torch.tensordot(factors.to(grads.dtype), grads, dims=1)
    B, f = grads.shape[0], factors.to(wide)
    rows = grads.reshape(B, math.prod(grads.shape[1:]))  # B may be 0
    out = torch.zeros(rows.shape[1], dtype=wide, device=grads.device)
    step = chunk_size(B, rows.shape[1], grads.device)
    for start in range(0, B, step):
        s = slice(start, min(start + step, B))
        out.addmv_(rows[s].T.to(wide), f[s])
    return out.view(grads.shape[1:])


def scaled(factors: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``factors[:, None, ...] * grads``: each sample's gradient times its factor.

    In ``accumulation_dtype(grads.dtype)``: float32 for 16-bit ``grads`` (the product of a
    float32 factor and a 16-bit value, not rounded back to 16 bits, whose norm is at most
    ``C`` as the clipped sum has it); ``grads``' own dtype otherwise.
    """
    wide = accumulation_dtype(grads.dtype)
    return factors.reshape(-1, *([1] * (grads.dim() - 1))).to(wide) * grads
