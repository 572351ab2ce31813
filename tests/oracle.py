"""The independent oracle: a loop of batch-size-1 backward passes (plain autograd)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def loop_per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    batch_dim: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients by running the model on each sample alone.

    Args:
        model: The model.
        loss_fn: ``(model output, sample index) -> scalar loss`` for one sample.
        x: Input batch; sample ``i`` is ``x.narrow(batch_dim, i, 1)``.

    Returns:
        ``{name: (B, *shape)}`` for every trainable parameter.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(x.shape[batch_dim]):
        loss = loss_fn(model(x.narrow(batch_dim, i, 1)), i)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def sin_loss(out: torch.Tensor) -> torch.Tensor:
    """A nonlinear per-sample loss of any output: ``sum(sin(out_i))`` over non-batch axes."""
    if isinstance(out, tuple):
        out = out[0]
    return out.flatten(1).sin().sum(1)


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-9):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n in want:
        assert got[n].shape == want[n].shape, (n, got[n].shape, want[n].shape)
        torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol, msg=n)
