"""Event builders, simplification and plain-Python serialisation."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privgrad.accounting import (
    LedgerStateError,
    PrivacyParameterError,
    dp_sgd_step,
    dp_sgd_steps,
    effective_noise_multiplier,
    event_epsilon,
    event_from_dict,
    event_to_dict,
    shared_sample_step,
    simplify_event,
)


def test_dp_sgd_step_structure() -> None:
    step = dp_sgd_step(1.1, 0.01)
    assert step == dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    assert dp_sgd_steps(1.1, 0.01, 7) == dp_accounting.SelfComposedDpEvent(step, 7)
    assert dp_sgd_steps(1.1, 0.01, 0) == dp_accounting.NoOpDpEvent()


def test_effective_noise_multiplier() -> None:
    assert effective_noise_multiplier([2.0]) == 2.0
    assert effective_noise_multiplier([2.0, 2.0]) == pytest.approx(2.0 / math.sqrt(2.0))
    assert effective_noise_multiplier([1.0, 0.0]) == 0.0
    with pytest.raises(PrivacyParameterError, match="empty"):
        effective_noise_multiplier([])
    with pytest.raises(PrivacyParameterError, match="noise_multiplier"):
        effective_noise_multiplier([1.0, -2.0])


def test_shared_sample_step() -> None:
    event = shared_sample_step(0.1, [3.0, 4.0])
    expected_sigma = (1 / 9 + 1 / 16) ** -0.5
    assert event.sampling_probability == 0.1
    assert event.event.noise_multiplier == pytest.approx(expected_sigma)


def test_simplify_event() -> None:
    gauss = dp_accounting.GaussianDpEvent
    nested = dp_accounting.PoissonSampledDpEvent(
        0.1,
        dp_accounting.ComposedDpEvent(
            [gauss(2.0), dp_accounting.SelfComposedDpEvent(gauss(4.0), 4)]
        ),
    )
    simple = simplify_event(dp_accounting.SelfComposedDpEvent(nested, 3))
    assert isinstance(simple, dp_accounting.SelfComposedDpEvent) and simple.count == 3
    assert simple.event.sampling_probability == 0.1
    assert simple.event.event.noise_multiplier == pytest.approx(2.0 / math.sqrt(2.0))
    # Anything that is not Gaussian-only is left alone.
    laplace = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.LaplaceDpEvent(1.0))
    assert simplify_event(laplace) == laplace
    assert simplify_event(gauss(1.0)) == gauss(1.0)


def test_event_epsilon_of_plain_gaussian() -> None:
    exact = dp_accounting.get_epsilon_gaussian(2.0, 1e-5)
    assert event_epsilon(dp_accounting.GaussianDpEvent(2.0), delta=1e-5) == pytest.approx(
        exact, rel=5e-3
    )
    assert event_epsilon(dp_accounting.GaussianDpEvent(2.0), delta=1e-5, count=0) == 0.0


_leaf = st.one_of(
    st.builds(
        dp_accounting.GaussianDpEvent, st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False)
    ),
    st.builds(dp_accounting.LaplaceDpEvent, st.floats(0.0, 100.0)),
    st.just(dp_accounting.NoOpDpEvent()),
    st.just(dp_accounting.NonPrivateDpEvent()),
)
_events = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(dp_accounting.PoissonSampledDpEvent, st.floats(0.0, 1.0), inner),
        st.builds(dp_accounting.SelfComposedDpEvent, inner, st.integers(1, 10**9)),
        st.builds(dp_accounting.ComposedDpEvent, st.lists(inner, max_size=3)),
    ),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None)
@given(_events)
def test_event_dict_round_trip(event: dp_accounting.DpEvent) -> None:
    plain = event_to_dict(event)
    assert event_from_dict(json.loads(json.dumps(plain))) == event


def test_event_from_dict_rejects_foreign_types() -> None:
    with pytest.raises(LedgerStateError, match="Unknown privacy event type"):
        event_from_dict({"type": "Popen", "args": ["rm"]})
    with pytest.raises(LedgerStateError, match="not a serialised privacy event"):
        event_from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(LedgerStateError):
        event_to_dict(object())  # type: ignore[arg-type]
