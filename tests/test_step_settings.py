"""Privacy settings between steps: C, σ, q and the normaliser, set and validated.

Issue 18 items 11 and 13: the threshold is a per-step argument (refused mid-step, the
noise follows it, the trace and the ledger record it), and a bad σ, q or normaliser set
on an engine is refused before anything moves.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from privgrad.errors import GradientStateError


def make(**kw):
    torch.manual_seed(0)
    model = nn.Linear(50, 40)
    cfg = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
               sample_rate=0.01, seed=0)
    cfg.update(kw)
    return model, pg.DPEngine(model, **cfg)


def losses(model, n=4, scale=1.0):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 50, generator=g), torch.randint(0, 40, (n,), generator=g)
    return scale * F.cross_entropy(model(x), y, reduction="none")


def test_threshold_set_between_steps_is_used_recorded_and_noised():
    model, engine = make()
    engine.backward(losses(model, scale=100.0))
    model.zero_grad()
    engine.max_grad_norm = 2.5
    assert engine.max_grad_norm == 2.5 and engine.noise_std == 2.5
    trace = engine.backward(losses(model, scale=100.0))
    model.zero_grad()
    assert trace.max_grad_norm == 2.5 and trace.noise_std == 2.5
    torch.testing.assert_close(trace.clip_factors, pg.clipping.clip_factors(trace.norms, 2.5))
    clipped = trace.per_sample_grads(clipped=True)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in clipped.values()))
    torch.testing.assert_close(norms, torch.full((4,), 2.5), rtol=1e-5, atol=0)
    # The noise follows C: its empirical std over 2040 values is σ·C = 2.5 (±5%).
    std = torch.cat([t.flatten() for t in trace.noise.values()]).std()
    assert abs(float(std) / 2.5 - 1) < 0.05, float(std)
    # The ledger's record of the run: two entries with their C; ε as for 2 steps of (σ, q).
    assert [(e.count, e.sensitivity) for e in engine.ledger.entries] == [(1, 1.0), (1, 2.5)]
    want = dp_accounting.pld.PLDAccountant()
    want.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)),
                 2)
    assert engine.epsilon(1e-5) == pytest.approx(want.get_epsilon(1e-5), rel=1e-3)


def test_threshold_change_mid_step_is_refused_and_changes_nothing():
    model, engine = make()
    engine.accumulate(losses(model))
    with pytest.raises(GradientStateError, match="middle of a logical step.*engine.step"):
        engine.max_grad_norm = 3.0
    with pytest.raises(GradientStateError, match="middle of a logical step"):
        engine.clipping = pg.clipping.PerLayer(1.0)
    assert engine.max_grad_norm == 1.0
    trace = engine.step()
    assert trace.max_grad_norm == 1.0 and engine.ledger.entries[0].sensitivity == 1.0


def test_rules_take_a_new_threshold_or_say_how():
    model, engine = make(max_grad_norm=None, clipping=pg.clipping.Automatic(1.0))
    engine.max_grad_norm = 0.5
    assert engine.clipping == pg.clipping.Automatic(0.5) and engine.noise_std == 0.5
    for rule in (pg.clipping.PerLayer(1.0), pg.clipping.PerLayer({"weight": 1.0, "bias": 0.5})):
        model, engine = make(max_grad_norm=None, clipping=rule)
        with pytest.raises(ValueError, match=r"engine.clipping = pg.clipping.PerLayer"):
            engine.max_grad_norm = engine.max_grad_norm  # the total: not a group's threshold
        assert engine.clipping == rule
    engine.clipping = pg.clipping.PerLayer({"weight": 3.0, "bias": 4.0})
    assert engine.max_grad_norm == pytest.approx(5.0)
    engine.backward(losses(model))
    model.zero_grad()
    _, fresh = make(max_grad_norm=None, clipping=pg.clipping.PerLayer(1.0))
    fresh.load_state_dict(engine.state_dict())  # the groups' thresholds come back, not √L·C
    assert fresh.plan.max_norms == {"weight": 3.0, "bias": 4.0}
    fresh.load_state_dict(fresh.state_dict())
    assert fresh.plan.max_norms == {"weight": 3.0, "bias": 4.0}
    model, engine = make(max_grad_norm=None, clipping=pg.clipping.Adaptive(initial_max_norm=1.0))
    engine.max_grad_norm = 0.25  # the adaptive threshold moves on from there
    trace = engine.backward(losses(model))
    assert trace.max_grad_norm == 0.25 and engine.max_grad_norm != 0.25


def test_a_threshold_of_1e300_is_not_infinite_and_an_overflowing_noise_is_refused():
    model, engine = make(noise_multiplier=0.0, max_grad_norm=1e300)
    assert engine.max_grad_norm == 1e300 and engine.noise_std == 0.0
    trace = engine.backward(losses(model))
    assert trace.max_grad_norm == 1e300 and engine.ledger.entries[0].sensitivity == 1e300
    with pytest.raises(ValueError, match=r"σ·S = 1 × 1e\+300.*float32.*Fix"):
        make(max_grad_norm=1e300)  # float32 noise of std 1e300 would write ±inf into p.grad
    model, engine = make()
    with pytest.raises(ValueError, match="does not fit in float32"):
        engine.max_grad_norm = 1e37
    assert engine.max_grad_norm == 1.0
    torch.manual_seed(0)
    model = nn.Linear(50, 40).double()  # float64 noise: 1e300 fits
    engine = pg.DPEngine(model, noise_multiplier=1.0, clipping=pg.clipping.PerLayer(
        {"weight": 1e300, "bias": 1e300}), expected_batch_size=4.0, sample_rate=0.01, seed=0)
    assert engine.max_grad_norm == pytest.approx(math.sqrt(2) * 1e300)
    x = torch.randn(4, 50, dtype=torch.float64)
    trace = engine.backward(F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long),
                                            reduction="none"))
    assert math.isfinite(trace.max_grad_norm)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize(("name", "value"), [
    ("noise_multiplier", -1.0), ("noise_multiplier", math.nan), ("noise_multiplier", math.inf),
    ("sample_rate", 0.0), ("sample_rate", 1.5), ("sample_rate", math.nan),
    ("expected_batch_size", 0.0), ("expected_batch_size", -3.0),
    ("expected_batch_size", math.inf), ("max_grad_norm", -1.0), ("max_grad_norm", math.nan),
])
def test_bad_settings_are_refused_before_anything_moves(name, value):
    model, engine = make()
    engine.backward(losses(model))
    model.zero_grad()
    before = (engine.noise_multiplier, engine.sample_rate, engine.expected_batch_size,
              engine.max_grad_norm, engine.steps, engine.ledger.steps)
    with pytest.raises(ValueError, match=r"Fix"):
        setattr(engine, name, value)
    assert (engine.noise_multiplier, engine.sample_rate, engine.expected_batch_size,
            engine.max_grad_norm, engine.steps, engine.ledger.steps) == before
    trace = engine.backward(losses(model))
    assert engine.steps == engine.ledger.steps == 2
    assert all(bool(torch.isfinite(g).all()) for g in trace.private_grad.values())


def test_infinite_threshold_with_noise_is_refused_either_way():
    model, engine = make(noise_multiplier=0.0, max_grad_norm=math.inf)
    with pytest.raises(ValueError, match="infinite noise"):
        engine.noise_multiplier = 1.0
    model, engine = make()
    with pytest.raises(ValueError, match="infinite noise"):
        engine.max_grad_norm = math.inf
    assert engine.max_grad_norm == 1.0


def test_settings_changed_between_steps_survive_a_restore():
    model, engine = make()
    engine.backward(losses(model))
    model.zero_grad()
    engine.max_grad_norm, engine.noise_multiplier, engine.expected_batch_size = 2.0, 1.5, 8.0
    engine.sample_rate = 0.02
    state = engine.state_dict()
    _, fresh = make()
    fresh.load_state_dict(state)
    assert (fresh.max_grad_norm, fresh.noise_multiplier, fresh.expected_batch_size,
            fresh.sample_rate) == (2.0, 1.5, 8.0, 0.02)
    assert fresh.epsilon(1e-5) == engine.epsilon(1e-5)
    bad = dict(state, sample_rate=2.0)
    _, other = make()
    with pytest.raises(ValueError):
        other.load_state_dict(bad)
    assert other.steps == 0 and other.ledger.steps == 0 and other.sample_rate == 0.01
