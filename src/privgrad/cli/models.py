"""Models of ``privgrad train``: small networks suited to DP-SGD (tanh, GroupNorm, no BatchNorm).

Under DP-SGD the noise grows with the number of parameters and the clipping bounds every
sample's contribution, so small networks with bounded activations (tanh, Papernot et al.
2021) train best; BatchNorm mixes samples and is not allowed.
"""

from __future__ import annotations

import math

from torch import nn

MODELS = ("cnn", "mlp", "linear")


def default_name(input_shape: tuple[int, ...]) -> str:
    """The model ``--model`` defaults to: ``cnn`` for images ``(C, H, W)``, else ``mlp``."""
    return "cnn" if len(input_shape) == 3 else "mlp"


def build(name: str | None, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Builds a model for inputs of one sample's shape.

    Args:
        name: ``"cnn"`` (images ``(C, H, W)``), ``"mlp"``, ``"linear"``; ``None`` picks
            ``"cnn"`` for images and ``"mlp"`` otherwise.
        input_shape: Shape of one input.
        num_classes: Number of outputs.

    Returns:
        The model, freshly initialised from torch's global generator.

    Raises:
        ValueError: For an unknown name, or a CNN on inputs that are not images.
    """
    name = name or default_name(input_shape)
    if name not in MODELS:
        raise ValueError(f"--model {name!r} is not one of {MODELS}.")
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(
                f"--model cnn needs image inputs of shape (C, H, W), got samples of shape "
                f"{tuple(input_shape)}. Fix: --model mlp, or store images as (N, C, H, W)."
            )
        return cnn(input_shape[0], num_classes)
    d = math.prod(input_shape)
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, num_classes))


def cnn(channels: int, num_classes: int, width: int = 16) -> nn.Module:
    """Two tanh conv blocks with GroupNorm, pooled to 4×4, a linear head (10k parameters).

    Args:
        channels: Input channels.
        num_classes: Number of outputs.
        width: Channels of the first block (the second has twice as many).

    Returns:
        The CNN; it accepts any image size.
    """
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.Tanh(), nn.GroupNorm(4, width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.Tanh(),
        nn.GroupNorm(4, 2 * width),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * width, num_classes),
    )
