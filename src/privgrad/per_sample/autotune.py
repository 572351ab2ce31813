"""Measured choice between exact implementations of the same per-layer quantity.

Which of several exact formulas is fastest depends on shapes, dtype and the backend's
kernels (a grouped convolution kernel can be 5× slower or faster than im2col + bmm on
the same layer). ``fastest`` times the candidates on the first call for a key — the
layer's per-sample shapes and the batch size's bucket (``batch_bucket``: the batch size
varies under Poisson sampling, but the winner can change between B = 64 and B = 256) —
remembers the winner, and afterwards runs only the winner. All candidates give the same
result up to floating-point rounding, so the choice changes speed only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")

_CHOICE: dict[Hashable, str] = {}
REPEATS = 3


def batch_bucket(batch_size: int) -> int:
    """``round(log2 B)``: batch sizes within a factor √2 of a power of two share a choice.

    Centred on the powers of two, so Poisson batches around an expected size of 64 or 256
    fall in one bucket instead of straddling two.
    """
    return round(math.log2(batch_size)) if batch_size > 0 else 0


def fastest(key: Hashable, candidates: dict[str, Callable[[], T]]) -> T:
    """Runs the fastest candidate for ``key``, timing all of them on the first call.

    On the first call each candidate runs once to warm up (kernel selection, allocator),
    then ``REPEATS`` timed rounds run every candidate in turn; a candidate's time is its
    best round, so a single disturbed run (another process, a page fault) does not decide.

    Args:
        key: What the choice depends on (layer configuration and per-sample shapes).
        candidates: ``{name: thunk}``; every thunk computes the same value.

    Returns:
        The value computed by the chosen (or, on the first call, the fastest) candidate.
    """
    name = _CHOICE.get(key)
    if name in candidates:
        return candidates[name]()
    _, _CHOICE[key], value = best_times(candidates)
    return value


def best_times(candidates: dict[str, Callable[[], T]]) -> tuple[dict[str, float], str, T]:
    """Each candidate's best time in seconds over ``REPEATS`` rounds, after one warm-up run.

    Returns:
        ``({name: seconds}, the fastest candidate, the value of its fastest run)``.
    """
    for fn in candidates.values():
        fn()  # warm-up
    times = dict.fromkeys(candidates, float("inf"))
    winner, best, value = next(iter(candidates)), float("inf"), None
    for _ in range(REPEATS):
        for n, fn in candidates.items():
            sync()
            start = time.perf_counter()
            v = fn()
            sync()
            elapsed = time.perf_counter() - start
            if elapsed < best:
                winner, best, value = n, elapsed, v
            times[n] = min(times[n], elapsed)
            del v
    return times, winner, value


def sync() -> None:
    """Waits for queued GPU work, so a timing covers the kernels, not their launch."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
