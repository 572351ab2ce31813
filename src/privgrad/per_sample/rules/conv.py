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

from privgrad.per_sample import chunks
from privgrad.per_sample.rule import FLOAT64_COST, Formula, LayerRule, trainable

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

    As ``G Aᵀ`` on the unfolded input on the CPU, by the convolution weight-gradient
    kernel with the batch folded into the groups elsewhere (``_weight_grads``); in batch
    chunks either way.

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


def _weight_grads(module: _Conv, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``(B, *weight.shape)`` per-sample weight gradients.

    Both formulas take ``L·d·p`` multiply-adds per sample and group. On the CPU the
    batched matmul on the unfolded input is used: PyTorch's CPU grouped weight-gradient
    kernel slows down with the number of groups, which here is the batch chunk times the
    layer's groups (docs/performance.md). On other devices the grouped kernel (cuDNN's
    weight gradient, no im2col copy).
    """
    B, g = A.shape[0], module.groups
    L, d, p = math.prod(G.shape[2:]), module.weight[0].numel(), module.out_channels // g
    if B == 0:
        return G.new_zeros(0, *module.weight.shape)
    if A.device.type == "cpu":
        def unfold(s: slice) -> torch.Tensor:
            grads_t = _grads_by_unfold(module, A[s], G[s])
            return grads_t.transpose(1, 2).reshape(-1, *module.weight.shape)

        return chunks.per_sample_chunked(unfold, B, g * (d * L + p * d), A.device)

    def grouped(s: slice) -> torch.Tensor:
        b = A[s].shape[0]
        return _weight_grad(module, A[s], G[s], folds=b).view(b, *module.weight.shape)

    return chunks.per_sample_chunked(grouped, B, g * d * p, A.device)


def _unfolded(module: _Conv, A: torch.Tensor) -> torch.Tensor:
    """Im2col of a 1d/2d/3d input: ``(B, groups, C_in/groups · K, L)``.

    The patches are a strided view of the padded input (kernel offsets step by the
    dilation, output positions by the stride), copied once into the layout of
    ``F.unfold`` (channel, then kernel offsets; positions last): one copy, faster than
    ``F.unfold``'s kernel on the CPU (docs/performance.md), and it also covers 3d.
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
    instead of ``L²·c·K`` on the unfolded input: ``K·(L/P)²`` times fewer. The sum over the
    kernel offsets is taken on
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
    output positions). The result is
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
    if right.dtype in chunks.HALF:  # PyTorch's CPU bmm of a transposed 16-bit operand is
        right = right.contiguous()  # far slower than of a contiguous one (docs/performance.md)
    return torch.bmm(cols, right)


def norm_formulas(
    module: _Conv, A: torch.Tensor, G: torch.Tensor
) -> dict[str, dict[str, Formula]]:
    """The exact formulas of the squared per-sample norms, with their costs.

    With ``L`` output positions, ``P`` padded input positions, ``d = C_in/groups · K``,
    ``c = C_in/groups`` and ``p = C_out/groups``, per sample and group:

    * ``ghost``: ``⟨A Aᵀ, G Gᵀ⟩`` over positions on the unfolded input, ``L²(d + p)``;
    * ``gram``: the same with ``A Aᵀ`` summed over the kernel offsets from the Gram matrix
      of the padded input over its channels (``_gram_sq_norms``),
      ``P²(c + Σ(K_i − 1)) + L²(p + 1)``: fewer on small images with many channels;
    * ``materialized``: the per-sample gradient (as ``_weight_grads`` forms it), ``L·d·p``.

    ``ghost`` and ``gram`` sum ``L²`` signed terms and run in float64, their costs counted
    ``rule.FLOAT64_COST`` times (``linear.norm_formulas`` says why).

    Returns:
        ``{"weight": {...}, "bias": {...}}``, trainable parameters only.
    """
    g, x64 = module.groups, FLOAT64_COST
    L, d, p = math.prod(G.shape[2:]), module.weight[0].numel(), module.out_channels // g
    padded = [size + lo + hi for size, (lo, hi) in zip(A.shape[2:], _pads(module), strict=True)]
    P, c = math.prod(padded), module.in_channels // g

    def ghost(s: slice) -> torch.Tensor:
        a, b = A[s].double(), A[s].shape[0]
        cols = _unfolded(module, a).reshape(b * g, d, L)
        gram = torch.bmm(cols.transpose(1, 2), cols).mul_(_output_gram(G[s].double(), g))
        return gram.sum((1, 2)).view(b, g).sum(1)

    def gram(s: slice) -> torch.Tensor:
        return _gram_sq_norms(module, A[s].double(), G[s].double())

    def materialized(s: slice) -> torch.Tensor:  # as _weight_grads forms it, untransposed
        b = A[s].shape[0]
        if A.device.type == "cpu":
            return chunks.squared_norms(_grads_by_unfold(module, A[s], G[s]).view(b, -1))
        return chunks.squared_norms(_weight_grad(module, A[s], G[s], folds=b).view(b, -1))

    def bias(s: slice) -> torch.Tensor:
        return chunks.squared_norms(G[s].flatten(2).sum(dim=2))

    out = {}
    if trainable(module.weight):
        out["weight"] = {
            "ghost": Formula(ghost, x64 * g * L * L * (d + p),
                             x64 * g * (d * L + 2 * L * L), ghost=True),
            "gram": Formula(gram, x64 * g * (P * P * (c + sum(k - 1 for k in module.kernel_size))
                                             + L * L * (p + 1)),
                            x64 * (2 * g * P * P + module.in_channels * P), ghost=True),
            "materialized": Formula(materialized, g * L * d * p, g * (d * L + p * d),
                                    ghost=False),
        }
    if trainable(module.bias):
        out["bias"] = {"sum": Formula(bias, L * module.out_channels, module.out_channels,
                                      ghost=True)}
    return out


def masses(module: _Conv, A: torch.Tensor, G: torch.Tensor) -> dict[str, Formula]:
    """``{"weight": Formula}``: ``Σ_{group, o} ‖patch_o‖·‖g_o‖`` per sample, float64.

    ``patch_o`` is the input patch output position ``o`` reads within the group (its
    squared norm: the padded input's squares summed over the group's channels, then over
    the kernel window by a one-channel convolution with a kernel of ones)
    and ``g_o`` the group's output gradient there: a bound on the weight gradient's norm
    without cancellation (``rule.MassesFn``). The bias is left out: its norm is taken of
    the per-sample sum that ``clipped_sum`` adds up.
    """
    if not trainable(module.weight):
        return {}
    g, n = module.groups, len(module.kernel_size)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    ones = A.new_ones(g, 1, *module.kernel_size)

    def weight(s: slice) -> torch.Tensor:
        X = _fully_padded(module, A[s])
        b = X.shape[0]
        sq = X.square().reshape(b, g, module.in_channels // g, *X.shape[2:]).sum(2)
        patches = conv(sq, ones, stride=module.stride, dilation=module.dilation, groups=g)
        # squares then a sum: vector_norm over a middle dimension is many times slower
        Gs = G[s].reshape(b, g, module.out_channels // g, -1)
        outs = Gs.to(chunks.accumulation_dtype(Gs.dtype)).square().sum(2).sqrt_()
        return (patches.reshape(b, g, -1).clamp_(min=0).sqrt_().double() * outs.double()).sum(
            (1, 2))

    L = math.prod(G.shape[2:])
    memory = A[0].numel() * 2 + L * g
    return {"weight": Formula(weight, L * (module.weight[0].numel() + module.out_channels),
                              memory, ghost=True)}


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


RULES = tuple(LayerRule(t, per_sample_grads, norm_formulas, clipped_sum, masses)
              for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
"""The convolution rules."""
