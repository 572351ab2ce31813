"""The settings of a ``privgrad train`` run, their checks, and the clipping rule they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass

from privgrad import clipping
from privgrad.cli.datasets import NUM_CLASSES_WHY
from privgrad.errors import PrivgradError

CLIPPING = ("flat", "per-layer", "automatic", "adaptive")
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: p.grad's dtype in privgrad train
NOISE_HEADROOM = 1024.0  # Gaussian draws reach ~6 std; sums and the update need room too


class OptionError(PrivgradError, ValueError):
    """An option of ``privgrad train`` is invalid (the message names it and the fix)."""


@dataclass(frozen=True)
class Config:
    """The settings of a run (stored in its checkpoint; ``--resume`` reuses them)."""

    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 40
    batch_size: int = 512
    max_physical_batch_size: int | None = None
    max_grad_norm: float = 1.0
    lr: float = 0.06
    momentum: float = 0.9
    clipping: str = "flat"
    mode: str = "auto"
    model: str | None = None
    data: str | None = None
    num_classes: int | None = None
    seed: int | None = None
    nproc: int = 1
    split_seed: int = 0


def check(c: Config) -> Config:
    """Returns ``c`` if every setting is valid.

    Raises:
        OptionError: Naming the first bad option, its value and the valid range.
    """
    rules = [
        (c.epsilon > 0 and math.isfinite(c.epsilon), f"--epsilon must be > 0, got {c.epsilon}"),
        (0 < c.delta < 1, f"--delta must be in (0, 1), got {c.delta}"),
        (c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}"),
        (c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}"),
        (c.max_physical_batch_size is None or c.max_physical_batch_size >= 1,
         f"--max-physical-batch-size must be >= 1, got {c.max_physical_batch_size}"),
        (c.max_grad_norm > 0 and math.isfinite(c.max_grad_norm),
         f"--max-grad-norm must be a finite C > 0, got {c.max_grad_norm}"),
        (c.lr > 0 and math.isfinite(c.lr), f"--lr must be a finite number > 0, got {c.lr}. "
         "Fix: e.g. --lr 0.06"),
        (0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}"),
        (c.nproc >= 1, f"--nproc must be >= 1, got {c.nproc}"),
        (c.num_classes is None or c.num_classes >= 2,
         f"--num-classes must be >= 2, got {c.num_classes}"),
        (c.data is None or c.num_classes is not None,
         f"--data {c.data} needs --num-classes K. {NUM_CLASSES_WHY}"),
    ]
    for ok, message in rules:
        if not ok:
            raise OptionError(message.rstrip(".") + ".")
    return c


def rule_and_sigma(
    c: Config, params: list[str], sigma_eff: float
) -> tuple[clipping.ClipRule, float]:
    """The clipping rule and the gradient's noise multiplier for an effective σ.

    Args:
        c: The run's settings.
        params: Names of the trainable parameters.
        sigma_eff: The noise multiplier calibrated for the budget.

    Returns:
        ``(rule, σ)``: for ``adaptive``, ``σ`` is larger than ``sigma_eff`` so that the
        gradient and the count together are one release with ``sigma_eff``.

    Raises:
        OptionError: If the noise ``σ·C`` would not fit in float32 (``p.grad`` inf), or
            the adaptive count needs more than the whole budget.
    """
    C = c.max_grad_norm
    # the noise is drawn and p.grad written in float32: a std near its range gives inf
    # draws, then a NaN model that would be released without a word
    if sigma_eff * C * NOISE_HEADROOM > FLOAT32_MAX:
        raise OptionError(
            f"--max-grad-norm {C:.6g} with σ = {sigma_eff:.6g}: the noise std σ·C = "
            f"{sigma_eff * C:.6g} does not fit in float32 (largest {FLOAT32_MAX:.6g}, with "
            f"headroom {NOISE_HEADROOM}), so p.grad would be inf and the released model NaN. "
            "C bounds each example's gradient norm; far above the typical norm it only adds "
            "noise. Fix: --max-grad-norm 1 (about the median per-example norm)."
        )
    if c.clipping == "per-layer":
        return clipping.PerLayer(C / math.sqrt(len(params))), sigma_eff
    if c.clipping == "automatic":
        return clipping.Automatic(max_norm=C, stability=0.01), sigma_eff
    if c.clipping == "adaptive":
        rule = clipping.Adaptive(initial_max_norm=C)
        sigma_b = rule.count_noise_multiplier
        if sigma_eff >= sigma_b:
            raise OptionError(
                f"the budget needs an effective noise multiplier {sigma_eff:.3g}, not below the "
                f"adaptive count's {sigma_b}. Fix: a larger --epsilon or fewer --epochs, or "
                "--clipping flat."
            )
        return rule, (sigma_eff**-2 - sigma_b**-2) ** -0.5
    return clipping.Flat(C), sigma_eff
