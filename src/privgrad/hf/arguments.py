"""``PrivacyArguments``: what ``DPTrainer`` needs beyond HF's ``TrainingArguments``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from privgrad.clipping import ClipRule
from privgrad.hf.losses import TASKS

MODES = ("auto", "ghost", "materialize", "vmap")
ACCOUNTANTS = ("pld", "rdp")


@dataclass
class PrivacyArguments:
    """The privacy settings of a ``DPTrainer`` run.

    The logical batch is HF's ``per_device_train_batch_size × gradient_accumulation_steps``
    (its expected size under Poisson sampling, ``L``); each step samples every training
    example independently with probability ``q = L / N``. ``N = len(train_dataset)`` is
    thereby treated as public (the privacy statement says so); fix ``L`` and the number
    of steps before seeing the data.

    Attributes:
        target_epsilon: ε to reach at ``delta``. Alone: σ is calibrated so that the run's
            planned steps (``max_steps``, else ``num_train_epochs`` epochs of ``round(1/q)``
            steps) spend exactly this budget. With ``noise_multiplier``: training stops
            before the step that would exceed it.
        noise_multiplier: σ. At least one of ``target_epsilon`` and ``noise_multiplier``.
        delta: δ of the guarantee; must be below ``1/N`` (a δ of ``1/N`` permits releasing
            one whole example).
        max_grad_norm: ``C``, each example's gradient norm bound (HF's own
            ``TrainingArguments.max_grad_norm`` is switched off: it would clip the already
            private gradient).
        clipping: A clipping rule (``pg.clipping.PerLayer(...)`` etc.) instead of ``C``.
        mode: ``DPEngine`` mode (performance only).
        accountant: ``"pld"`` or ``"rdp"``, for calibration, logs and the statement.
        task: One of ``privgrad.hf.losses.TASKS``; ``"auto"`` tells it from the shapes.
        seed: ``None`` (secure: sampling and noise from OS entropy) or an int
            (reproducible, NOT secure).
        self_check: ``DPEngine``'s first-step check against autograd.
        deltas: Further δ values the privacy statement states ε at.
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clipping: ClipRule | None = None
    mode: str = "auto"
    accountant: str = "pld"
    task: str = "auto"
    seed: int | None = None
    self_check: bool = True
    deltas: tuple[float, ...] = field(default=(1e-6, 1e-7))

    def __post_init__(self) -> None:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "privgrad.hf: PrivacyArguments needs target_epsilon (σ is then calibrated to "
                "the run) or noise_multiplier. Fix: PrivacyArguments(target_epsilon=8.0).")
        if self.target_epsilon is not None and not (
                self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"privgrad.hf: target_epsilon={self.target_epsilon} must be a "
                             "finite number > 0.")
        if not 0 < self.delta < 1:
            raise ValueError(f"privgrad.hf: delta={self.delta} must be in (0, 1); use one "
                             "below 1 / len(train_dataset).")
        for name, allowed in (("mode", MODES), ("accountant", ACCOUNTANTS), ("task", TASKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"privgrad.hf: {name}={getattr(self, name)!r} is not one of "
                                 f"{allowed}.")
