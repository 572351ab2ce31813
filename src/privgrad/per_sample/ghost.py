"""Book-keeping without per-sample gradients: ghost norms and one-matmul clipped sums.

A recorded call goes through this path when its rule has ``norm_formulas``,
``clipped_sum`` and ``masses``, each of its parameters is used by that call alone in the
step (a tied parameter, or a module called twice, needs the per-sample sum of its
contributions before the norm, so it is materialised instead), and its per-sample
gradients would be large.
Small per-sample gradients (``B × parameters <= DENSE_ELEMENTS``, and per sample at most
twice the call's input plus output gradient) are materialised in mode ``"auto"``: they
cost at most the layer's weight-gradient FLOPs once, and their clipped sum is then a
cheap weighted sum, where book-keeping pays the norm and then the weight gradient again.
A Linear on single vectors is always book-kept: its ghost norm ``|a|²·|g|²`` is next to
free. Mode ``"ghost"`` book-keeps every call it can. Each book-kept norm is computed by
the formula ``policy`` picks from the rule's costs.
Per-sample gradients are still available from the trace: they are materialised lazily
from the same recorded ``A`` and ``G``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from privgrad.per_sample import policy
from privgrad.per_sample.chunks import HALF
from privgrad.per_sample.layer_io import LayerIO

MAX_CANCELLATION = 1000.0
"""A book-kept per-sample norm is at least ``mass / MAX_CANCELLATION`` (``squared_norms``)."""

DENSE_ELEMENTS = 1 << 21
"""Per-sample gradients of at most this many elements (``B`` × the call's parameters,
8 MiB of float32) are materialised rather than book-kept."""


def split(
    ios: list[LayerIO], names: dict[int, str], batch_size: int, small_dense: bool = True
) -> tuple[list[LayerIO], list[LayerIO]]:
    """Separates the calls that are book-kept from those whose gradients are materialised.

    Args:
        ios: The recorded calls.
        names: ``id(parameter) -> name``.
        batch_size: ``B``.
        small_dense: Materialise calls whose per-sample gradients are small (mode
            ``"auto"``); ``False`` book-keeps every call that can be (mode ``"ghost"``).

    Returns:
        ``(ghost calls, calls to materialise)``.
    """
    uses = Counter(names[id(p)] for io in ios for p in io.call.unit.params.values())
    ghost, dense = [], []
    for io in ios:
        params = io.call.unit.params.values()
        rule = io.call.unit.rule
        alone = all(uses[names[id(p)]] == 1 for p in params)
        ok = rule is not None and None not in (rule.norm_formulas, rule.clipped_sum, rule.masses)
        size = sum(p.numel() for p in params if p.requires_grad)  # rules skip frozen ones
        book_keep = ok and alone and not (small_dense and _small(io, size, batch_size))
        (ghost if book_keep else dense).append(io)
    return ghost, dense


def _small(io: LayerIO, params: int, batch_size: int) -> bool:
    """Whether a rule call's per-sample gradients are worth materialising (module doc).

    Only asked for calls with a ghost rule, whose ``A`` and ``G`` are tensors with the
    batch on dim 0 (a functional unit's recorded arguments need not be).

    They must be small (``B × params <= DENSE_ELEMENTS``) and not much larger than the
    call's own input and output gradient per sample: otherwise (a Linear on single
    vectors, ``T = 1``) the ghost norm costs next to nothing, and materialising would
    only add a pass over ``B × params`` values.
    """
    return batch_size * params <= DENSE_ELEMENTS and params <= 2 * per_sample_io(io, batch_size)


def per_sample_io(io: LayerIO, batch_size: int) -> int:
    """Elements of a rule call's input plus output gradient per sample."""
    return (io.A.numel() + io.G.numel()) // max(batch_size, 1)


def squared_norms(ios: list[LayerIO], names: dict[int, str]) -> dict[str, torch.Tensor]:
    """``{param name: (B,)}`` squared per-sample norms of the book-kept calls' parameters.

    Each by the formula ``policy.choose`` picks among the rule's. Half-precision inputs
    are upcast to float32 first: a sum of squares over a whole gradient overflows or loses
    most of its digits when accumulated in 16 bits, and a norm rounded down to 16 bits
    would give a factor whose clipped contribution exceeds ``C`` by up to ``2^-8``
    relative. The norms (and so the factors) are float32 (float64 for a float64 call).

    Cancellation. A book-kept gradient is never formed: its norm comes from a formula,
    its clipped sum from another computation (one matmul over all samples and
    positions), and both round relative to the sample's *mass* ``M`` (``rule.masses``:
    ``Σ_t ‖a_t‖·‖g_t‖`` for a weight), not to its norm. A sample whose positions cancel
    (``M ≫ ‖g‖``) would get a factor from a norm that is mostly rounding error and a
    contribution that is mostly rounding error: with the float32 ghost norm, one such
    sample moved the clipped sum by ``10·C`` to ``22·C``. So every norm is at least
    ``M / MAX_CANCELLATION``: the factor is then at most ``C·MAX_CANCELLATION / M``, and
    the formula's rounding is small against the norm (the signed Gram sums run in
    float64: ``linear.norm_formulas`` bounds it). The float32 clipped sum rounds the sample's ``T``
    position terms as they are accumulated: each rounding is at most ``2^-24·f·M ≤
    6e-5·C``, but ``T`` of them can add up coherently (``docs/robustness.md``, known
    limits: a narrow Linear in mode ``"ghost"`` at ``T`` in the thousands; ``"auto"``
    materialises such layers). Samples that cancel more than ``MAX_CANCELLATION`` times
    (``M/‖g‖`` is about ``√T`` for ``T`` unaligned positions, more where a softmax makes
    the output gradients sum to zero) are clipped harder than their norm asks; their
    reported norm is ``M / MAX_CANCELLATION``. Materialised gradients and embedding rows
    need no such bound on the CPU: their norm and their clipped sum are of the same
    rounded tensor. A floor beyond the dtype's range is clamped to its largest value.
    """
    out = {}
    for io in ios:
        unit = io.call.unit
        A, G = _upcast_half(io.A), _upcast_half(io.G)
        B, dtype = A.shape[0], G.dtype
        sq = policy.squared_norms(unit.rule.norm_formulas(unit.module, A, G), B, G.device)
        masses = unit.rule.masses(unit.module, A, G)
        for attr, v in sq.items():
            p = unit.params.get(attr)
            if p is not None and p.requires_grad:
                if attr in masses:  # (a floor beyond the dtype's range would read as inf)
                    floor = (policy.run(masses[attr], B, G.device) / MAX_CANCELLATION).square()
                    v = torch.maximum(v.double(), floor.clamp(max=torch.finfo(dtype).max))
                out[names[id(p)]] = v.to(dtype)
    return out


def clipped_sums(
    ios: list[LayerIO], names: dict[int, str], factors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{param name: p.shape}`` = ``sum_i f_i g_i`` for the ghost calls' parameters.

    Each rule takes the call's own ``A`` and ``G`` and returns its sums in
    ``chunks.accumulation_dtype``: float32 for a 16-bit call (the factors applied and the
    products summed in float32, converting only what the rule's kernel needs), the call's
    dtype otherwise.

    Args:
        ios: Ghost calls.
        names: ``id(parameter) -> name``.
        factors: ``{param name: (B,)}`` clip factors (ones for the unclipped sum).
    """
    out = {}
    for io in ios:
        unit = io.call.unit
        trainable = {a: p for a, p in unit.params.items() if p.requires_grad}
        f = {a: factors[names[id(p)]] for a, p in trainable.items()}
        for attr, s in unit.rule.clipped_sum(unit.module, io.A, io.G, f).items():
            if attr in trainable:
                out[names[id(trainable[attr])]] = s
    return out


def _upcast_half(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in HALF else t
