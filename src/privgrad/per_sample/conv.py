"""Per-sample rules for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

Any stride, dilation, groups and padding (numbers, ``"same"``, ``"valid"``, and the
``reflect``/``replicate``/``circular`` padding modes). The per-sample weight gradient is
one call of the convolution weight-gradient kernel with the batch folded into the groups:
sample ``b``, group ``j`` becomes group ``b * groups + j`` — exact, and as fast as the
kernel the non-private backward uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from privgrad.per_sample import autotune, chunks
from privgrad.per_sample.registry import LayerRule, register, trainable

_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _pads(module: _Conv) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as the module applies it."""
    n = len(module.kernel_size)
    if module.padding == "valid":
        return [(0, 0)] * n
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def padded_input(module: _Conv, A: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Applies the module's padding explicitly when a kernel cannot.

    Returns:
        The (possibly padded) input and the symmetric zero padding still to apply.
    """
    pads = _pads(module)
    symmetric = all(lo == hi for lo, hi in pads)
    if module.padding_mode == "zeros" and symmetric:
        return A, [lo for lo, _ in pads]
    flat = [x for lo_hi in reversed(pads) for x in lo_hi]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(A, flat, mode=mode), [0] * len(pads)


def _weight_grad(module: _Conv, A: torch.Tensor, G: torch.Tensor, folds: int) -> torch.Tensor:
    """Convolution weight gradient with ``folds`` samples folded into the groups."""
    A, padding = padded_input(module, A)
    B = A.shape[0] // folds
    w_shape = (folds * module.out_channels, *module.weight.shape[1:])
    n = len(module.kernel_size)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        G.reshape(B, folds * G.shape[1], *G.shape[2:]),
        A.reshape(B, folds * A.shape[1], *A.shape[2:]),
        G.new_empty(1).expand(w_shape),
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * n,
        folds * module.groups,
        [False, True, False],
    )
    return grad_w


def per_sample_grads(module: _Conv, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a convolution.

    By the convolution weight-gradient kernel with the batch folded into the groups, or
    as ``G Aᵀ`` on the unfolded input in batch chunks, whichever was measured
    faster for this layer shape.

    Args:
        module: The layer.
        A: Input, shape ``(B, C_in, *spatial)``.
        G: Output gradient, shape ``(B, C_out, *spatial_out)``.

    Returns:
        ``{"weight": (B, C_out, C_in / groups, *kernel), "bias": (B, C_out)}``, trainable
        parameters only.
    """
    out = {}
    if trainable(module.weight):
        out["weight"] = _weight_grads(module, A, G)
    if trainable(module.bias):
        out["bias"] = G.flatten(2).sum(dim=2)
    return out


def _key(tag: str, module: _Conv, A: torch.Tensor, G: torch.Tensor) -> tuple:
    """What a measured choice for this layer depends on (``autotune.fastest``)."""
    return (tag, module.kernel_size, module.stride, module.dilation, module.padding,
            module.padding_mode, module.groups, tuple(A.shape[1:]), tuple(G.shape[1:]),
            A.dtype, A.device.type, autotune.batch_bucket(A.shape[0]))


def _weight_grads(module: _Conv, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``(B, *weight.shape)`` per-sample weight gradients, by the measured faster formula."""
    B, g = A.shape[0], module.groups
    L, d, p = math.prod(G.shape[2:]), module.weight[0].numel(), module.out_channels // g
    if B == 0:
        return G.new_zeros(0, *module.weight.shape)

    def grouped() -> torch.Tensor:
        def chunk(s: slice) -> torch.Tensor:
            b, a, o = A[s].shape[0], A[s], G[s]
            if a.dtype in chunks.HALF and a.device.type == "cpu":
                # PyTorch's CPU kernel runs a 16-bit grouped weight gradient one group at a
                # time (2048 samples of a 16→16 Conv1d on 4 positions: 9 s); in float32,
                # rounded once to the call's dtype, it is one fast call (and exact in float32)
                return _weight_grad(module, a.float(), o.float(), folds=b).to(a.dtype).view(
                    b, *module.weight.shape)
            return _weight_grad(module, a, o, folds=b).view(b, *module.weight.shape)

        # In chunks: the kernel's own buffers grow with the folded batch, and it slows
        # down with many groups (the benchmark CNN's 64→64 conv on 8×8 at B = 64: 7.8 ms
        # in one call, 1.5 ms in chunks of 16 samples).
        return chunks.per_sample_chunked(chunk, B, g * d * p, A.device)

    def unfold() -> torch.Tensor:
        def chunk(s: slice) -> torch.Tensor:
            grads_t = _grads_by_unfold(module, A[s], G[s])
            return grads_t.transpose(1, 2).reshape(-1, *module.weight.shape)

        return chunks.per_sample_chunked(chunk, B, g * (d * L + p * d), A.device)

    return autotune.fastest(_key("conv-grads", module, A, G),
                            {"grouped": grouped, "unfold": unfold})


def _unfolded(module: _Conv, A: torch.Tensor) -> torch.Tensor:
    """Im2col of a 1d/2d/3d input: ``(B, groups, C_in/groups · K, L)``.

    The patches are a strided view of the padded input (kernel offsets step by the
    dilation, output positions by the stride), copied once into the layout of
    ``F.unfold`` (channel, then kernel offsets; positions last); that one copy was measured
    3–10× faster than ``F.unfold``'s kernel on the benchmark CNN's layers (CPU), and it
    also covers 3d.
    """
    A = _fully_padded(module, A)
    n = len(module.kernel_size)
    B, C = A.shape[0], A.shape[1]
    out = _out_shape(module, A.shape[2:])
    strides = A.stride()
    view = A.as_strided(
        (B, C, *module.kernel_size, *out),
        (strides[0], strides[1], *(strides[2 + i] * module.dilation[i] for i in range(n)),
         *(strides[2 + i] * module.stride[i] for i in range(n))),
    )
    L = math.prod(out)
    return view.reshape(B, module.groups, -1, L)


def _fully_padded(module: _Conv, A: torch.Tensor) -> torch.Tensor:
    """The input with all of the module's padding applied, contiguous."""
    A, padding = padded_input(module, A)
    if any(padding):
        A = F.pad(A, [x for p in reversed(padding) for x in (p, p)])
    return A.contiguous()


def _out_shape(module: _Conv, padded: Sequence[int]) -> list[int]:
    """Output spatial shape of the convolution of a fully padded input of shape ``padded``."""
    return [(padded[i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1)
            // module.stride[i] + 1 for i in range(len(module.kernel_size))]


def _gram_sq_norms(module: _Conv, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ghost norms from the channel Gram matrix of the padded input.

    The unfolded rows of output positions ``o, o'`` have inner product
    ``Σ_k M[o·s + k·δ, o'·s + k·δ]`` (stride ``s``, dilation ``δ``, kernel offsets ``k``),
    where ``M = Xᵀ X`` is the Gram matrix of the padded input over its channels. So ``A Aᵀ``
    needs ``P²·c`` multiply-adds for ``M`` (``P`` padded positions, ``c = C_in/groups``)
    instead of ``L²·c·K`` on the unfolded input: ``K·(L/P)²`` times fewer (9 × (64/100)²
    ≈ 3.7 for a 3×3 conv on 8×8 at padding 1). The sum over the kernel offsets is taken on
    ``M`` flattened (``_diagonal_shift_sums``), then the output positions' entries are read
    from it through one strided view.
    """
    B, g = A.shape[0], module.groups
    X = _fully_padded(module, A)
    space = X.shape[2:]
    out, P, n = _out_shape(module, space), math.prod(space), len(space)
    L = math.prod(out)
    X = X.reshape(B * g, -1, P)
    place = [math.prod(space[i + 1:]) for i in range(n)]  # flat stride of each spatial dim
    held = [torch.bmm(X.transpose(1, 2), X)]  # M (B·g, P, P), positions row-major both sides
    del X
    S = _diagonal_shift_sums(held, P, [module.dilation[i] * place[i] for i in range(n)],
                             module.kernel_size)  # empties held: M is freed after one pass
    step = [module.stride[i] * place[i] for i in range(n)]
    cols_gram = S.as_strided((B * g, *out, *out), (S.stride(0), *(P * t for t in step), *step),
                             S.storage_offset())
    gram_g = _output_gram(G, g).view(B * g, *out, *out)  # fresh and contiguous
    return gram_g.mul_(cols_gram).view(B * g, L * L).sum(1).view(B, g).sum(1)


def _diagonal_shift_sums(
    held: list[torch.Tensor], P: int, shifts: Sequence[int], kernel_size: Sequence[int]
) -> torch.Tensor:
    """``S[u·P + v] = Σ_k M[u + s_k, v + s_k]`` for ``M (N, P, P)``: ``(N, ·)``.

    ``held`` is ``[M]``, emptied here, so that ``M`` is freed once the first pass is done
    (at most two ``P²`` buffers per sample and group are alive).

    ``s_k = Σ_i k_i·shifts[i]`` over the kernel offsets ``k``. In the flattened ``M``, entry
    ``(u + s, v + s)`` sits ``s·(P + 1)`` after ``(u, v)`` as long as ``v + s < P`` (no wrap
    into the next row), which holds for every pair of output positions: their patches lie
    inside the padded input. So the sum is separable: one
    pass per spatial dimension adds ``kernel_size[i]`` contiguous slices, ``Σ_i (K_i - 1)``
    additions over ``P²`` values in all (a 3×3 kernel: 4 instead of 8 strided ones over the
    output positions, 7× faster for the benchmark CNN's 64→64 conv on 8×8). The result is
    ``s_max·(P + 1)`` shorter than ``P²``: every ``(u, v)`` of an output position is kept.
    """
    cur = held.pop()
    cur = cur.reshape(cur.shape[0], P * P)
    for shift, k in zip(reversed(shifts), reversed(kernel_size), strict=True):
        if k == 1:
            continue
        d = shift * (P + 1)
        length = cur.shape[1] - (k - 1) * d
        nxt = torch.add(cur[:, :length], cur[:, d:d + length])
        for j in range(2, k):
            nxt.add_(cur[:, j * d:j * d + length])
        cur = nxt
    return cur


def _output_gram(G: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B · groups, L, L)``: per sample and group, ``Gᵀ G`` over the output positions."""
    Gg = G.reshape(G.shape[0] * groups, G.shape[1] // groups, -1)
    return torch.bmm(Gg.transpose(1, 2), Gg)


def _grads_by_unfold(module: _Conv, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``(B · groups, d, p)``: each sample's and group's weight gradient, transposed.

    ``cols Gᵀ`` on the unfolded input; the batched kernel is faster with the short side
    (``d`` for an input layer of a few channels) first, and no slower otherwise.
    """
    B, g = A.shape[0], module.groups
    cols = _unfolded(module, A)
    cols = cols.reshape(B * g, cols.shape[2], cols.shape[3])
    right = G.reshape(B * g, module.out_channels // g, -1).transpose(1, 2)
    if right.dtype in chunks.HALF:  # PyTorch's CPU bmm of a transposed 16-bit operand was
        right = right.contiguous()  # 80× slower (546 samples of 48×4 @ 4×16: 1.8 s, 0.02 s)
    return torch.bmm(cols, right)


def squared_norms(
    module: _Conv, A: torch.Tensor, G: torch.Tensor, strategy: str = "cost"
) -> dict[str, torch.Tensor]:
    """Squared per-sample norms, by the ghost norm or by a materialised gradient.

    With ``L`` output positions, ``d = C_in/groups · K`` and ``p = C_out/groups``:

    * ghost: per group ``⟨A Aᵀ, G Gᵀ⟩`` over positions on the unfolded input;
    * gram: the same ``⟨A Aᵀ, G Gᵀ⟩`` with ``A Aᵀ`` summed over the kernel offsets from
      the Gram matrix of the padded input over its channels (``_gram_sq_norms``: up to
      ``K``× fewer FLOPs for ``A Aᵀ`` at stride 1 on large images, more with large strides);
    * grouped: the per-sample gradient from one weight-gradient kernel with the batch
      folded into the groups, reduced at once;
    * unfold: the per-sample gradient as ``G Aᵀ`` with a batched matmul.

    ``strategy="cost"`` takes a ghost norm when ``2L² < d·p``, else grouped; ``"measure"``
    times the candidates once per layer shape and keeps the fastest (ghost is not timed
    when ``2L² > 4·d·p``, gram not when it needs over 4× the FLOPs of a materialised
    gradient); ``"ghost"`` forces a ghost norm. A ghost norm is computed by whichever of
    ghost and gram needs fewer FLOPs.

    Returns:
        ``{"weight": (B,), "bias": (B,)}``, trainable parameters only.
    """
    out = {}
    if trainable(module.weight):
        out["weight"] = _weight_sq_norms(module, A, G, strategy)
    if trainable(module.bias):
        out["bias"] = chunks.squared_norms(G.flatten(2).sum(dim=2))
    return out


def _weight_sq_norms(
    module: _Conv, A: torch.Tensor, G: torch.Tensor, strategy: str
) -> torch.Tensor:
    """``(B,)`` squared per-sample weight-gradient norms (see ``squared_norms``)."""
    B, g = A.shape[0], module.groups
    L, d, p = math.prod(G.shape[2:]), module.weight[0].numel(), module.out_channels // g
    if B == 0:
        return G.new_zeros(0)

    def ghost(s: slice) -> torch.Tensor:
        a, b = A[s], A[s].shape[0]
        cols = _unfolded(module, a).reshape(b * g, d, L)
        gram = torch.bmm(cols.transpose(1, 2), cols).mul_(_output_gram(G[s], g))
        return gram.sum((1, 2)).view(b, g).sum(1)

    def grouped(s: slice) -> torch.Tensor:
        b = A[s].shape[0]
        return chunks.squared_norms(_weight_grad(module, A[s], G[s], folds=b).view(b, -1))

    def unfold(s: slice) -> torch.Tensor:
        return chunks.squared_norms(_grads_by_unfold(module, A[s], G[s]).view(A[s].shape[0], -1))

    padded = [size + lo + hi for size, (lo, hi) in zip(A.shape[2:], _pads(module), strict=True)]
    P, c = math.prod(padded), module.in_channels // g
    flops = {  # multiply-adds per sample and group
        "ghost": L * L * (d + p), "grouped": L * d * p,
        "gram": P * P * (c + sum(k - 1 for k in module.kernel_size)) + L * L * (p + 1)}
    formulas = {  # formula, largest intermediate per sample
        "ghost": (ghost, g * (d * L + 2 * L * L)),
        "gram": (lambda s: _gram_sq_norms(module, A[s], G[s]),
                 2 * g * P * P + module.in_channels * P),  # L ≤ P: S and G's Gram fit
        "grouped": (grouped, g * p * d),
        "unfold": (unfold, g * (d * L + p * d)),
    }
    cheaper_ghost = min(("ghost", "gram"), key=flops.__getitem__)
    if strategy == "ghost":
        names = [cheaper_ghost]
    elif strategy == "measure":  # a ghost formula is not timed when it needs 4× the FLOPs
        names = ["grouped", "unfold"] + (["ghost"] if 2 * L * L <= 4 * d * p else []) + (
            ["gram"] if flops["gram"] <= 4 * flops["grouped"] else [])
    else:
        names = [cheaper_ghost if 2 * L * L < d * p else "grouped"]
    candidates = {
        n: (lambda fn=formulas[n][0], size=formulas[n][1]:
            chunks.per_sample_chunked(fn, B, size, A.device))
        for n in names
    }
    if len(candidates) == 1:
        return next(iter(candidates.values()))()
    return autotune.fastest(_key("conv", module, A, G), candidates)


def clipped_sum(
    module: _Conv, A: torch.Tensor, G: torch.Tensor, factors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum_i f_i g_i``: one weight-gradient call, samples scaled by their factors.

    The factors scale the smaller of ``A`` and ``G`` (``chunks.scale_smaller``). For
    16-bit ``A`` and ``G`` both go to the kernel in float32 (the factor applied in
    float32), so the sum over samples and positions is accumulated and returned in
    float32: PyTorch's CPU kernel accumulates a 16-bit weight gradient in 16 bits (its
    bfloat16 batch gradient of the test model's conv was 77% off at B = 2048), and a sum
    rounded in 16 bits lets one sample move it by more than ``C``. Float32 and float64
    calls are not converted.
    """
    out = {}
    if "weight" in factors:
        out["weight"] = _weight_grad(module, *chunks.scale_smaller(A, G, factors["weight"]), 1)
    if "bias" in factors:
        wide = chunks.accumulation_dtype(G.dtype)
        per_sample = G.flatten(2).sum(2, dtype=wide)  # (B, C_out)
        out["bias"] = factors["bias"].to(wide) @ per_sample
    return out


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(LayerRule(_t, per_sample_grads, squared_norms, clipped_sum))
