"""Per-sample rules for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

Any stride, dilation, groups and padding (numbers, ``"same"``, ``"valid"``, and the
``reflect``/``replicate``/``circular`` padding modes). The per-sample weight gradient is
one call of the convolution weight-gradient kernel with the batch folded into the groups:
sample ``b``, group ``j`` becomes group ``b * groups + j`` — exact, and as fast as the
kernel the non-private backward uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privgrad.per_sample.registry import LayerRule, register

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


def per_sample_grads(module: _Conv, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a convolution.

    Args:
        module: The layer.
        A: Input, shape ``(B, C_in, *spatial)``.
        G: Output gradient, shape ``(B, C_out, *spatial_out)``.

    Returns:
        ``{"weight": (B, C_out, C_in / groups, *kernel), "bias": (B, C_out)}``.
    """
    B = A.shape[0]
    A, padding = padded_input(module, A)
    w_shape = (B * module.out_channels, *module.weight.shape[1:])
    weight_like = G.new_empty(1).expand(w_shape)
    n = len(module.kernel_size)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        G.reshape(1, B * G.shape[1], *G.shape[2:]),
        A.reshape(1, B * A.shape[1], *A.shape[2:]),
        weight_like,
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * n,
        B * module.groups,
        [False, True, False],
    )
    out = {"weight": grad_w.view(B, *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = G.flatten(2).sum(dim=2)
    return out


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(LayerRule(_t, per_sample_grads))
