"""Training-step configurations compared by the benchmark.

Each configuration turns (model spec, fresh model copy, batch) into a ``step()`` callable
doing one full training step (forward, backward, optimizer step, zero_grad) and a
``close()`` callable. All use SGD, σ = 1.0, C = 1.0 and expected batch size = B.

- ``non-private``: ``losses.mean().backward()``.
- ``non-private + noise``: the same, plus drawing the Gaussian noise of a DP step for every
  parameter (``normal_`` with PyTorch's CPU generator, as privgrad and Opacus draw it) and
  adding it to the gradient: the floor under any DP-SGD step that uses PyTorch's sampler.
- ``privgrad <mode>``: ``DPEngine(model, ..., mode=<mode>)``; ``engine.backward(losses)``;
  ``privgrad auto (sum not kept)`` adds ``keep_clipped_sum=False`` (the trace does not hold
  the clipped sum; the noise is added into it in place).
  Construction raising ``ValueError`` (e.g. a mode this build does not have) makes the
  configuration "n/a".
- ``opacus hooks``: ``GradSampleModule`` + ``DPOptimizer`` (what
  ``PrivacyEngine.make_private(..., grad_sample_mode="hooks")`` builds, without the
  DataLoader/Poisson-sampling part, which is not timed here).
- ``opacus ghost``: ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)`` +
  ``DPOptimizerFastGradientClipping``, the backward driven by
  ``DPTensorFastGradientClipping`` (what ``DPLossFastGradientClipping`` returns; it runs
  the two backward passes of Opacus' ghost clipping). We build the per-sample losses
  ourselves so the transformer's loss is the per-sequence mean over positions in every
  configuration.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models import Spec

SIGMA = 1.0
CLIP = 1.0
LR = 0.01

CONFIGS = (
    "non-private",
    "non-private + noise",
    "privgrad auto",
    "privgrad auto (sum not kept)",
    "privgrad ghost",
    "privgrad materialize",
    "opacus hooks",
    "opacus ghost",
)


class NotAvailableError(Exception):
    """The configuration cannot be built in this environment (reported as n/a)."""


@dataclass
class Runner:
    step: Callable[[], None]
    close: Callable[[], None]


def build(config: str, spec: Spec, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Runner:
    """A runner for ``config`` on a deep copy of ``base`` (same initial weights everywhere).

    Raises:
        NotAvailableError: when the configuration's construction raises ``ValueError`` or the
            library is missing.
    """
    model = copy.deepcopy(base)
    B = x.shape[0]
    if config == "non-private":
        return _non_private(spec, model, x, y)
    if config == "non-private + noise":
        return _non_private(spec, model, x, y, noise=True)
    if config.startswith("privgrad "):
        return _privgrad(config.split(" ", 1)[1], spec, model, x, y, B)
    if config == "opacus hooks":
        return _opacus_hooks(spec, model, x, y, B)
    if config == "opacus ghost":
        return _opacus_ghost(spec, model, x, y, B)
    raise KeyError(config)


def _non_private(
    spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: bool = False
) -> Runner:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    std = SIGMA * CLIP / x.shape[0]

    def step() -> None:
        spec.loss(model(x), y).mean().backward()
        if noise:
            for p in model.parameters():
                p.grad += torch.empty_like(p).normal_(0.0, std, generator=gen)
        opt.step()
        opt.zero_grad()

    return Runner(step, lambda: None)


def _privgrad(
    mode: str, spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, B: int
) -> Runner:
    import privgrad

    mode, _, not_kept = mode.partition(" (")  # "auto (sum not kept)": keep_clipped_sum=False
    try:
        engine = privgrad.DPEngine(
            model, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=B, mode=mode,
            **({"keep_clipped_sum": False} if not_kept else {}),
        )
    except ValueError as e:
        raise NotAvailableError(f"{type(e).__name__}: {e}") from e
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        # The returned trace is dropped at once: it holds layer inputs/output grads.
        engine.backward(spec.loss(model(x), y))
        opt.step()
        opt.zero_grad()

    return Runner(step, engine.close)


def _opacus_hooks(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, B: int) -> Runner:
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError as e:
        raise NotAvailableError(f"opacus not installed: {e}") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        except ValueError as e:
            raise NotAvailableError(f"{type(e).__name__}: {e}") from e
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=B,
            loss_reduction="mean",
        )

    def step() -> None:
        spec.loss(gsm(x), y).mean().backward()
        opt.step()
        opt.zero_grad()

    return Runner(step, gsm._close)


def _opacus_ghost(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, B: int) -> Runner:
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    except ImportError as e:
        raise NotAvailableError(f"opacus ghost clipping not available: {e}") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gsm = GradSampleModuleFastGradientClipping(
                model,
                batch_first=True,
                loss_reduction="mean",
                max_grad_norm=CLIP,
                use_ghost_clipping=True,
            )
        except ValueError as e:
            raise NotAvailableError(f"{type(e).__name__}: {e}") from e
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(gsm.parameters(), lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=B,
            loss_reduction="mean",
        )

    def step() -> None:
        losses = spec.loss(gsm(x), y)
        # Two backward passes: norms (hooks on), then the re-weighted loss (hooks off).
        DPTensorFastGradientClipping(gsm, opt, losses, loss_reduction="mean").backward()
        opt.step()
        opt.zero_grad()

    return Runner(step, gsm._close)
