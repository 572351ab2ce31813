"""privgrad's accounting checked against values published or computed outside privgrad."""

from __future__ import annotations

import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from privgrad.accounting import (
    DEFAULT_RDP_ORDERS,
    OPACUS_RDP_ORDERS,
    RDPConfig,
    epsilon,
)

opacus_accountants = pytest.importorskip("opacus.accountants")

DELTA = 1e-5

# Opacus's own unit test (opacus/tests/accountants_test.py): σ = 1.5, q = 0.04,
# int(90 / 0.04) = 2250 steps, δ = 1e-5 → RDP ε = 7.32911117143.
OPACUS_PUBLISHED_EPSILON = 7.32911117143

# TF-Privacy MNIST tutorial: 60,000 images, batch 256, σ = 1.1, 60 epochs, δ = 1e-5
# → "ε = 3.01" (RDP with the pre-2020 conversion ε = min_α rdp(α) - log δ / (α - 1)).
MNIST_Q = 256 / 60000
MNIST_SIGMA = 1.1
MNIST_EPOCHS = 60
TF_PRIVACY_PUBLISHED_EPSILON = 3.01


def test_our_opacus_orders_are_opacus_defaults() -> None:
    assert list(OPACUS_RDP_ORDERS) == list(opacus_accountants.RDPAccountant.DEFAULT_ALPHAS)
    assert set(OPACUS_RDP_ORDERS) <= set(DEFAULT_RDP_ORDERS)
    assert set(rdp_privacy_accountant.DEFAULT_RDP_ORDERS) <= set(DEFAULT_RDP_ORDERS)


def test_opacus_published_rdp_value() -> None:
    sigma, q, steps = 1.5, 0.04, int(90 / 0.04)
    assert steps == 2250
    opacus_acc = opacus_accountants.RDPAccountant()
    for _ in range(steps):
        opacus_acc.step(noise_multiplier=sigma, sample_rate=q)
    eps_opacus = opacus_acc.get_epsilon(delta=DELTA)
    # The installed Opacus still reproduces its published value.
    assert eps_opacus == pytest.approx(OPACUS_PUBLISHED_EPSILON, abs=1e-6)

    eps_same_orders = epsilon(sigma, q, steps, delta=DELTA, accountant=RDPConfig(OPACUS_RDP_ORDERS))
    eps_default = epsilon(sigma, q, steps, delta=DELTA, accountant="rdp")
    # dp_accounting and Opacus evaluate fractional-order RDP slightly differently
    # (7.32933 vs 7.32911): agreement to 1e-4 relative.
    assert eps_same_orders == pytest.approx(eps_opacus, rel=1e-4)
    assert eps_same_orders == pytest.approx(OPACUS_PUBLISHED_EPSILON, rel=1e-4)
    # More orders can only lower the minimum; here the optimum is inside Opacus's range.
    assert eps_default <= eps_same_orders
    assert eps_default == pytest.approx(eps_same_orders, rel=1e-9)
    # The PLD accountant is tighter.
    eps_pld = epsilon(sigma, q, steps, delta=DELTA)
    assert eps_pld < eps_default
    assert eps_pld == pytest.approx(6.769, rel=2e-3)


def test_tf_privacy_mnist_tutorial() -> None:
    steps = math.ceil(MNIST_EPOCHS / MNIST_Q)
    assert steps == 14063

    # The pre-2020 RDP → (ε, δ) conversion, applied to dp_accounting's RDP curve at
    # the orders TF-Privacy used (the same as Opacus's).
    acc = rdp_privacy_accountant.RdpAccountant(orders=list(OPACUS_RDP_ORDERS))
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(MNIST_Q, dp_accounting.GaussianDpEvent(MNIST_SIGMA)),
        steps,
    )
    orders = np.asarray(acc.orders)
    classic = float(np.min(acc.rdp - math.log(DELTA) / (orders - 1)))
    assert classic == pytest.approx(TF_PRIVACY_PUBLISHED_EPSILON, abs=5e-3)

    eps_rdp = epsilon(MNIST_SIGMA, MNIST_Q, epochs=MNIST_EPOCHS, delta=DELTA, accountant="rdp")
    eps_pld = epsilon(MNIST_SIGMA, MNIST_Q, epochs=MNIST_EPOCHS, delta=DELTA, accountant="pld")
    assert eps_rdp == epsilon(MNIST_SIGMA, MNIST_Q, steps, delta=DELTA, accountant="rdp")
    # Today's RDP conversion (Balle et al. 2020 / Asoodeh et al.) gives ≈ 2.60 ...
    assert eps_rdp == pytest.approx(2.597, abs=5e-3)
    # ... and the PLD accountant ≈ 2.38.
    assert eps_pld == pytest.approx(2.382, abs=5e-3)
    assert eps_pld < eps_rdp < classic


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "prv_eps_error"),
    [
        (MNIST_SIGMA, MNIST_Q, 14063, 1e-2),
        (0.8, 0.05, 500, 1e-2),
        (1.0, 0.02, 2000, 3e-3),
        (3.0, 0.002, 5000, 5e-4),  # small per-step loss: needs a fine PLD grid
    ],
)
def test_pld_agrees_with_opacus_prv(
    sigma: float, q: float, steps: int, prv_eps_error: float
) -> None:
    prv = opacus_accountants.PRVAccountant()
    for _ in range(steps):
        prv.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps_prv = prv.get_epsilon(delta=DELTA, eps_error=prv_eps_error)
    eps_pld = epsilon(sigma, q, steps, delta=DELTA)
    assert eps_pld == pytest.approx(eps_prv, rel=1e-2)
