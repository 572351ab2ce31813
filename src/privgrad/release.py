"""From a logical step's clipped sum to the private gradient written to ``p.grad``.

``p.grad = (clipped sum + N(0, σ²C²)) / expected_batch_size``. The step never holds a
separate noise tensor: the trace draws the same noise again if asked (``NoiseDraw``).

Two ways to write it, the same bits either way (IEEE addition commutes):

- **in place** (``recomputable``): the noise is added into the clipped sum's own tensors,
  which become ``p.grad``, so the step holds no second parameter-sized tensor; the trace
  computes the clipped sum again, bit for bit, from the recorded layer calls
  (``physical.clipped_sum_again``) when it is read, and checks the result against a
  checksum of every value taken at the step;
- **held**: the noise is drawn into a new gradient and the clipped sum added; the trace
  holds the clipped sum.

Precision: the clipped sum arrives in float32 or wider (a 16-bit parameter's is float32,
``per_sample.chunks.accumulation_dtype``), and the noise is drawn and added, and the sum
divided, in that dtype. ``DPEngine.step`` then rounds the result once into ``p.grad``'s
dtype: for a 16-bit parameter the Gaussian mechanism is the float32 one (sensitivity ``C``
to float32 rounding, noise with Gaussian tails), and its rounding to 16 bits is
post-processing. Rounding the sum before the noise instead would not be: at ``B = 2048``
one aligned sample moved a bfloat16 sum by up to 3.2·C (tests/test_sensitivity_16bit.py).
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
    gradients are not deterministic by default); no recorded tensor is an inference
    tensor (its in-place changes are not counted, so a later change could not be
    detected); and no module without a rule has buffers (its next forward may update
    them, and recomputing needs the values of this step).
    """
    if distributed or any(t.device.type != "cpu" for t in clipped_sum.values()):
        return False
    if not all(r.recomputable and seg.ios is not None and seg.size > 0 for seg, r in pending):
        return False
    ios = [io for seg, _ in pending for io in seg.ios]
    if any(io.call.unit.rule is None and next(io.call.unit.module.buffers(), None) is not None
           for io in ios):
        return False
    return not any(t.is_inference() for t in recorded_tensors(ios))


def write_private_gradient(
    clipped_sum: dict[str, torch.Tensor],
    noise: NoiseSource,
    std: float,
    expected_batch_size: float,
    again: Callable[[], dict[str, torch.Tensor]] | None,
) -> tuple[dict[str, torch.Tensor], NoiseDraw, Callable[[], dict[str, torch.Tensor]]]:
    """``(clipped_sum + N(0, std²)) / expected_batch_size`` per parameter.

    In each clipped sum's own dtype (float32 for a 16-bit parameter, module doc): the
    caller rounds the result once to the parameter's dtype.

    Args:
        clipped_sum: ``{param name: p.shape}`` fresh tensors, float32 or wider
            (overwritten when ``again``).
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
        sums_at_step = {n: checksum(s) for n, s in private.items()}
        draw = noise.add_gaussian(private, std, expected_batch_size)
        return private, draw, functools.partial(_checked, again, sums_at_step)
    private = {n: torch.empty(s.shape, dtype=s.dtype, device=s.device)
               for n, s in clipped_sum.items()}
    draw = noise.fill_gaussian(private, std)
    for n, g in private.items():
        g.add_(clipped_sum[n]).div_(expected_batch_size)
    return private, draw, functools.partial(dict, clipped_sum)


CHECKSUM_ROW = 64
"""Values per row of the checksum's grid (``checksum``)."""


def checksum(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A fingerprint of every value's bits and position, 1/64 of the tensor's size.

    Row and column sums of the tensor's bit patterns laid out in rows of 64 (integer
    sums, wrapping), and the last ``numel % 64`` bit patterns themselves; two read
    passes. A value changed anywhere changes its row's and its column's sum, and a value
    moved to another position (a token id rewritten in an input through numpy memory
    moves an embedding row) changes them unless it stays in both its row and its
    column, that is, in place.
    """
    bits = t.reshape(-1).view({8: torch.int64, 4: torch.int32, 2: torch.int16,
                               1: torch.int8}[t.element_size()])
    rows = bits.numel() // CHECKSUM_ROW
    grid = bits[:rows * CHECKSUM_ROW].view(rows, CHECKSUM_ROW)
    return (grid.sum(1, dtype=bits.dtype), grid.sum(0, dtype=bits.dtype),
            bits[rows * CHECKSUM_ROW:].clone())


def _checked(
    again: Callable[[], dict[str, torch.Tensor]],
    sums_at_step: Mapping[str, tuple[torch.Tensor, ...]],
) -> dict[str, torch.Tensor]:
    """``again()``, refused unless it reproduces the step's clipped sum bit for bit."""
    sums = again()
    for n, s in sums.items():
        if not all(map(torch.equal, checksum(s), sums_at_step[n])):
            raise TraceReleasedError(
                f"privgrad: the clipped sum of {n!r} computed again from this step's recorded "
                "layer calls differs from the one the step used, so it would not match p.grad "
                "bit for bit: something the step ran on changed in a way PyTorch does not "
                "count (a write through .data or through numpy memory), or the BLAS library "
                "changed its settings. Fix: read trace.clipped_sum / trace.private_grad "
                "before changing what the model ran on, or take the step with "
                "keep='clipped_sum' to hold it (one parameter-sized copy)."
            )
    return sums


def recompute_thunk(
    pending: Sequence[tuple[Segment, BatchResult]],
    names: dict[int, str],
    trainable: Mapping[str, nn.Parameter],
) -> Callable[[], dict[str, torch.Tensor]]:
    """The trace's way back to the clipped sum of a step written in place."""
    return functools.partial(
        clipped_sum_again, [(seg, r.param_factors, r.streamed) for seg, r in pending], names,
        dict(trainable), torch.get_num_threads())
