"""From a logical step's clipped sum to the private gradient written to ``p.grad``.

``p.grad = (clipped sum + N(0, σ²C²)) / expected_batch_size``. The step never holds a
separate noise tensor: the trace draws the same noise again if asked (``NoiseDraw``).

Two ways to write it, the same bits either way (IEEE addition commutes):

- **in place** (``recomputable``): the noise is added into the clipped sum's own tensors,
  which become ``p.grad``, so the step holds no second parameter-sized tensor; the trace
  computes the clipped sum again, bit for bit, from the recorded layer calls
  (``physical.clipped_sum_again``) when it is read, and checks the result against
  every ``PROBE_STRIDE``-th value kept from the step;
- **held**: the noise is drawn into a new gradient and the clipped sum added; the trace
  holds the clipped sum.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from privgrad.errors import TraceReleasedError
from privgrad.noise import NoiseDraw, NoiseSource
from privgrad.per_sample.batch import recorded_tensors
from privgrad.physical import BatchResult, clipped_sum_again
from privgrad.trace import Segment


def recomputable(
    pending: Sequence[tuple[Segment, BatchResult]],
    clipped_sum: Mapping[str, torch.Tensor],
    distributed: bool,
) -> bool:
    """Whether the trace can compute this step's clipped sum again, bit for bit.

    Every physical batch is ``BatchResult.recomputable`` (book-kept, CPU autocast off),
    retained and not empty; one process (under ``torch.distributed`` the sum is
    all-reduced); every tensor on the CPU (CUDA's scatter-adds and cuDNN's weight
    gradients are not deterministic by default); and no recorded tensor is an inference
    tensor (its in-place changes are not counted, so a later change could not be
    detected).
    """
    if distributed or any(t.device.type != "cpu" for t in clipped_sum.values()):
        return False
    if not all(r.recomputable and seg.ios is not None and seg.size > 0 for seg, r in pending):
        return False
    return not any(t.is_inference() for seg, _ in pending for t in recorded_tensors(seg.ios))


def write_private_gradient(
    clipped_sum: dict[str, torch.Tensor],
    noise: NoiseSource,
    std: float,
    expected_batch_size: float,
    again: Callable[[], dict[str, torch.Tensor]] | None,
) -> tuple[dict[str, torch.Tensor], NoiseDraw, Callable[[], dict[str, torch.Tensor]]]:
    """``(clipped_sum + N(0, std²)) / expected_batch_size`` per parameter.

    Args:
        clipped_sum: ``{param name: p.shape}`` fresh tensors (overwritten when ``again``).
        noise: Where the noise comes from.
        std: ``σ · sensitivity``.
        expected_batch_size: The normaliser.
        again: Computes ``clipped_sum`` again bit for bit (the in-place way), or ``None``
            (the held way).

    Returns:
        ``(private gradient {param name: p.shape}, the noise draw, a thunk returning the
        clipped sum for the trace)``.
    """
    if again is not None:
        private = {n: s.contiguous() for n, s in clipped_sum.items()}
        probe = {n: _probe(s).clone() for n, s in private.items()}
        draw = noise.add_gaussian(private, std, expected_batch_size)
        return private, draw, functools.partial(_checked, again, probe)
    private = {n: torch.empty(s.shape, dtype=s.dtype, device=s.device)
               for n, s in clipped_sum.items()}
    draw = noise.fill_gaussian(private, std)
    for n, g in private.items():
        g.add_(clipped_sum[n]).div_(expected_batch_size)
    return private, draw, functools.partial(dict, clipped_sum)


PROBE_STRIDE = 61
"""Every 61st value of the clipped sum is kept (1.6% of it) to check its recomputation."""


def _probe(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)[::PROBE_STRIDE]


def _checked(
    again: Callable[[], dict[str, torch.Tensor]], probe: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``again()``, refused unless it reproduces the probed values of the step bit for bit."""
    sums = again()
    for n, s in sums.items():
        if not torch.equal(_probe(s), probe[n]):
            raise TraceReleasedError(
                f"privgrad: the clipped sum of {n!r} computed again from this step's recorded "
                "layer calls differs from the one the step used, so it would not match p.grad "
                "bit for bit (a changed BLAS or thread setting, or a recorded tensor changed "
                "without PyTorch counting it, e.g. through .data or numpy). Fix: read "
                "trace.clipped_sum / trace.private_grad right after the step, or take the "
                "step with keep=('pre_clip',) to hold everything it used."
            )
    return sums


def recompute_thunk(
    pending: Sequence[tuple[Segment, BatchResult]],
    names: dict[int, str],
    trainable: Mapping[str, nn.Parameter],
) -> Callable[[], dict[str, torch.Tensor]]:
    """The trace's way back to the clipped sum of a step written in place."""
    return functools.partial(
        clipped_sum_again, [(seg, r.param_factors) for seg, r in pending], names,
        dict(trainable), torch.get_num_threads())
