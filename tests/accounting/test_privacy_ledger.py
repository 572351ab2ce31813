"""PrivacyLedger: merging, caching, incremental composition and state round trips."""

from __future__ import annotations

import json
import math
import time

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

import privgrad.accounting.ledger as ledger_module
from privgrad.accounting import (
    DEFAULT_RDP_ORDERS,
    LedgerEntry,
    LedgerStateError,
    PLDConfig,
    PrivacyLedger,
    PrivacyParameterError,
    effective_noise_multiplier,
    epsilon,
    shared_sample_step,
    suggest_pld_interval,
)

DELTA = 1e-5


def _step(sigma: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def _schedule_ledger() -> PrivacyLedger:
    ledger = PrivacyLedger()
    for _ in range(300):
        ledger.record(1.0, 0.01)
    ledger.record(1.5, 0.01, steps=200)
    ledger.record(1.5, 0.02, steps=100)
    ledger.record(1.0, 0.01, steps=50)
    return ledger


def test_identical_steps_merge() -> None:
    ledger = PrivacyLedger()
    ledger.record(1.1, 0.01)
    ledger.record(1.1, 0.01, steps=4)
    ledger.record_event(_step(1.1, 0.01), 5)
    assert ledger.entries == (LedgerEntry(_step(1.1, 0.01), 10, True),)
    assert ledger.steps == 10
    assert len(ledger) == 1


def test_changes_start_new_entries() -> None:
    ledger = _schedule_ledger()
    assert [(e.event, e.count) for e in ledger.entries] == [
        (_step(1.0, 0.01), 300),
        (_step(1.5, 0.01), 200),
        (_step(1.5, 0.02), 100),
        (_step(1.0, 0.01), 50),
    ]
    assert ledger.steps == 650


def test_empty_zero_and_extra_releases() -> None:
    ledger = PrivacyLedger()
    assert ledger.epsilon(DELTA) == 0.0
    ledger.record(1.0, 0.01, steps=0)
    assert ledger.entries == ()
    ledger.record_event(dp_accounting.GaussianDpEvent(50.0), is_step=False)
    assert ledger.steps == 0
    assert ledger.epsilon(DELTA) > 0.0
    ledger.record(0.0, 0.01)
    assert ledger.epsilon(DELTA) == math.inf
    assert ledger.epsilon(DELTA, accountant="rdp") == math.inf


def test_matches_direct_dp_accounting_composition() -> None:
    ledger = _schedule_ledger()
    runs = [((1.0, 0.01), 300), ((1.5, 0.01), 200), ((1.5, 0.02), 100), ((1.0, 0.01), 50)]
    history = dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(_step(s, q), n) for (s, q), n in runs]
    )
    interval = suggest_pld_interval([(_step(s, q), n) for (s, q), n in runs])

    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    assert ledger.epsilon(DELTA) == pytest.approx(
        pld.compose(history).get_epsilon(DELTA), rel=1e-12
    )

    pld_fixed = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    assert ledger.epsilon(DELTA, accountant=PLDConfig(1e-4)) == pytest.approx(
        pld_fixed.compose(history).get_epsilon(DELTA), rel=1e-12
    )

    rdp = rdp_privacy_accountant.RdpAccountant(orders=list(DEFAULT_RDP_ORDERS))
    assert ledger.epsilon(DELTA, accountant="rdp") == pytest.approx(
        rdp.compose(history).get_epsilon(DELTA), rel=1e-12
    )


def test_ledger_of_constant_steps_equals_epsilon_function() -> None:
    ledger = PrivacyLedger()
    ledger.record(1.1, 256 / 60000, steps=14063)
    for accountant in ("pld", "rdp"):
        assert ledger.epsilon(DELTA, accountant=accountant) == epsilon(
            1.1, 256 / 60000, 14063, delta=DELTA, accountant=accountant
        )


def test_epsilon_grows_as_identical_steps_are_recorded() -> None:
    ledger = PrivacyLedger()
    values = []
    for _ in range(5):
        ledger.record(1.0, 0.01, steps=200)
        values.append(ledger.epsilon(DELTA))
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_hundred_thousand_steps_are_fast() -> None:
    ledger = PrivacyLedger()
    start = time.perf_counter()
    for _ in range(100_000):
        ledger.record(1.0, 0.01)
    recorded = time.perf_counter()
    first = ledger.epsilon(DELTA)
    first_done = time.perf_counter()
    second = ledger.epsilon(DELTA)
    second_done = time.perf_counter()
    assert ledger.steps == 100_000 and len(ledger) == 1
    assert recorded - start < 5.0
    assert first_done - recorded < 5.0
    assert second_done - first_done < 1.0
    assert first == second == pytest.approx(epsilon(1.0, 0.01, 100_000, delta=DELTA))


class _CountingCompose:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entries_composed = 0
        original = ledger_module.compose_entries

        def counting(accountant, entries, name):
            entries = list(entries)
            self.entries_composed += len(entries)
            return original(accountant, entries, name)

        monkeypatch.setattr(ledger_module, "compose_entries", counting)


def test_cached_and_incremental_composition(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _CountingCompose(monkeypatch)
    ledger = _schedule_ledger()  # 4 entries
    eps = ledger.epsilon(DELTA)
    assert counter.entries_composed == 4

    # Unchanged ledger: a look-up, no composition (also for a new δ).
    assert ledger.epsilon(DELTA) == eps
    assert counter.entries_composed == 4
    ledger.epsilon(1e-6)
    assert counter.entries_composed == 4

    # More of the same last step: only the last entry is composed again.
    ledger.record(1.0, 0.01, steps=10)
    ledger.epsilon(DELTA)
    assert counter.entries_composed == 5

    # A new step kind: the previous last entry is sealed into the prefix, plus the tail.
    ledger.record(1.2, 0.01, steps=10)
    ledger.epsilon(DELTA)
    assert counter.entries_composed == 7

    # A second accountant keeps its own cache.
    ledger.epsilon(DELTA, accountant="rdp")
    assert counter.entries_composed == 7 + 5


def test_incremental_equals_fresh() -> None:
    incremental = PrivacyLedger()
    for sigma in (1.0, 1.2, 1.4, 1.6):
        incremental.record(sigma, 0.01, steps=100)
        incremental.epsilon(DELTA)
        incremental.record(sigma, 0.01, steps=100)
        incremental.epsilon(DELTA, accountant="rdp")
    fresh = PrivacyLedger()
    for sigma in (1.0, 1.2, 1.4, 1.6):
        fresh.record(sigma, 0.01, steps=200)
    for accountant in ("pld", "rdp"):
        assert incremental.epsilon(DELTA, accountant) == fresh.epsilon(DELTA, accountant)


def test_state_dict_round_trip() -> None:
    ledger = _schedule_ledger()
    ledger.record_event(shared_sample_step(0.01, [1.0, 4.0]), 20)
    ledger.record_event(dp_accounting.GaussianDpEvent(30.0), is_step=False)
    state = ledger.state_dict()
    restored = PrivacyLedger.from_state_dict(json.loads(json.dumps(state)))
    assert restored.entries == ledger.entries
    assert restored.steps == ledger.steps == 670
    for accountant in ("pld", "rdp"):
        assert restored.epsilon(DELTA, accountant) == ledger.epsilon(DELTA, accountant)
    assert restored.state_dict() == state

    # Loading replaces contents; recording then continues merging.
    other = PrivacyLedger()
    other.record(9.0, 0.5, steps=3)
    other.load_state_dict(state)
    assert other.entries == ledger.entries
    other.record_event(dp_accounting.GaussianDpEvent(30.0), is_step=False)
    assert other.entries[-1].count == 2


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(format="opacus"),
        lambda s: s.update(version=99),
        lambda s: s.update(entries="nope"),
        lambda s: s["entries"][0].update(count=0),
        lambda s: s["entries"][0].update(count=True),
        lambda s: s["entries"][0].update(is_step="yes"),
        lambda s: s["entries"][0].update(extra=1),
        lambda s: s["entries"][0]["event"].update(type="os.system"),
        lambda s: s["entries"][0]["event"].update(bogus=1.0),
    ],
)
def test_bad_state_is_rejected_and_ledger_unchanged(mutate) -> None:
    ledger = _schedule_ledger()
    state = ledger.state_dict()
    mutate(state)
    target = PrivacyLedger()
    target.record(2.0, 0.1, steps=7)
    before = target.entries
    with pytest.raises(LedgerStateError):
        target.load_state_dict(state)
    assert target.entries == before and target.steps == 7


def test_shared_sample_release_is_one_gaussian() -> None:
    sigma, sigma_count, q = 1.0, 4.0, 0.01
    ledger = PrivacyLedger()
    ledger.record_event(shared_sample_step(q, [sigma, sigma_count]), 1000)
    sigma_eff = effective_noise_multiplier([sigma, sigma_count])
    assert sigma_eff == pytest.approx((1 / sigma**2 + 1 / sigma_count**2) ** -0.5)
    for accountant in ("pld", "rdp"):
        assert ledger.epsilon(DELTA, accountant) == pytest.approx(
            epsilon(sigma_eff, q, 1000, delta=DELTA, accountant=accountant), rel=1e-12
        )
    # The nested form dp_accounting's RDP accountant understands is accepted too,
    # and by both accountants (privgrad rewrites it for PLD).
    nested = PrivacyLedger()
    nested.record_event(
        dp_accounting.PoissonSampledDpEvent(
            q,
            dp_accounting.ComposedDpEvent(
                [dp_accounting.GaussianDpEvent(sigma), dp_accounting.GaussianDpEvent(sigma_count)]
            ),
        ),
        1000,
    )
    for accountant in ("pld", "rdp"):
        assert nested.epsilon(DELTA, accountant) == pytest.approx(
            ledger.epsilon(DELTA, accountant), rel=1e-9
        )
    # Accounting the two releases as separately sampled would understate the loss.
    separate = PrivacyLedger()
    separate.record_event(
        dp_accounting.ComposedDpEvent([_step(sigma, q), _step(sigma_count, q)]), 1000
    )
    assert separate.epsilon(DELTA) < ledger.epsilon(DELTA)


def test_record_validates() -> None:
    ledger = PrivacyLedger()
    with pytest.raises(PrivacyParameterError, match="sample_rate"):
        ledger.record(1.0, 0.0)
    with pytest.raises(PrivacyParameterError, match="noise_multiplier"):
        ledger.record(-1.0, 0.1)
    with pytest.raises(PrivacyParameterError, match="steps"):
        ledger.record(1.0, 0.1, steps=-1)
    with pytest.raises(PrivacyParameterError, match="DpEvent"):
        ledger.record_event((1.0, 0.1))  # type: ignore[arg-type]
    with pytest.raises(LedgerStateError, match="Neither"):
        ledger.record_event(dp_accounting.UnsupportedDpEvent())
    with pytest.raises(PrivacyParameterError, match="delta"):
        ledger.epsilon(0.0)
    assert ledger.entries == () and ledger.steps == 0
