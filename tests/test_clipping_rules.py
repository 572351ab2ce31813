"""Automatic and Adaptive clipping against hand-computed values and the float64 oracle."""

import math

import pytest
import torch
from torch import nn

import privgrad as pg
from test_logical_steps import Net, data, losses_of, oracle, total_norms

MODES = ["auto", "ghost", "materialize", "vmap"]


def broadcast(f, g):
    return f.reshape(-1, *[1] * (g.dim() - 1))


# ---------------------------------------------------------------- Automatic


@pytest.mark.parametrize("mode", MODES)
def test_automatic_is_exact_in_every_mode(mode):
    torch.manual_seed(0)
    model = Net().double()
    x, y = data()
    want = oracle(model, x, y)  # before the engine exists: no hooks on the model yet
    norms = total_norms(want)
    C, gamma, ebs = float(norms.median()), 0.05, 10  # ebs != B: normalise by ebs
    rule = pg.clipping.Automatic(max_norm=C, stability=gamma)
    with pg.DPEngine(model, 0.0, clipping=rule, expected_batch_size=ebs, mode=mode) as engine:
        trace = engine.backward(losses_of(model, x, y))
    f = C / (norms + gamma)
    assert bool((f < 1).any()) and bool((f > 1).any())  # shrinks large, enlarges small grads
    torch.testing.assert_close(trace.norms, norms, rtol=1e-9, atol=0)
    torch.testing.assert_close(trace.clip_factors, f, rtol=1e-9, atol=0)
    assert trace.max_grad_norm == engine.max_grad_norm == C
    for n, p in model.named_parameters():
        expected = (broadcast(f, want[n]) * want[n]).sum(0) / ebs
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12, msg=n)
    post = trace.per_sample_grads(clipped=True)
    post_norms = total_norms(post)
    torch.testing.assert_close(post_norms, C * norms / (norms + gamma), rtol=1e-9, atol=0)
    assert bool((post_norms < C).all())


def test_automatic_noise_is_sigma_c():
    model = nn.Linear(400, 300)  # 120,300 coordinates
    sigma, C, ebs = 0.9, 3.0, 20
    engine = pg.DPEngine(model, sigma, clipping=pg.clipping.Automatic(C, 0.01),
                         expected_batch_size=ebs, seed=2)
    trace = engine.backward(model(torch.randn(4, 400)).sum(1))
    assert engine.noise_std == pytest.approx(sigma * C, rel=1e-12)
    noise = torch.cat([z.flatten() for z in trace.noise.values()]).double()
    assert abs(float(noise.std()) / (sigma * C) - 1) < 0.03


# ---------------------------------------------------------------- Adaptive


def adaptive_run(target, start, steps=150, B=500, seed=0):
    """Thresholds of an Adaptive run on norms |x| with x ~ Exp(1) (fresh draw every step)."""
    model = nn.Linear(1, 1, bias=False).double()  # loss = w·x: the per-sample grad is x
    rule = pg.clipping.Adaptive(target_quantile=target, initial_max_norm=start,
                                learning_rate=0.2, count_noise_multiplier=10.0)
    engine = pg.DPEngine(model, 0.0, clipping=rule, expected_batch_size=B, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        x = torch.empty(B, 1, dtype=torch.double).exponential_(generator=gen)
        engine.backward(model(x).squeeze(1))
        model.zero_grad()
        history.append(engine.max_grad_norm)
    engine.close()
    return history


@pytest.mark.parametrize(("target", "start"), [(0.5, 1.0), (0.9, 1.0), (0.5, 100.0),
                                               (0.5, 0.01)])
def test_adaptive_converges_to_the_target_quantile(target, start):
    quantile = -math.log(1 - target)  # of Exp(1): ln 2 for the median, ln 10 for 0.9
    history = adaptive_run(target, start)
    settled = sum(history[-50:]) / 50
    assert settled == pytest.approx(quantile, rel=0.05)
    assert min(history) > 0.5 * min(start, quantile)  # never collapses toward 0
    assert max(history) < 2 * max(start, quantile)  # nor runs away


def test_adaptive_clips_with_the_threshold_before_its_update():
    model = nn.Linear(1, 1, bias=False).double()
    x = torch.tensor([[0.1], [0.2], [0.5], [1.0], [2.0]], dtype=torch.double)
    eta, gamma, B = 0.2, 0.5, 5
    rule = pg.clipping.Adaptive(target_quantile=gamma, initial_max_norm=0.3, learning_rate=eta,
                                count_noise_multiplier=1e-9)  # a count that is exact to 1e-9
    engine = pg.DPEngine(model, 0.0, clipping=rule, expected_batch_size=B, seed=0)
    C = 0.3
    for _ in range(4):
        before = engine.max_grad_norm
        assert before == pytest.approx(C, rel=1e-9)
        trace = engine.backward(model(x).squeeze(1))
        norms = x.squeeze(1)
        assert trace.max_grad_norm == before
        f = torch.clamp(before / norms, max=1.0)
        assert bool((f < 1).any()) and bool((f == 1).any())
        torch.testing.assert_close(trace.clip_factors, f, rtol=1e-12, atol=0)
        torch.testing.assert_close(model.weight.grad.flatten(), (f * norms).sum(0, keepdim=True)
                                   / B, rtol=1e-12, atol=0)
        unclipped = int((norms <= C).sum())
        C = C * math.exp(-eta * (unclipped / B - gamma))  # Andrew et al., 2021
        assert engine.max_grad_norm == pytest.approx(C, rel=1e-8)
        model.zero_grad()
    assert C == pytest.approx(0.3 * math.exp(4 * 0.02))  # 2 of 5 unclipped < 0.5: C grew


def test_adaptive_noise_follows_the_threshold_of_the_step():
    model = nn.Linear(1, 1, bias=False).double()
    rule = pg.clipping.Adaptive(0.5, initial_max_norm=0.2, count_noise_multiplier=1.0)
    engine = pg.DPEngine(model, 1.5, clipping=rule, expected_batch_size=4, seed=0)
    x = torch.full((4, 1), 5.0, dtype=torch.double)  # all clipped: C grows every step
    stds = []
    for _ in range(3):
        before = engine.max_grad_norm
        trace = engine.backward(model(x).squeeze(1))
        assert trace.noise_std == pytest.approx(1.5 * before, rel=1e-12)
        stds.append(trace.noise_std)
        model.zero_grad()
    assert stds[0] < stds[1] < stds[2]


def test_adaptive_ledger_includes_the_count_release():
    sigma, sigma_count, q, steps, delta = 1.0, 2.0, 0.05, 3, 1e-5

    def run(clipping):
        model = nn.Linear(1, 1, bias=False).double()
        engine = pg.DPEngine(model, sigma, expected_batch_size=4, sample_rate=q, seed=0,
                             **clipping)
        for _ in range(steps):
            engine.backward(model(torch.rand(4, 1, dtype=torch.double)).squeeze(1))
            model.zero_grad()
        assert engine.ledger.steps == steps
        return engine

    flat = run({"max_grad_norm": 1.0})
    adaptive = run({"clipping": pg.clipping.Adaptive(count_noise_multiplier=sigma_count)})
    eff = (sigma**-2 + sigma_count**-2) ** -0.5  # one Gaussian release of both queries
    assert pg.accounting.effective_noise_multiplier([sigma, sigma_count]) == pytest.approx(
        eff, rel=1e-12)
    assert adaptive.ledger.entries[0].event == pg.accounting.dp_sgd_step(eff, q)
    eps_flat, eps_adaptive = flat.epsilon(delta), adaptive.epsilon(delta)
    assert eps_adaptive > eps_flat * 1.01
    assert eps_flat == pytest.approx(pg.accounting.epsilon(sigma, q, steps, delta=delta),
                                     rel=1e-6)
    assert eps_adaptive == pytest.approx(pg.accounting.epsilon(eff, q, steps, delta=delta),
                                         rel=1e-6)
    assert eps_adaptive == pytest.approx(
        pg.accounting.event_epsilon(pg.accounting.dp_sgd_steps(eff, q, steps), delta=delta),
        rel=1e-6)


def test_adaptive_state_dict_round_trip():
    torch.manual_seed(0)
    base = nn.Linear(3, 2).double()
    xs = [torch.randn(6, 3, dtype=torch.double) for _ in range(4)]

    def make(seed):
        model = nn.Linear(3, 2).double()
        model.load_state_dict(base.state_dict())
        rule = pg.clipping.Adaptive(0.5, initial_max_norm=1.0, count_noise_multiplier=3.0)
        return model, pg.DPEngine(model, 0.7, clipping=rule, expected_batch_size=6,
                                  sample_rate=0.1, seed=seed)

    model, engine = make(5)
    for x in xs[:3]:
        engine.backward(model(x).square().sum(1))
        model.zero_grad()
    saved = engine.state_dict()
    assert saved["max_grad_norm"] == engine.max_grad_norm != 1.0
    restored_model, restored = make(999)
    assert restored.max_grad_norm == 1.0
    restored.load_state_dict(saved)
    assert restored.max_grad_norm == engine.max_grad_norm
    assert restored.epsilon(1e-5) == engine.epsilon(1e-5)
    a = engine.backward(model(xs[3]).square().sum(1))
    b = restored.backward(restored_model(xs[3]).square().sum(1))
    assert a.max_grad_norm == b.max_grad_norm
    for n, p in model.named_parameters():
        assert torch.equal(a.noise[n], b.noise[n]), n
        torch.testing.assert_close(restored_model.get_parameter(n).grad, p.grad, rtol=0, atol=0)
    assert restored.max_grad_norm == engine.max_grad_norm  # same noisy count, same update
    assert restored.steps == engine.steps == 4


# ---------------------------------------------------------------- bad arguments

BAD_RULES = [
    (lambda: pg.clipping.Automatic(1.0, stability=0.0), "stability"),
    (lambda: pg.clipping.Automatic(1.0, stability=-0.1), "stability"),
    (lambda: pg.clipping.Automatic(-1.0), "max_norm"),
    (lambda: pg.clipping.Automatic(math.inf), "max_norm"),
    (lambda: pg.clipping.Adaptive(target_quantile=-0.1), "target_quantile"),
    (lambda: pg.clipping.Adaptive(target_quantile=1.5), "target_quantile"),
    (lambda: pg.clipping.Adaptive(target_quantile=math.nan), "target_quantile"),
    (lambda: pg.clipping.Adaptive(learning_rate=0.0), "learning_rate"),
    (lambda: pg.clipping.Adaptive(learning_rate=-0.2), "learning_rate"),
    (lambda: pg.clipping.Adaptive(count_noise_multiplier=-1.0), "count_noise_multiplier"),
    (lambda: pg.clipping.Adaptive(count_noise_multiplier=0.0), "count_noise_multiplier"),
    (lambda: pg.clipping.Adaptive(initial_max_norm=0.0), "initial_max_norm"),
    (lambda: pg.clipping.Adaptive(initial_max_norm=-1.0), "initial_max_norm"),
    (lambda: pg.clipping.Adaptive(initial_max_norm=math.inf), "initial_max_norm"),
]


@pytest.mark.parametrize(("build", "name"), BAD_RULES, ids=[f"{n}-{i}" for i, (_, n) in
                                                           enumerate(BAD_RULES)])
def test_bad_rule_arguments_are_refused_at_construction(build, name):
    with pytest.raises(ValueError, match=name) as info:
        build()
    assert "Fix:" in str(info.value)
