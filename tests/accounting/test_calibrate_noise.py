"""calibrate_noise: round trips, guarantees, errors, and Opacus's calibration."""

from __future__ import annotations

import math

import pytest

from privgrad.accounting import (
    OPACUS_RDP_ORDERS,
    CalibrationError,
    PrivacyParameterError,
    RDPConfig,
    calibrate_noise,
    epsilon,
)

DELTA = 1e-5
MNIST_Q = 256 / 60000


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(0.8, 0.01, 1000), (1.1, MNIST_Q, 14063), (3.0, 0.05, 200), (10.0, 0.5, 5000)],
)
def test_calibrate_inverts_epsilon(sigma: float, q: float, steps: int, accountant: str) -> None:
    target = epsilon(sigma, q, steps, delta=DELTA, accountant=accountant)
    found = calibrate_noise(target, DELTA, q, steps, accountant=accountant)
    assert found == pytest.approx(sigma, rel=5e-3)
    reached = epsilon(found, q, steps, delta=DELTA, accountant=accountant)
    assert 0.995 * target <= reached <= target


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target", [0.1, 1.0, 8.0, 50.0])
def test_calibrated_epsilon_is_below_and_close_to_target(target: float, accountant: str) -> None:
    sigma = calibrate_noise(target, DELTA, MNIST_Q, epochs=20, accountant=accountant)
    reached = epsilon(sigma, MNIST_Q, epochs=20, delta=DELTA, accountant=accountant)
    assert (1 - 1e-3) * target <= reached <= target


def test_pld_needs_less_noise_than_rdp() -> None:
    sigma_pld = calibrate_noise(3.0, DELTA, MNIST_Q, epochs=60, accountant="pld")
    sigma_rdp = calibrate_noise(3.0, DELTA, MNIST_Q, epochs=60, accountant="rdp")
    assert sigma_pld < sigma_rdp


def test_matches_opacus_get_noise_multiplier() -> None:
    utils = pytest.importorskip("opacus.accountants.utils")
    # Opacus bisects until its ε is within 0.01 below the target.
    opacus_sigma = utils.get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=0.01, steps=3000, accountant="rdp"
    )
    ours = calibrate_noise(3.0, DELTA, 0.01, 3000, accountant=RDPConfig(OPACUS_RDP_ORDERS))
    assert ours <= opacus_sigma
    assert ours == pytest.approx(opacus_sigma, rel=5e-3)


def test_unreachable_small_target() -> None:
    with pytest.raises(CalibrationError, match="cannot be reached"):
        calibrate_noise(1e-9, DELTA, 1.0, 10**6, accountant="rdp")


def test_uselessly_large_target() -> None:
    with pytest.raises(CalibrationError, match="looser"):
        calibrate_noise(1e6, DELTA, 0.001, 10, accountant="rdp")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": -3}, "steps"),
        ({"steps": 0}, "steps=0"),
        ({"epochs": 2.0}, "both"),
        ({"steps": None}, "neither"),
        ({"rtol": 0.1}, "rtol"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.01, "steps": 100}
    args.update(kwargs)
    with pytest.raises(PrivacyParameterError, match=match):
        calibrate_noise(**args)
