"""Measured choice between exact implementations of the same per-layer quantity.

Which of several exact formulas is fastest depends on shapes, dtype and the backend's
kernels (a grouped convolution kernel can be 5× slower or faster than im2col + bmm on
the same layer). ``fastest`` times each candidate once per key — the layer's per-sample
shapes and the batch size's power-of-two bucket (``batch_bucket``: the batch size varies
under Poisson sampling, but the winner can change between B = 64 and B = 256) —
remembers the winner, and afterwards runs only the winner. All candidates give the same result up to
floating-point rounding, so the choice changes speed only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")

_CHOICE: dict[Hashable, str] = {}
REPEATS = 3


def batch_bucket(batch_size: int) -> int:
    """``k`` with ``2^(k-1) <= B < 2^k``: batch sizes within a factor 2 share a choice."""
    return int(batch_size).bit_length()


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
    if len(candidates) == 1:
        (only, fn), = candidates.items()
        _CHOICE[key] = only
        return fn()
    for fn in candidates.values():
        fn()  # warm-up
    winner, best_t, value = None, float("inf"), None
    for _ in range(REPEATS):
        for n, fn in candidates.items():
            start = time.perf_counter()
            v = fn()
            elapsed = time.perf_counter() - start
            if elapsed < best_t:
                winner, best_t, value = n, elapsed, v
            del v
    _CHOICE[key] = winner
    return value
