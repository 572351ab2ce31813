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


def batch_bucket(batch_size: int) -> int:
    """``k`` with ``2^(k-1) <= B < 2^k``: batch sizes within a factor 2 share a choice."""
    return int(batch_size).bit_length()


def fastest(key: Hashable, candidates: dict[str, Callable[[], T]]) -> T:
    """Runs the fastest candidate for ``key``, timing all of them on the first call.

    Args:
        key: What the choice depends on (layer configuration and per-sample shapes).
        candidates: ``{name: thunk}``; every thunk computes the same value.

    Returns:
        The value computed by the chosen (or, on the first call, the fastest) candidate.
    """
    name = _CHOICE.get(key)
    if name in candidates:
        return candidates[name]()
    best, best_t, best_v = None, float("inf"), None
    for n, fn in candidates.items():
        fn()  # warm-up: kernel selection, allocator
        start = time.perf_counter()
        v = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best_t:
            best, best_t, best_v = n, elapsed, v
    _CHOICE[key] = best
    return best_v

