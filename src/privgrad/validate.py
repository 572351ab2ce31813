"""Model checks with actionable errors, and an automatic fix for the common cases.

``check(model)`` raises ``UnsupportedModelError`` listing every layer that mixes samples
or leaks data outside the private gradient; ``fix(model)`` replaces those it can.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import UninitializedParameter

from privgrad.errors import UnsupportedModelError


def problems(model: nn.Module) -> list[str]:
    """Every problem found in ``model``, one message per module; empty if none."""
    found = []
    for path, m in model.named_modules():
        where = f"'{path}'" if path else "the model itself"
        if isinstance(m, _BatchNorm):
            found.append(
                f"module {where} is {type(m).__name__}: batch statistics mix the samples of "
                "a batch, so no per-sample gradient exists, and its running statistics leak "
                f"data outside the private gradient. Fix: nn.GroupNorm({_groups(m)}"
                f", {m.num_features}) instead, or call pg.validate.fix(model)."
            )
        elif isinstance(m, _InstanceNorm) and m.track_running_stats:
            found.append(
                f"module {where} is {type(m).__name__}(track_running_stats=True): its running "
                "statistics are computed from the data and saved in the model without noise. "
                "Fix: track_running_stats=False, or call pg.validate.fix(model)."
            )
        elif isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.scale_grad_by_freq:
            found.append(
                f"module {where} has scale_grad_by_freq=True: each sample's gradient is "
                "divided by token counts over the whole batch, which mixes samples. "
                "Fix: scale_grad_by_freq=False."
            )
        for name, p in m.named_parameters(recurse=False):
            if isinstance(p, UninitializedParameter):
                found.append(
                    f"parameter '{path + '.' if path else ''}{name}' is not initialised "
                    f"(lazy module {type(m).__name__}). Fix: run one forward pass, e.g. "
                    "model(x[:1]), before building the DPEngine."
                )
    return found


def check(model: nn.Module) -> None:
    """Raises ``UnsupportedModelError`` naming every problem in ``model``.

    Args:
        model: The model to train privately.
    """
    found = problems(model)
    if found:
        raise UnsupportedModelError(
            "privgrad cannot train this model privately as it is:\n- " + "\n- ".join(found)
        )


def _groups(m: _BatchNorm) -> int:
    """GroupNorm groups replacing ``m``: every group must span more than one value.

    ``BatchNorm1d`` usually normalises ``(B, C)`` features, where a group of one channel
    is a single value whose normalisation is the constant 0 (the model would no longer
    depend on its input): one group over the features instead, like ``nn.LayerNorm(C)``.
    ``BatchNorm2d/3d`` normalise maps, so ``gcd(32, C)`` groups (one channel per group for
    ``C <= 32``) still span every position of their channels' maps.
    """
    if isinstance(m, nn.BatchNorm1d):
        return 1
    return math.gcd(32, m.num_features)


def fix(model: nn.Module) -> nn.Module:
    """Replaces, in place, the layers ``check`` rejects where a private equivalent exists.

    BatchNorm1d → GroupNorm with one group (normalises each sample over its features, as
    ``nn.LayerNorm(C)`` on ``(B, C)``; one channel per group would make a constant);
    BatchNorm2d/3d → GroupNorm with ``gcd(32, C)`` groups (on ``1×1`` maps a group of one
    channel is constant too: use fewer groups there); both keep ``affine``;
    InstanceNorm with running stats → the same InstanceNorm without them. Parameter names
    of the replaced layers (``weight``, ``bias``) are kept, so ``state_dict`` keys of
    affine parameters are unchanged; running-statistics buffers are dropped.

    Args:
        model: The model, modified in place.

    Returns:
        The same model, for chaining.
    """
    for path, m in list(model.named_modules()):
        if isinstance(m, _BatchNorm):
            new: nn.Module = nn.GroupNorm(_groups(m), m.num_features, m.eps, m.affine)
        elif isinstance(m, _InstanceNorm) and m.track_running_stats:
            new = type(m)(m.num_features, m.eps, m.momentum, m.affine, track_running_stats=False)
        else:
            continue
        if not path:
            raise UnsupportedModelError(
                "privgrad: the model itself is a normalisation layer; wrap it in a container."
            )
        if m.affine:
            new = new.to(device=m.weight.device, dtype=m.weight.dtype)
            new.weight.data.copy_(m.weight.data)
            new.bias.data.copy_(m.bias.data)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, new)
    return model
