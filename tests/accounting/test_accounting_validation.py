"""Input validation: every bad privacy parameter is rejected with a fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privgrad.accounting import (
    AccountingError,
    PLDConfig,
    PrivacyParameterError,
    RDPConfig,
    epsilon,
    resolve_accountant,
)
from privgrad.accounting.validation import resolve_steps

GOOD = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "delta": 1e-5}


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": math.nan}, "sample_rate"),
        ({"sample_rate": "0.1"}, "sample_rate"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"noise_multiplier": True}, "noise_multiplier"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"steps": math.inf}, "steps"),
        ({"steps": "100"}, "steps"),
        ({"steps": None}, "neither"),
        ({"epochs": 3}, "both"),
        ({"steps": None, "epochs": -1.0}, "epochs"),
        ({"accountant": "prv"}, "accountant"),
    ],
)
def test_epsilon_rejects_bad_input(override: dict, names: str) -> None:
    kwargs = {**GOOD, **override}
    with pytest.raises(PrivacyParameterError, match=names) as info:
        epsilon(**kwargs)
    assert "Fix:" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AccountingError)


def test_numpy_scalars_and_integral_floats_are_accepted() -> None:
    a = epsilon(np.float32(1.0), np.float64(0.01), np.int64(100), delta=1e-5, accountant="rdp")
    b = epsilon(1.0, 0.01, 100.0, delta=1e-5, accountant="rdp")
    c = epsilon(1.0, 0.01, 100, delta=1e-5, accountant="rdp")
    assert a == b == c


@pytest.mark.parametrize(
    ("epochs", "q", "steps"),
    [(1, 0.01, 100), (3, 0.03, 100), (60, 256 / 60000, 14063), (0.5, 0.3, 2), (0, 0.5, 0)],
)
def test_resolve_steps_from_epochs(epochs: float, q: float, steps: int) -> None:
    assert resolve_steps(None, epochs, q) == steps


def test_accountant_resolution() -> None:
    assert resolve_accountant("PLD") == PLDConfig()
    assert resolve_accountant("rdp") == RDPConfig()
    config = PLDConfig(1e-3)
    assert resolve_accountant(config) is config
    with pytest.raises(PrivacyParameterError, match="value_discretization_interval"):
        PLDConfig(0.0)
    with pytest.raises(PrivacyParameterError, match="orders"):
        RDPConfig(orders=(0.5, 2.0))
    with pytest.raises(PrivacyParameterError, match="orders"):
        RDPConfig(orders=())
    assert RDPConfig(orders=[2, 3]).orders == (2.0, 3.0)  # type: ignore[arg-type]


def test_pld_refuses_a_count_it_cannot_compose_and_rdp_answers() -> None:
    # dp_accounting's PLD self-composition of 10**12 steps never ends; the library must
    # refuse at once (naming the fix), not hang, and rdp must answer for the same run.
    import time

    start = time.perf_counter()
    with pytest.raises(AccountingError, match="accountant='rdp'"):
        epsilon(1.0, 0.01, 10**12, delta=1e-5, accountant="pld")
    with pytest.raises(AccountingError, match="limited to 1,000,000"):
        epsilon(1.0, 0.01, 10**6 + 1, delta=1e-5)
    assert time.perf_counter() - start < 5.0
    assert math.isfinite(epsilon(1.0, 0.01, 10**12, delta=1e-5, accountant="rdp"))
