"""Agreement of the ranks of one data-parallel run on every privacy-relevant setting.

Every rank clips, noises, normalises and accounts the one released step with its own
copy of the settings. So at construction and at every step the ranks compare one
fingerprint of every privacy-relevant value as the step reads it, exactly: float64
values, and a stable 64-bit digest split into two exact 32-bit halves where a structure
has no fixed size. At a step it travels in the one small all-reduce that also agrees on
failures and the step count (``agree_at_step``); ``privgrad.distributed`` holds the rest
of the torch.distributed integration.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from privgrad.clipping import Adaptive, ClipPlan
from privgrad.errors import GradientStateError, PrivgradError

_RULES = ("Flat", "PerLayer", "Automatic", "Adaptive")
_SHOWN_RANKS = 8  # an error lists at most this many ranks per value


class SettingsMismatchError(PrivgradError, ValueError):
    """The ranks of one data-parallel run hold different privacy-relevant settings."""


class EngineSettings(Protocol):
    """What the agreement reads from a ``DPEngine`` (its public attributes)."""

    noise_multiplier: float
    sample_rate: float | None
    expected_batch_size: float
    clipping: object
    plan: ClipPlan
    steps: int


def _digest(data: bytes) -> tuple[float, float]:
    """A stable 64-bit digest of ``data`` as two exact float64 halves."""
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return float(h >> 32), float(h & 0xFFFFFFFF)


def _hex(v: Sequence[float]) -> str:
    return f"{int(v[0]) << 32 | int(v[1]):016x}"


def _optional(v: Sequence[float]) -> str:
    return "None" if v[0] == 0 else repr(v[1])


def _rule(v: Sequence[float]) -> str:
    return _RULES[int(v[0]) - 1] if v[0] <= len(_RULES) else "another rule"


def _thresholds(v: Sequence[float]) -> str:
    if v[0] == 1:
        return f"1 group, C = {v[1]!r} (digest {_hex(v[3:])})"
    return f"{int(v[0])} groups, C_g from {v[1]!r} to {v[2]!r} (digest {_hex(v[3:])})"


def _adaptive(v: Sequence[float]) -> str:
    if v[0] == 0:
        return "not Adaptive"
    return f"count_noise_multiplier={v[1]!r}, target_quantile={v[2]!r}, learning_rate={v[3]!r}"


def _seed(v: Sequence[float]) -> str:
    if v[0] == 1:
        return "None"
    return str(int(v[2])) if v[1] == 1 else f"a large int (digest {_hex(v[3:])})"


# (setting, how many values, how one rank's values read): the layout of the fingerprint
SETTINGS: tuple[tuple[str, int, Callable[[Sequence[float]], str]], ...] = (
    ("noise_multiplier", 1, lambda v: repr(v[0])),
    ("sample_rate", 2, _optional),
    ("expected_batch_size", 1, lambda v: repr(v[0])),
    ("clipping rule", 1, _rule),
    ("max_grad_norm (the rule's sensitivity)", 1, lambda v: repr(v[0])),
    ("clipping groups and thresholds", 5, _thresholds),
    ("Automatic stability", 2, _optional),
    ("Adaptive parameters", 4, _adaptive),
    ("trainable parameters", 3, lambda v: f"{int(v[0])} (names digest {_hex(v[1:])})"),
)
SEED = (("seed", 5, _seed),)


def privacy_settings(
    noise_multiplier: float,
    sample_rate: float | None,
    expected_batch_size: float,
    rule: object,
    plan: ClipPlan,
    trainable: Iterable[str],
) -> tuple[float, ...]:
    """The fingerprint of one step's privacy-relevant settings, laid out as ``SETTINGS``.

    Pure, and exact: two ranks get equal tuples iff they would clip with the same groups
    and thresholds, noise with the same ``σ·S``, normalise alike and record the same
    ledger entry (up to a 2⁻⁶⁴ digest collision on the group structure and names, which
    the exact sensitivity and threshold range back up). ``mode``, ``self_check`` and
    ``keep`` are performance-only and left out: ranks may differ in them.

    Args:
        noise_multiplier: ``σ``.
        sample_rate: ``q`` (``None``: unaccounted).
        expected_batch_size: The normaliser.
        rule: The clipping rule (its type; ``Adaptive``'s update and count noise).
        plan: The bound plan the step clips with (groups, thresholds, stability).
        trainable: Names of the parameters the step trains.

    Returns:
        Float64 values, the same number for any arguments (``sum`` of ``SETTINGS``' counts).
    """
    kind = type(rule).__name__
    code = float(_RULES.index(kind) + 1) if kind in _RULES else 100.0 + _digest(kind.encode())[1]
    thresholds = plan.max_norms.values()
    # every parameter's group name and threshold, in parameter order: the same on every
    # rank for one model, whatever order a PerLayer dict was written in (C-level joins
    # and packed float64s: tens of microseconds for hundreds of parameters)
    per_param = array("d", [plan.max_norms[g] for g in plan.group_of.values()])
    groups = "\0".join(plan.group_of.values()).encode() + per_param.tobytes()
    names = tuple(trainable)
    stability = plan.stability
    return (
        float(noise_multiplier),
        *((0.0, 0.0) if sample_rate is None else (1.0, float(sample_rate))),
        float(expected_batch_size),
        code,
        float(plan.sensitivity),
        float(len(plan.max_norms)), float(min(thresholds)), float(max(thresholds)),
        *_digest(groups),
        *((0.0, 0.0) if stability is None else (1.0, float(stability))),
        *((1.0, float(rule.count_noise_multiplier), float(rule.target_quantile),
           float(rule.learning_rate)) if isinstance(rule, Adaptive) else (0.0,) * 4),
        float(len(names)), *_digest("\0".join(names).encode()),
    )


def seed_settings(seed: int | None) -> tuple[float, ...]:
    """The noise seed laid out as ``SEED``: ``None``, or the integer (exact via a digest)."""
    if seed is None:
        return (1.0, 0.0, 0.0, 0.0, 0.0)
    s = int(seed)
    exact = abs(s) <= 2**53  # then the float64 is the seed itself, for the message
    return (0.0, float(exact), float(s) if exact else 0.0, *_digest(str(s).encode()))


def settings_of(engine: EngineSettings, trainable: Iterable[str]) -> tuple[float, ...]:
    """``privacy_settings`` of the values ``engine`` uses for its next step."""
    return privacy_settings(engine.noise_multiplier, engine.sample_rate,
                            engine.expected_batch_size, engine.clipping, engine.plan, trainable)


def _disagreement(values: Sequence[float], device: torch.device) -> list[list[float]] | None:
    """``None`` if every rank passed the same values, else every rank's values.

    One all-reduce (max of ``v`` and ``-v``) on the path that agrees; a second
    collective (all-gather, for the error message) only when the ranks differ. A NaN
    never compares equal, so it counts as a disagreement (fail closed).
    """
    n = len(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    both = torch.cat([t, -t])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if bool((both[:n] == -both[n:]).all()):
        return None
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return [g.tolist() for g in gathered]


def _differences(layout: Sequence[tuple[str, int, Callable]], ranks: list[list[float]],
                 offset: int) -> str:
    """``"name: value on ranks 0, 2; other on rank 1"`` for each setting that differs."""
    parts = []
    for name, k, show in layout:
        per_rank = [r[offset:offset + k] for r in ranks]
        offset += k
        if all(v == per_rank[0] for v in per_rank):
            continue
        holders: dict[str, list[int]] = {}
        for rank, v in enumerate(per_rank):
            holders.setdefault(show(v), []).append(rank)
        parts.append(f"{name}: " + "; ".join(
            f"{shown} on rank{'s' if len(rs) > 1 else ''} "
            + ", ".join(map(str, rs[:_SHOWN_RANKS])) + (", ..." if len(rs) > _SHOWN_RANKS else "")
            for shown, rs in holders.items()))
    return "; ".join(parts)


_WHY = (
    "Every rank clips, noises, normalises and accounts the same released step with its own "
    "copy of these settings, so no single (σ, C, q) would describe it: e.g. C = 1 on rank 0 "
    "and 2 on rank 1 trains with sensitivity 2 while rank 0 reports ε for 1."
)
_FIX = (
    "Fix: build every rank's DPEngine from the same arguments, and make every change between "
    "steps on every rank alike, before the same step (e.g. engine.noise_multiplier = "
    "schedule(engine.steps), engine.max_grad_norm = ..., run by every rank)."
)


def agree_at_construction(
    engine: EngineSettings, seed: int | None, trainable: Iterable[str], device: torch.device
) -> None:
    """Raises ``SettingsMismatchError`` on every rank unless all ranks built alike.

    Collective: every rank must call it, at the same point of ``DPEngine.__init__``.

    Args:
        engine: The engine being built (its settings are read, nothing is changed).
        seed: The ``seed`` argument (different seeds would make the replicas drift).
        trainable: Names of the parameters the engine trains.
        device: Where the reduction happens (a CUDA device for NCCL).

    Raises:
        SettingsMismatchError: Naming each setting that differs and its value per rank.
    """
    ranks = _disagreement((*seed_settings(seed), *settings_of(engine, trainable)), device)
    if ranks is None:
        return
    n = SEED[0][1]
    seeds = "" if all(r[:n] == ranks[0][:n] for r in ranks) else (
        " The ranks were given different noise seeds (e.g. seed=base + rank): their noise and "
        "p.grad would differ and the replicas drift apart; pass the same seed on every rank, "
        "or seed=None (a fresh seed is shared each step).")
    raise SettingsMismatchError(
        "privgrad: the ranks built their DPEngine with different privacy-relevant settings ("
        f"{_differences(SEED + SETTINGS, ranks, 0)}).{seeds} {_WHY} No engine was built. {_FIX}"
    )


def agree_at_step(
    engine: EngineSettings, failed: bool, trainable: Iterable[str], device: torch.device
) -> PrivgradError | None:
    """Whether every rank may take this step: one collective for failures, steps, settings.

    Collective: every rank must call it once per logical step (from ``DPEngine.step``).

    Args:
        engine: The engine about to step (its settings are read as the step uses them).
        failed: Whether this rank's step already failed (it will not take the step).
        trainable: Names of the parameters this step trains.
        device: Where the reduction happens (a CUDA device for NCCL).

    Returns:
        ``None`` if all ranks agree and none failed; otherwise the error every rank that
        has no error of its own raises: ``SettingsMismatchError`` naming each setting that
        differs and its value per rank, or ``GradientStateError`` if a rank failed or the
        ranks are at different steps.
    """
    step = engine.steps
    ranks = _disagreement((float(failed), float(step), *settings_of(engine, trainable)), device)
    if ranks is None:
        return None
    differences = _differences(SETTINGS, ranks, 2)
    if differences:
        return SettingsMismatchError(
            f"privgrad: the ranks disagree on privacy-relevant settings at step {step + 1} "
            f"({differences}). {_WHY} So no rank takes this step: every rank discards its "
            f"batches, p.grad is not written and the ledger is unchanged. {_FIX}"
        )
    return GradientStateError(
        f"privgrad: step {step + 1} failed on another rank (or the ranks are at different "
        "steps), so no rank takes it: every rank discards this logical step's batches and "
        "p.grad is not written. Fix: see the other rank's error; every rank must call step() "
        "once per logical step, also after a failed accumulate()."
    )
