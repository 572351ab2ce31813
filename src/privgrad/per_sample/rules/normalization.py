"""Per-sample rules for the affine parameters of normalisation layers.

Covers ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm{1,2,3}d`` and ``nn.RMSNorm``.

Each rule recomputes the normalised input ``x̂`` from the recorded input; the weight
gradient of sample ``i`` is ``sum(G_i * x̂_i)`` and the bias gradient ``sum(G_i)`` over
every axis the parameter is broadcast along.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from privgrad.per_sample import chunks
from privgrad.per_sample.rule import LayerRule, trainable


def _chunked(
    rule: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """Runs a rule over batch chunks: ``x̂`` and ``G * x̂`` are as large as the input."""

    @functools.wraps(rule)
    def chunked(module: nn.Module, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
        return chunks.per_sample_chunked(
            lambda s: rule(module, A[s], G[s]), A.shape[0], 2 * math.prod(A.shape[1:]), A.device)

    return chunked


def _affine(
    module: nn.Module, xhat: torch.Tensor, G: torch.Tensor, param_dims: int, leading: bool
) -> dict[str, torch.Tensor]:
    """Sums ``G * x̂`` and ``G`` over the axes the affine parameters broadcast along.

    Args:
        module: The layer (its ``weight``/``bias`` may be ``None``).
        xhat: Normalised input, same shape as ``G``; overwritten (the rule's own tensor).
        G: Output gradient, shape ``(B, ...)``.
        param_dims: Number of axes the parameter spans.
        leading: ``True`` if the parameter spans the axes right after the batch
            (channels, as in GroupNorm), ``False`` if it spans the trailing axes (LayerNorm).
    """
    B = G.shape[0]

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if leading:  # (B, C, *spatial) -> (B, C)
            return t.reshape(B, t.shape[1], -1).sum(dim=2)
        pshape = t.shape[t.dim() - param_dims :]
        return t.reshape(B, -1, *pshape).sum(dim=1)

    out = {}
    if trainable(getattr(module, "weight", None)):
        # x̂ is the caller's own fresh tensor: multiplied in place, the product needs no
        # second input-sized buffer (GroupNorm on the benchmark CNN's first layer at
        # B = 64: 8 MB, whose fresh pages cost more than the product itself)
        same = xhat.dtype == torch.result_type(xhat, G)
        out["weight"] = reduce(xhat.mul_(G) if same else G * xhat)
    if trainable(getattr(module, "bias", None)):
        out["bias"] = reduce(G)
    return out


def layer_norm(module: nn.LayerNorm, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """LayerNorm: ``A (B, *, *normalized_shape)``; params ``(*normalized_shape)``."""
    shape = tuple(module.normalized_shape)
    xhat = F.layer_norm(A, shape, None, None, module.eps)
    return _affine(module, xhat, G, len(shape), leading=False)


def rms_norm(module: nn.Module, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """RMSNorm: ``A (B, *, *normalized_shape)``; weight ``(*normalized_shape)``."""
    shape = tuple(module.normalized_shape)
    xhat = F.rms_norm(A, shape, None, module.eps)
    return _affine(module, xhat, G, len(shape), leading=False)


def hf_rms_norm(module: nn.Module, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """The RMSNorm of Llama, Qwen2 and Mistral in ``transformers``: weight ``(D,)``.

    Their forward normalises in float32 and casts back to the input's dtype before the
    weight multiplies: ``weight * (x·rsqrt(mean(x²) + ε)).to(x.dtype)``, ε in
    ``variance_epsilon``.
    """
    x = A.float()
    rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    xhat = (x * rms).to(A.dtype)
    return _affine(module, xhat, G, 1, leading=False)


def group_norm(module: nn.GroupNorm, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """GroupNorm: ``A (B, C, *spatial)``; params ``(C,)``."""
    xhat = F.group_norm(A, module.num_groups, None, None, module.eps)
    return _affine(module, xhat, G, 1, leading=True)


def instance_norm(module: nn.Module, A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """InstanceNorm{1,2,3}d with ``affine=True``: ``A (B, C, *spatial)``; params ``(C,)``.

    Uses the per-instance statistics in training mode (or without running stats) and the
    running statistics otherwise, exactly as the module does.
    """
    use_input_stats = module.training or not module.track_running_stats
    xhat = F.instance_norm(
        A,
        None if use_input_stats else module.running_mean,
        None if use_input_stats else module.running_var,
        None,
        None,
        use_input_stats,
        0.0,
        module.eps,
    )
    return _affine(module, xhat, G, 1, leading=True)


RULES = (
    LayerRule(nn.LayerNorm, _chunked(layer_norm)),
    LayerRule(nn.GroupNorm, _chunked(group_norm)),
    *(LayerRule(t, _chunked(instance_norm))
      for t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)),
    *((LayerRule(nn.RMSNorm, _chunked(rms_norm)),) if hasattr(nn, "RMSNorm") else ()),
)
"""The normalisation layers' rules (per-sample gradients only: they are small)."""

NAMED_RULES = {
    f"transformers.models.{family}.modeling_{family}.{cls}":
        LayerRule(nn.Module, _chunked(hf_rms_norm))
    for family, cls in (("llama", "LlamaRMSNorm"), ("qwen2", "Qwen2RMSNorm"),
                        ("mistral", "MistralRMSNorm"))
}
"""Hugging Face's RMSNorm classes, by ``module.qualname`` (``transformers`` is not imported)."""
