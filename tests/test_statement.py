"""The privacy statement: its ε against dp_accounting computed directly, ranges, public inputs."""

from __future__ import annotations

import dataclasses
import json

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from torch import nn

import privgrad as pg
from privgrad.accounting import DEFAULT_RDP_ORDERS, PLDConfig
from privgrad.errors import PrivgradError
from privgrad.statement import PrivacyStatement, StatementError, render_html, render_text

# (σ, q, C, steps) of a schedule that changes every setting between steps
RDP_ORDERS = list(DEFAULT_RDP_ORDERS)
SCHEDULE = [(1.1, 0.02, 1.0, 3), (0.9, 0.05, 2.5, 2), (1.7, 0.02, 0.5, 1)]


def _steps(engine: pg.DPEngine, model: nn.Module, n: int) -> list[float]:
    """Takes ``n`` steps on random data; returns the threshold each trace reports."""
    used = []
    for _ in range(n):
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        model.zero_grad(set_to_none=True)
        used.append(engine.backward(F.cross_entropy(model(x), y, reduction="none")).max_grad_norm)
    return used


def _scheduled_engine() -> pg.DPEngine:
    model = nn.Linear(4, 3)
    sigma, q, c, _ = SCHEDULE[0]
    engine = pg.DPEngine(model, sigma, max_grad_norm=c, expected_batch_size=6, sample_rate=q)
    for sigma, q, c, n in SCHEDULE:
        engine.noise_multiplier, engine.sample_rate, engine.max_grad_norm = sigma, q, c
        _steps(engine, model, n)
    return engine


def _pld(interval: float) -> dp_accounting.PrivacyAccountant:
    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)


def _direct(accountant: dp_accounting.PrivacyAccountant) -> dp_accounting.PrivacyAccountant:
    """SCHEDULE composed by dp_accounting itself, without privgrad."""
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
        for sigma, q, _, n in SCHEDULE])
    return accountant.compose(event)


def test_epsilons_are_dp_accountings_and_ranges_follow_the_schedule() -> None:
    engine = _scheduled_engine()
    deltas = (1e-5, 1e-6, 1e-7)
    rdp = engine.privacy_statement(deltas=deltas, accountant="rdp")
    pld = engine.privacy_statement(deltas=deltas,
                                   accountant=PLDConfig(value_discretization_interval=1e-3))
    auto = engine.privacy_statement(deltas=deltas)  # privgrad's own interval
    direct_rdp = _direct(rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS))
    direct_pld, direct_fine = _direct(_pld(1e-3)), _direct(_pld(1e-4))
    for delta in deltas:
        assert rdp.epsilon(delta) == pytest.approx(direct_rdp.get_epsilon(delta), rel=1e-12)
        assert pld.epsilon(delta) == pytest.approx(direct_pld.get_epsilon(delta), rel=1e-12)
        fine = direct_fine.get_epsilon(delta)
        assert auto.epsilon(delta) == pytest.approx(fine, rel=1e-2)  # privgrad picks the grid
    assert [d for d, _ in auto.epsilons] == list(deltas)
    assert auto.steps == 6 and [r.steps for r in auto.schedule] == [3, 2, 1]
    assert auto.sample_rate == (0.02, 0.05)
    assert auto.noise_multiplier == (0.9, 1.7)
    assert auto.sensitivity == (0.5, 2.5)
    assert [(r.noise_multiplier, r.sample_rate, r.sensitivity) for r in auto.schedule] == [
        (s, q, c) for s, q, c, _ in SCHEDULE]
    text = auto.to_text()
    assert "from 0.9 to 1.7 (changed between steps)" in text
    assert "from 0.5 to 2.5 (changed between steps)" in text
    assert ("Schedule: 3 × (q 0.02, σ 1.1, S 1); 2 × (q 0.05, σ 0.9, S 2.5); "
            "1 × (q 0.02, σ 1.7, S 0.5)\n") in text
    assert "add or remove one example" in text and "Poisson" in text
    assert "pld: dp_accounting" in text and "rdp: dp_accounting" in rdp.to_text()


def test_one_setting_is_stated_as_one_value_and_round_trips_through_json() -> None:
    model = nn.Linear(4, 3)
    engine = pg.DPEngine(model, 1.3, max_grad_norm=0.7, expected_batch_size=6, sample_rate=0.03)
    _steps(engine, model, 4)
    s = engine.privacy_statement(deltas=1e-6)
    want = _direct_one(1.3, 0.03, 4, 1e-6)
    assert s.epsilon(1e-6) == pytest.approx(want, rel=1e-2) and s.epsilon(1e-6) >= want
    assert (s.sample_rate, s.noise_multiplier, s.sensitivity) == ((0.03, 0.03), (1.3, 1.3),
                                                                (0.7, 0.7))
    d = json.loads(json.dumps(s.to_dict()))
    assert render_text(d) == s.to_text() and render_html(d) == s.to_html()
    assert "Noise multiplier σ: 1.3\n" in s.to_text()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 5  # a statement is a value


def _direct_one(sigma: float, q: float, n: int, delta: float) -> float:
    acc = _pld(1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(delta)


def test_public_inputs_list_the_dataset_size_when_given() -> None:
    model = nn.Linear(4, 3)
    engine = pg.DPEngine(model, 1.0, max_grad_norm=1.0, expected_batch_size=6, sample_rate=0.05)
    _steps(engine, model, 1)
    without = engine.privacy_statement()
    assert not any("N = " in p for p in without.public)
    given = engine.privacy_statement(public=("the number of classes K = 3",), dataset_size=120)
    assert any("dataset size N = 120" in p for p in given.public)
    assert "the number of classes K = 3" in given.public
    for s in (without, given):  # how to keep N private is always said
        assert "#571" in s.keep_n_private and "#819" in s.keep_n_private
        assert "sample_rate=q" in s.keep_n_private
        assert "NOT covered" in s.not_covered
    html = given.to_html()
    assert "dataset size N = 120" in html and "<script" not in html
    with pytest.raises(StatementError, match="dataset_size"):
        engine.privacy_statement(dataset_size=0)


def test_a_huge_threshold_is_stated_as_itself_never_inf() -> None:
    model = nn.Linear(4, 3)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=1e300, expected_batch_size=6,
                         sample_rate=0.05)
    _steps(engine, model, 2)
    s = engine.privacy_statement()
    assert s.sensitivity == (1e300, 1e300)
    line = next(ln for ln in s.to_text().splitlines() if ln.startswith("Sensitivity S"))
    assert line == "Sensitivity S: 1e+300"
    assert "<td>1e+300</td>" in s.to_html()
    assert all(eps == float("inf") for _, eps in s.epsilons)  # σ = 0: truly no privacy


def test_adaptive_states_each_steps_threshold_and_the_effective_sigma() -> None:
    model = nn.Linear(4, 3)
    rule = pg.clipping.Adaptive(initial_max_norm=0.05, count_noise_multiplier=4.0)
    engine = pg.DPEngine(model, 1.2, clipping=rule, expected_batch_size=6, sample_rate=0.05)
    used = _steps(engine, model, 3)
    assert len(set(used)) == 3  # the threshold moved every step
    s = engine.privacy_statement()
    assert s.sensitivity == (min(used), max(used))
    effective = (1.2**-2 + 4.0**-2) ** -0.5
    assert s.noise_multiplier == pytest.approx((effective, effective), rel=1e-12)
    assert "σ_count = 4" in s.mechanism and "adaptive" in s.clipping


def test_no_statement_for_steps_whose_cost_is_unknown_and_an_empty_one_before_steps() -> None:
    model = nn.Linear(4, 3)
    engine = pg.DPEngine(model, 1.0, max_grad_norm=1.0, expected_batch_size=6)
    empty = engine.privacy_statement()
    assert isinstance(empty, PrivacyStatement)
    assert empty.steps == 0 and all(eps == 0.0 for _, eps in empty.epsilons)
    assert empty.sensitivity is None and "no step yet" in empty.to_text()
    _steps(engine, model, 1)
    with pytest.raises(StatementError, match="without a sample_rate") as info:
        engine.privacy_statement()
    assert isinstance(info.value, PrivgradError)
