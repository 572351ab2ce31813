"""One book-kept call streamed: its per-sample gradients made a chunk at a time, clipped at once.

A book-kept call pays twice: once for its per-sample norms (a ghost norm, or a per-sample
gradient made and dropped), and once more for its clipped sum (the weight gradient with
the factors applied). When the norms of every other call of the physical batch are known,
one call can instead materialise its per-sample gradients a chunk of samples at a time:
the chunk's norms complete those samples' total norms, so their clip factors are known at
once, and the chunk is added to the clipped sum with them and dropped. One pass instead of
two, with the memory of one chunk. Only one call per physical batch can come last.

Mode ``"auto"`` streams the book-kept call with the largest measured saving, if any saves
time: the first time a layer configuration, per-sample shape and batch-size bucket is seen,
both ways are timed on its real ``A`` and ``G`` (``autotune.REPEATS`` rounds, best of
each) and the saving is remembered (``_eligible`` says which calls are measured).

Exactness: a chunk's factors are the same elementwise functions of the same per-sample
norms, summed in the same order, as the batch's (``physical._own_group_sq``), so they
are exact slices of the factors the trace reports and the streamed clipped sum is
``Σ_i f_i g_i`` with them; the chunks, and so the rounding, are the same whenever it is
computed again with those factors (``physical.clipped_sum_again``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import torch

from privgrad.per_sample import autotune, chunks, ghost
from privgrad.per_sample.batch import LayerIO

FactorsFn = Callable[[slice, dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""``(chunk, {attr: (b,) squared norms of the chunk}) -> {attr: (b,) clip factors}``."""

_SAVED: dict[Hashable, float] = {}
"""Seconds saved by streaming rather than book-keeping, per ``_key`` (negative: none)."""


def choose(ghost_ios: list[LayerIO], batch_size: int) -> int | None:
    """Index in ``ghost_ios`` of the call to stream, or ``None`` when none saves time.

    Measures each eligible call the first time its ``_key`` is seen (module doc).
    """
    best, best_saved = None, 0.0
    for i, io in enumerate(ghost_ios):
        if not _eligible(io, batch_size):
            continue
        key = _key(io, batch_size)
        if key not in _SAVED:
            _SAVED[key] = _measure(io, batch_size)
        if _SAVED[key] > best_saved:
            best, best_saved = i, _SAVED[key]
    return best


def _eligible(io: LayerIO, batch_size: int) -> bool:
    """Whether a book-kept call may be streamed.

    More than one sample; ``G`` in float32/float64 (the book-keeping path upcasts 16-bit
    calls for their norms; streaming them is not measured); and per-sample gradients at
    most twice the size of the call's input and output gradient per sample
    (``ghost.per_sample_io``). Larger ones cost more to make than the norm they replace
    (a Linear on one position per sample, whose norm ``‖a‖²‖g‖²`` is next to free, or a
    vocabulary-wide embedding), and measuring them would cost the first step seconds.
    """
    params = sum(p.numel() for p in io.call.unit.params.values() if p.requires_grad)
    return (batch_size > 1 and not io.half and io.G.dtype in (torch.float32, torch.float64)
            and params <= 2 * ghost.per_sample_io(io, batch_size))


def _key(io: LayerIO, batch_size: int) -> tuple:
    """What a measured saving depends on.

    The layer's type and configuration, which of its parameters are trainable, the
    per-sample shapes, dtype, device and batch-size bucket.
    """
    m = io.call.unit.module
    trainable = tuple(a for a, p in io.call.unit.params.items() if p.requires_grad)
    return ("stream", type(m), m.extra_repr(), trainable, tuple(io.A.shape[1:]),
            tuple(io.G.shape[1:]), io.A.dtype, io.G.dtype, io.A.device.type,
            autotune.batch_bucket(batch_size))


def _measure(io: LayerIO, batch_size: int) -> float:
    """Seconds saved per step by streaming ``io`` instead of book-keeping it."""
    unit = io.call.unit
    ones = {a: torch.ones(batch_size, dtype=io.G.dtype, device=io.G.device)
            for a, p in unit.params.items() if p.requires_grad}

    def book() -> None:
        unit.rule.squared_norms(unit.module, io.A, io.G, "measure")
        unit.rule.clipped_sum(unit.module, io.A, io.G, ones)

    def streamed() -> None:
        run(io, batch_size, lambda s, sq: {a: ones[a][s] for a in sq})

    times, _, _ = autotune.best_times({"book": book, "stream": streamed})  # book first: its
    return times["book"] - times["stream"]  # warm-up settles the norm's own measured choice


def run(
    io: LayerIO, batch_size: int, factors_for: FactorsFn
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sample squared norms and clipped sum of one call, a chunk of samples at a time.

    Chunks fit the device's budget for the call's per-sample gradients
    (``chunks.chunk_size``) and differ in size by at most one sample; each chunk's
    gradients are added to the sum with its factors (``addmv_``) and dropped.

    Args:
        io: A rule call (``A``, ``G`` with the batch on dim 0).
        batch_size: ``B``.
        factors_for: Gives a chunk's clip factors from its squared norms (``FactorsFn``).

    Returns:
        ``({attr: (B,) squared norms}, {attr: parameter-shaped clipped sum})`` for the
        call's trainable parameters.
    """
    unit = io.call.unit
    params = {a: p for a, p in unit.params.items() if p.requires_grad}
    step = chunks.chunk_size(batch_size, sum(p.numel() for p in params.values()), io.A.device)
    n = -(-batch_size // step)
    bounds = [i * batch_size // n for i in range(n + 1)]  # sizes differ by at most one
    sq_parts: dict[str, list[torch.Tensor]] = {a: [] for a in params}
    sums: dict[str, torch.Tensor] = {}

    def add_chunk(s: slice) -> None:  # the chunk's gradients are freed on return
        grads = unit.rule.per_sample_grads(unit.module, io.A[s], io.G[s])
        grads = {a: g for a, g in grads.items() if a in params}
        chunk_sq = {a: chunks.squared_norms(g) for a, g in grads.items()}
        factors = factors_for(s, chunk_sq)
        for a, g in grads.items():  # 16-bit gradients (not streamed today) add in float32
            wide = chunks.accumulation_dtype(g.dtype)
            rows, f = g.reshape(g.shape[0], -1).T.to(wide), factors[a].to(wide)
            if a in sums:
                sums[a].addmv_(rows, f)
            else:
                sums[a] = torch.mv(rows, f)
            sq_parts[a].append(chunk_sq[a])

    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        add_chunk(slice(start, end))
    return ({a: torch.cat(v) for a, v in sq_parts.items()},
            {a: s.view(params[a].shape) for a, s in sums.items()})
