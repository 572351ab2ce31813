"""PrivacyLedger: the append-only record of what training has released.

The ledger stores entries ``(event, count)``: ``event`` is what one occurrence
releases (usually one DP-SGD step, ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``)
and ``count`` how many consecutive times it happened. Recording the same event again
only increments the last count, so 100,000 identical steps are one entry.

ε is computed by dp_accounting and cached: repeated calls on an unchanged ledger are
dictionary look-ups, and after new steps only the changed tail is composed again.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting

from privgrad.accounting.accountants import (
    AccountantLike,
    PLDConfig,
    RDPConfig,
    accountant_epsilon,
    compose_entries,
    resolve_accountant,
)
from privgrad.accounting.errors import LedgerStateError, PrivacyParameterError
from privgrad.accounting.events import shared_sample_step, simplify_event
from privgrad.accounting.serialization import event_from_dict, event_to_dict
from privgrad.accounting.validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)

__all__ = ["LedgerEntry", "PrivacyLedger"]

_STATE_FORMAT = "privgrad.PrivacyLedger"
_STATE_VERSION = 1


@dataclass(frozen=True)
class LedgerEntry:
    """One run of identical consecutive releases.

    Attributes:
        event: What one occurrence releases, a dp_accounting ``DpEvent``.
        count: How many consecutive times it happened, >= 1.
        is_step: Whether each occurrence is a training step (counted by
            :attr:`PrivacyLedger.steps`) rather than an extra release.
        sensitivity: The L2 sensitivity ``S`` (e.g. the clipping threshold ``C``) that
            each occurrence's noise ``σS`` was calibrated to, for the record of the run;
            ``None`` if not given. ε does not depend on it (σ is relative to ``S``).
    """

    event: dp_accounting.DpEvent
    count: int
    is_step: bool = True
    sensitivity: float | None = None


@dataclass
class _Prefix:
    """An accountant holding the composition of the first ``size`` entries."""

    settings: Any
    size: int
    accountant: dp_accounting.PrivacyAccountant


class PrivacyLedger:
    """Append-only record of privacy events with cached ε.

    Example:
        >>> ledger = PrivacyLedger()
        >>> ledger.record(noise_multiplier=1.1, sample_rate=0.01, steps=1000)
        >>> ledger.record(noise_multiplier=1.1, sample_rate=0.01)  # merged: one entry
        >>> ledger.steps, len(ledger.entries)
        (1001, 1)
        >>> eps = ledger.epsilon(delta=1e-5)
    """

    def __init__(self) -> None:
        self._events: list[dp_accounting.DpEvent] = []
        self._counts: list[int] = []
        self._is_step: list[bool] = []
        self._sensitivity: list[float | None] = []
        self._steps = 0
        self._version = 0
        self._last_key: tuple[float, float, float | None] | None = None
        self._clear_caches()

    def _clear_caches(self) -> None:
        self._results: dict[tuple[PLDConfig | RDPConfig, float], float] = {}
        self._results_version = -1
        self._composed: dict[PLDConfig | RDPConfig, tuple[int, Any]] = {}
        self._prefixes: dict[PLDConfig | RDPConfig, _Prefix] = {}

    # ------------------------------------------------------------------ recording

    def record(
        self, noise_multiplier: float, sample_rate: float, steps: int = 1,
        *, sensitivity: float | None = None,
    ) -> None:
        """Records ``steps`` DP-SGD steps with noise multiplier σ and sampling rate q.

        Consecutive records with the same σ, q and sensitivity are merged into one entry.

        Args:
            noise_multiplier: σ of these steps (0 is allowed and makes ε infinite).
            sample_rate: q of these steps, in (0, 1].
            steps: How many steps, >= 0 (0 records nothing).
            sensitivity: The clipping threshold / L2 sensitivity ``S`` of these steps, kept
                in :attr:`entries` as the record of the run (ε does not depend on it).

        Raises:
            PrivacyParameterError: If an argument is invalid.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_steps(steps)
        s = _check_sensitivity(sensitivity)
        if n == 0:
            return
        if self._last_key == (sigma, q, s):
            self._counts[-1] += n
            self._steps += n
            self._version += 1
            return
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        self._append(event, n, True, s)
        self._last_key = (sigma, q, s)

    def record_sampled(
        self, sample_rate: float, noise_multipliers: Sequence[float], *,
        sensitivity: float | None = None,
    ) -> None:
        """Records one step whose Gaussian releases share one Poisson sample of rate q.

        One multiplier is a DP-SGD step (:meth:`record`); several (the gradient and an
        adaptive-clipping count) are one ``shared_sample_step(q, noise_multipliers)``
        event, never separately sampled events.

        Args:
            sample_rate: q of the step, in (0, 1].
            noise_multipliers: σ of each release, the gradient's first.
            sensitivity: The gradient release's L2 sensitivity (see :meth:`record`).
        """
        sigmas = list(noise_multipliers)
        if len(sigmas) == 1:
            self.record(sigmas[0], sample_rate, sensitivity=sensitivity)
        else:
            self.record_event(shared_sample_step(sample_rate, sigmas), sensitivity=sensitivity)

    def record_event(
        self, event: dp_accounting.DpEvent, count: int = 1, *, is_step: bool = True,
        sensitivity: float | None = None,
    ) -> None:
        """Records ``count`` occurrences of an arbitrary dp_accounting event.

        Use it for steps that release more than the noisy gradient. Releases computed
        from the same Poisson sample must be described as one event, e.g. a noisy
        batch size alongside the gradient:
        ``record_event(shared_sample_step(q, [σ_grad, σ_count]))``; composing
        separately sampled events would understate the privacy loss.

        Args:
            event: What one occurrence releases.
            count: How many consecutive occurrences, >= 0 (0 records nothing).
            is_step: Whether each occurrence is a training step (counted in
                :attr:`steps`); pass False for one-off releases such as a final
                noisy evaluation.
            sensitivity: The L2 sensitivity of the gradient release, for the record
                (see :meth:`record`).

        Raises:
            PrivacyParameterError: If ``event`` is not a DpEvent or ``count`` invalid.
            LedgerStateError: If neither accountant can analyse ``event``.
        """
        if not isinstance(event, dp_accounting.DpEvent):
            raise PrivacyParameterError(
                f"event={event!r} is a {type(event).__name__}, not a dp_accounting "
                "DpEvent, so its privacy cost is unknown. Fix: build it with "
                "privgrad.accounting.dp_sgd_step / shared_sample_step or dp_accounting's "
                "event classes."
            )
        n = check_steps(count, name="count")
        if not isinstance(is_step, bool):
            raise PrivacyParameterError(f"is_step={is_step!r} must be True or False.")
        s = _check_sensitivity(sensitivity)
        if n > 0 and self._events and self._is_step[-1] == is_step and self._events[-1] == event:
            self._append(event, n, is_step, s)  # already checked when first recorded
            return
        simple = simplify_event(event)
        if not any(
            config.new_accountant(config.settings_for([])).supports(simple)
            for config in (PLDConfig(value_discretization_interval=1e-4), RDPConfig())
        ):
            raise LedgerStateError(
                f"Neither the PLD nor the RDP accountant can analyse {event!r}, so the "
                "ledger could never report ε after recording it. Fix: describe the "
                "release with Gaussian / Poisson-sampled Gaussian events."
            )
        if n == 0:
            return
        self._append(event, n, is_step, s)
        self._last_key = None

    def _append(
        self, event: dp_accounting.DpEvent, count: int, is_step: bool,
        sensitivity: float | None = None,
    ) -> None:
        if (self._events and self._is_step[-1] == is_step and self._events[-1] == event
                and self._sensitivity[-1] == sensitivity):
            self._counts[-1] += count
        else:
            self._events.append(event)
            self._counts.append(count)
            self._is_step.append(is_step)
            self._sensitivity.append(sensitivity)
        if is_step:
            self._steps += count
        self._version += 1

    # ------------------------------------------------------------------ views

    @property
    def steps(self) -> int:
        """Total number of logical training steps recorded."""
        return self._steps

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """The recorded runs, oldest first, as immutable entries."""
        return tuple(
            LedgerEntry(e, c, s, c_)
            for e, c, s, c_ in zip(self._events, self._counts, self._is_step,
                                   self._sensitivity, strict=True)
        )

    def as_event(self) -> dp_accounting.DpEvent:
        """The whole history as one dp_accounting event.

        Returns:
            ``ComposedDpEvent([SelfComposedDpEvent(event, count), ...])``, or
            ``NoOpDpEvent()`` for an empty ledger.
        """
        if not self._events:
            return dp_accounting.NoOpDpEvent()
        return dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(e, c)
                for e, c in zip(self._events, self._counts, strict=True)
            ]
        )

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        return f"PrivacyLedger(steps={self._steps}, entries={len(self._events)})"

    # ------------------------------------------------------------------ accounting

    def epsilon(self, delta: float, accountant: AccountantLike = "pld") -> float:
        """Returns ε at ``delta`` for everything recorded so far.

        Formal guarantees:
            The recorded releases, run in order on one dataset, are (ε, δ)-DP under
            add-or-remove-one neighbouring, as computed by dp_accounting's accountant.

        Cost: a dictionary look-up when nothing was recorded since the last call with
        the same arguments; otherwise only the entries after the last completed one
        are composed again (identical steps compose in O(log count) FFTs with PLD).

        With the automatic PLD grid, recording steps whose per-step loss is smaller
        (larger σ or smaller q) can refine the grid of the whole history and so
        lower the reported ε by the discretisation slack (≲ 0.3%), since the estimate
        is pessimistic. Pass ``PLDConfig(value_discretization_interval=...)`` for a
        fixed grid when the reported ε must never decrease.

        Args:
            delta: Target δ in (0, 1).
            accountant: ``"pld"`` (default), ``"rdp"``, or a config object.

        Returns:
            ε as a float; 0.0 for an empty ledger, inf if a release had σ = 0.

        Raises:
            PrivacyParameterError: If δ or the accountant is invalid.
            AccountingError: If the accountant cannot analyse a recorded event.
        """
        d = check_delta(delta)
        config = resolve_accountant(accountant)
        if not self._events:
            return 0.0
        if self._results_version != self._version:
            self._results.clear()
            self._results_version = self._version
        key = (config, d)
        cached = self._results.get(key)
        if cached is not None:
            return cached
        eps = accountant_epsilon(self._composed_accountant(config), d)
        self._results[key] = eps
        return eps

    def _composed_accountant(self, config: PLDConfig | RDPConfig) -> Any:
        """A dp_accounting accountant holding the whole ledger (cached per version)."""
        cached = self._composed.get(config)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        pairs = list(zip(self._events, self._counts, strict=True))
        settings = config.settings_for(pairs)
        sealed = len(pairs) - 1  # every entry but the last, whose count may still grow
        prefix = self._prefixes.get(config)
        if prefix is None or prefix.settings != settings or prefix.size > sealed:
            prefix = _Prefix(settings, 0, config.new_accountant(settings))
            self._prefixes[config] = prefix
        while prefix.size < sealed:
            compose_entries(prefix.accountant, [pairs[prefix.size]], config.name)
            prefix.size += 1
        full = copy.deepcopy(prefix.accountant)
        compose_entries(full, pairs[sealed:], config.name)
        self._composed[config] = (self._version, full)
        return full

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Returns the ledger as plain, JSON-serialisable Python data.

        Returns:
            ``{"format": ..., "version": 1, "entries": [{"event": {...}, "count": n,
            "is_step": bool[, "sensitivity": S]}, ...]}``.
        """
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "entries": [
                {"event": event_to_dict(e), "count": int(c), "is_step": bool(s)}
                | ({} if c_ is None else {"sensitivity": float(c_)})
                for e, c, s, c_ in zip(self._events, self._counts, self._is_step,
                                       self._sensitivity, strict=True)
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces the ledger's contents with a saved state.

        Args:
            state: What :meth:`state_dict` returned (possibly after a JSON round trip).

        Raises:
            LedgerStateError: If ``state`` is malformed; the ledger is then unchanged.
        """
        fix = "Fix: pass what PrivacyLedger.state_dict() returned, unmodified."
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise LedgerStateError(f"This is not a PrivacyLedger state dict. {fix}")
        if state.get("version") != _STATE_VERSION:
            raise LedgerStateError(
                f"Ledger state version {state.get('version')!r} is not supported (this "
                f"privgrad reads version {_STATE_VERSION}). Fix: load it with the "
                "privgrad version that saved it."
            )
        raw_entries = state.get("entries")
        if not isinstance(raw_entries, list):
            raise LedgerStateError(f"state['entries'] must be a list. {fix}")
        fresh = PrivacyLedger()
        for i, raw in enumerate(raw_entries):
            keys = set(raw) if isinstance(raw, Mapping) else set()
            if not {"event", "count", "is_step"} <= keys <= {"event", "count", "is_step",
                                                           "sensitivity"}:
                raise LedgerStateError(
                    f"state['entries'][{i}] must have the keys event, count, is_step (and "
                    f"optionally sensitivity). {fix}"
                )
            count = raw["count"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise LedgerStateError(
                    f"state['entries'][{i}]['count']={count!r} is not an int >= 1. {fix}"
                )
            if not isinstance(raw["is_step"], bool):
                raise LedgerStateError(f"state['entries'][{i}]['is_step'] must be a bool. {fix}")
            try:
                sensitivity = _check_sensitivity(raw.get("sensitivity"))
            except PrivacyParameterError as e:
                raise LedgerStateError(f"state['entries'][{i}]: {e} {fix}") from e
            fresh._append(event_from_dict(raw["event"]), count, raw["is_step"], sensitivity)
        self._events, self._counts, self._is_step = fresh._events, fresh._counts, fresh._is_step
        self._sensitivity = fresh._sensitivity
        self._steps = fresh._steps
        self._version += 1
        self._last_key = None
        self._clear_caches()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """Builds a new ledger from a saved state (see :meth:`load_state_dict`)."""
        ledger = cls()
        ledger.load_state_dict(state)
        return ledger


def _check_sensitivity(value: float | None) -> float | None:
    """``value`` as a float >= 0 (``inf`` allowed for σ = 0 runs), or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise PrivacyParameterError(
            f"sensitivity={value!r} must be a number >= 0 (the clipping threshold C of the "
            "step). Fix: pass engine.max_grad_norm, or None."
        )
    return float(value)
