"""From the physical batches of a logical step to the private gradient.

``private = (Σ over physical batches and ranks of the clipped sums + N(0, std²)) /
expected_batch_size``, per parameter.

Two ways to write it, the same bits either way (IEEE addition commutes):

- **held** (the default): the noise is drawn into a new tensor and the clipped sum added
  (faster than adding the noise chunk by chunk into a copy: two whole-tensor passes); the
  clipped sum stays as it is, for the trace (one parameter-sized tensor beside ``p.grad``);
- **not held** (``DPEngine(keep_clipped_sum=False)``, for memory-bound steps): the noise
  is added into the clipped sum's own tensors, which become the private gradient; the
  trace then says that the clipped sum was not kept.

Precision: the clipped sum arrives in float32 or wider (a 16-bit parameter's is float32,
``per_sample.chunks.accumulation_dtype``), and the noise is drawn and added, and the sum
divided, in that dtype. ``DPEngine.step`` then rounds the result once into ``p.grad``'s
dtype: for a 16-bit parameter the Gaussian mechanism is the float32 one (sensitivity ``C``
to float32 rounding, noise with Gaussian tails), and its rounding to 16 bits is
post-processing. Rounding the sum before the noise instead would not be: at ``B = 2048``
one aligned sample moved a bfloat16 sum by up to 3.2·C (tests/test_sensitivity_16bit.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from privgrad import distributed as dist
from privgrad.noise import NoiseDraw, NoiseSource
from privgrad.step.clip_batch import BatchResult


@dataclass(frozen=True)
class Released:
    """What one logical step releases, and what the trace may hold of it.

    Attributes:
        private: ``{param name: p.shape}`` the private gradient, before its one rounding
            to ``p.grad``'s dtype. The only private value.
        noise: The record of the noise draw (NOT PRIVATE).
        clipped_sum: ``{param name: p.shape}`` the summed clipped gradients (NOT
            PRIVATE), or ``None`` if it was not held.
    """

    private: dict[str, torch.Tensor]
    noise: NoiseDraw
    clipped_sum: dict[str, torch.Tensor] | None


def release(
    results: Sequence[BatchResult],
    names: Iterable[str],
    noise: NoiseSource,
    std: float,
    expected_batch_size: float,
    all_ranks: bool,
    hold: bool,
) -> Released:
    """Sums the physical batches (and, ``all_ranks``, the ranks), adds the noise, divides.

    Args:
        results: The step's physical batches (at least one; an empty step has one empty).
        names: The trainable parameters' names.
        noise: Where the noise comes from.
        std: ``σ · sensitivity``.
        expected_batch_size: The normaliser, a public constant.
        all_ranks: All-reduce the clipped sum over ``torch.distributed``'s ranks first.
        hold: Keep the clipped sum apart from the private gradient (module doc).
    """
    clipped = {n: _sum(r.clipped_sum[n] for r in results) for n in names}
    if all_ranks:  # the sum over every rank's samples, before the noise
        clipped = dist.all_reduce_sum(clipped)
    if not hold:
        private = {n: s.contiguous() for n, s in clipped.items()}
        return Released(private, noise.add_gaussian(private, std, expected_batch_size), None)
    private = {n: torch.empty(s.shape, dtype=s.dtype, device=s.device) for n, s in clipped.items()}
    draw = noise.fill_gaussian(private, std)
    for n, g in private.items():
        g.add_(clipped[n]).div_(expected_batch_size)  # (noise + sum) / n: the same bits as
    return Released(private, draw, clipped)  # (sum + noise) / n, IEEE addition commutes


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of fresh tensors (one physical batch: that batch's own tensor, no copy)."""
    first, *rest = tensors
    if not rest:
        return first
    total = first.clone()
    for t in rest:
        total += t
    return total
