"""Logical steps made of physical batches: ``accumulate`` + ``step`` against one ``backward``
and against the batch-size-1 float64 oracle."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads
from privgrad.errors import TraceReleasedError

MODES = ["auto", "ghost", "materialize", "vmap"]
CHUNKS = (5, 5, 3)  # 13 samples in three physical batches
SAMPLES = [0, 7, 12]  # one sample of each physical batch


class Net(nn.Module):
    """Conv1d + LayerNorm + two Linear layers over a short sequence (T=5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.conv(x).transpose(1, 2)))  # (B, T, 6)
        return self.head(torch.tanh(self.fc(h)).mean(1))


def data(B=13):
    return torch.randn(B, 3, 5, dtype=torch.double), torch.randint(0, 3, (B,))


def losses_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def fresh(state):
    model = Net().double()
    model.load_state_dict(state)
    return model


def oracle(model, x, y):
    """``{name: (B, *shape)}`` by a loop of batch-size-1 backward passes (no engine hooks)."""
    return loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i : i + 1]), x)


def total_norms(grads, names=None):
    names = list(grads) if names is None else names
    return torch.sqrt(sum(grads[n].flatten(1).square().sum(1) for n in names))


def split_step(engine, model, x, y, chunks=CHUNKS, keep=(), retain=False):
    start = 0
    for size in chunks:
        xs, ys = x[start : start + size], y[start : start + size]
        count = engine.accumulate(losses_of(model, xs, ys), keep=keep, retain=retain)
        start += size
        assert count == start  # samples accumulated so far in this logical step
    return engine.step()


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def setup():
    """A model state, a batch of 13, its oracle per-sample grads and a C that clips some."""
    torch.manual_seed(0)
    state = Net().double().state_dict()
    x, y = data()
    want = oracle(fresh(state), x, y)
    C = float(total_norms(want).median())  # about half of the samples are clipped
    return state, x, y, want, C


GROUPS = ("conv", "norm", "fc", "head.weight", "head.bias")  # module paths and parameters


def group_names(want, key):
    return [n for n in want if n == key or n.startswith(key + ".")]


def thresholds(want):
    """Per-layer thresholds: the median norm of each group, so each group clips some samples."""
    return {k: float(total_norms(want, group_names(want, k)).median()) for k in GROUPS}


def rule_of(kind, C, want):
    if kind == "flat":
        return {"max_grad_norm": C}
    return {"clipping": pg.clipping.PerLayer(thresholds(want))}


def oracle_factors(want, kind, C):
    """Clip factors of each parameter, computed by hand from the oracle's per-sample grads."""
    if kind == "flat":
        f = torch.clamp(C / total_norms(want), max=1.0)
        return {n: f for n in want}
    out = {}
    for key, c in thresholds(want).items():
        names = group_names(want, key)
        f = torch.clamp(c / total_norms(want, names), max=1.0)
        out |= {n: f for n in names}
    return out


@pytest.mark.parametrize("kind", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", MODES)
def test_split_step_equals_one_backward_and_oracle(mode, kind):
    state, x, y, want, C = setup()
    whole = fresh(state)
    with pg.DPEngine(whole, 0.0, expected_batch_size=13, mode=mode, **rule_of(kind, C, want)) as e1:
        one = e1.backward(losses_of(whole, x, y))
    split = fresh(state)
    with pg.DPEngine(split, 0.0, expected_batch_size=13, mode=mode, **rule_of(kind, C, want)) as e2:
        trace = split_step(e2, split, x, y)
    factors = oracle_factors(want, kind, C)
    assert all(bool((f < 1).any()) and bool((f == 1).any()) for f in factors.values())
    got, ref = grads_of(split), grads_of(whole)
    for n, g in want.items():
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-12, msg=n)
        f = factors[n].reshape(-1, *[1] * (g.dim() - 1))
        torch.testing.assert_close(got[n], (f * g).sum(0) / 13, rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(trace.param_clip_factors[n], factors[n], rtol=1e-9, atol=0)
    assert trace.batch_size == one.batch_size == 13


def test_split_step_with_an_empty_physical_batch():
    state, x, y, want, C = setup()
    model = fresh(state)
    with pg.DPEngine(model, 0.0, max_grad_norm=C, expected_batch_size=10) as engine:
        trace = split_step(engine, model, x, y, chunks=(6, 0, 7))
    f = torch.clamp(C / total_norms(want), max=1.0)
    assert trace.batch_size == 13 and trace.norms.shape == (13,)
    torch.testing.assert_close(trace.clip_factors, f, rtol=1e-9, atol=0)
    for n, p in model.named_parameters():
        g = want[n]
        expected = (f.reshape(-1, *[1] * (g.dim() - 1)) * g).sum(0) / 10
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12, msg=n)


def test_same_seed_split_and_whole_give_the_same_noisy_gradient():
    state, x, y, _, C = setup()
    whole, split = fresh(state), fresh(state)
    kw = {"noise_multiplier": 1.3, "max_grad_norm": C, "expected_batch_size": 13, "seed": 11}
    one = pg.DPEngine(whole, **kw).backward(losses_of(whole, x, y))
    trace = split_step(pg.DPEngine(split, **kw), split, x, y)
    for n, p in split.named_parameters():
        assert torch.equal(trace.noise[n], one.noise[n]), n
        assert float(trace.noise[n].abs().sum()) > 0
        torch.testing.assert_close(p.grad, whole.get_parameter(n).grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(trace.clipped_sum[n], one.clipped_sum[n], rtol=0, atol=1e-12)
        torch.testing.assert_close(p.grad, (trace.clipped_sum[n] + trace.noise[n]) / 13,
                                   rtol=0, atol=1e-15)
    assert trace.noise_std == pytest.approx(1.3 * C, rel=1e-12)


def test_split_trace_matches_one_batch_trace_with_retain():
    state, x, y, want, C = setup()
    whole, split = fresh(state), fresh(state)
    one = pg.DPEngine(whole, 0.0, max_grad_norm=C, expected_batch_size=13).backward(
        losses_of(whole, x, y))
    trace = split_step(pg.DPEngine(split, 0.0, max_grad_norm=C, expected_batch_size=13),
                       split, x, y, retain=True)
    assert trace.batch_size == 13
    assert trace.norms.shape == trace.clip_factors.shape == (13,)
    torch.testing.assert_close(trace.norms, one.norms, rtol=1e-12, atol=0)
    torch.testing.assert_close(trace.clip_factors, one.clip_factors, rtol=1e-12, atol=0)
    torch.testing.assert_close(trace.norms, total_norms(want), rtol=1e-9, atol=0)
    for n in want:
        torch.testing.assert_close(trace.layer_norms[n], one.layer_norms[n], rtol=1e-12, atol=0)
    for clipped in (False, True):
        got = trace.per_sample_grads(clipped=clipped, samples=SAMPLES)
        ref = one.per_sample_grads(clipped=clipped, samples=SAMPLES)
        f = trace.clip_factors[SAMPLES] if clipped else torch.ones(3, dtype=torch.double)
        for n, g in want.items():
            torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-13, msg=n)
            expected = f.reshape(-1, *[1] * (g.dim() - 1)) * g[SAMPLES]
            torch.testing.assert_close(got[n], expected, rtol=1e-9, atol=1e-12, msg=n)
    allpre = trace.per_sample_grads()  # all 13, materialised lazily segment by segment
    for n, g in want.items():
        torch.testing.assert_close(allpre[n], g, rtol=1e-9, atol=1e-12, msg=n)


def test_released_physical_batches_raise_with_the_fix():
    state, x, y, _, C = setup()
    model = fresh(state)
    trace = split_step(pg.DPEngine(model, 0.0, max_grad_norm=C, expected_batch_size=13),
                       model, x, y, retain=False)
    assert trace.norms.shape == (13,)  # the norms and factors are still there
    for clipped in (False, True):
        with pytest.raises(TraceReleasedError, match=r"retain=True") as info:
            trace.per_sample_grads(clipped=clipped, samples=SAMPLES)
        assert "keep=('pre_clip',)" in str(info.value)
        assert isinstance(info.value, pg.PrivgradError)


def test_only_the_released_batch_raises_and_names_its_samples():
    state, x, y, want, C = setup()
    model = fresh(state)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=C, expected_batch_size=13)
    engine.accumulate(losses_of(model, x[:5], y[:5]), retain=True)
    engine.accumulate(losses_of(model, x[5:], y[5:]))  # samples 5..12, released
    trace = engine.step()
    got = trace.per_sample_grads(samples=[4, 0])
    for n, g in want.items():
        torch.testing.assert_close(got[n], g[[4, 0]], rtol=1e-9, atol=1e-12, msg=n)
    with pytest.raises(TraceReleasedError, match=r"samples \[7\]"):
        trace.per_sample_grads(samples=[0, 7])


def test_keep_pre_clip_without_retain_covers_every_sample():
    state, x, y, want, C = setup()
    model = fresh(state)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=C, expected_batch_size=13)
    trace = split_step(engine, model, x, y, keep="pre_clip", retain=False)
    assert trace.kept == ("pre_clip",)
    pre = trace.per_sample_grads(clipped=False)
    post = trace.per_sample_grads(clipped=True, samples=SAMPLES)
    f = torch.clamp(C / total_norms(want), max=1.0)
    assert bool((f < 1).any())
    for n, g in want.items():
        assert pre[n].shape == (13, *g.shape[1:])
        torch.testing.assert_close(pre[n], g, rtol=1e-9, atol=1e-12, msg=n)
        expected = f[SAMPLES].reshape(-1, *[1] * (g.dim() - 1)) * g[SAMPLES]
        torch.testing.assert_close(post[n], expected, rtol=1e-9, atol=1e-12, msg=n)


def test_one_ledger_event_per_logical_step():
    state, x, y, _, C = setup()
    q, sigma, delta = 0.01, 1.1, 1e-5
    whole, split = fresh(state), fresh(state)
    kw = {"noise_multiplier": sigma, "max_grad_norm": C, "expected_batch_size": 13,
          "sample_rate": q, "seed": 0}
    e1 = pg.DPEngine(whole, **kw)
    e1.backward(losses_of(whole, x, y))
    e2 = pg.DPEngine(split, **kw)
    start = 0
    for size in CHUNKS:
        e2.accumulate(losses_of(split, x[start : start + size], y[start : start + size]))
        start += size
        assert e2.steps == 0 and e2.ledger.steps == 0  # accumulating releases nothing
    e2.step()
    assert e2.steps == 1 and e2.ledger.steps == 1
    assert len(e2.ledger.entries) == 1 and e2.ledger.entries[0].count == 1
    assert e2.ledger.entries[0].event == pg.accounting.dp_sgd_step(sigma, q)
    eps = e2.epsilon(delta)
    assert 0 < eps < math.inf
    assert eps == pytest.approx(e1.epsilon(delta), rel=1e-12)
    assert eps == pytest.approx(pg.accounting.epsilon(sigma, q, 1, delta=delta), rel=1e-6)


def test_step_with_nothing_accumulated_is_pure_noise_and_recorded():
    model = nn.Linear(400, 300)  # 120,300 coordinates
    sigma, C, ebs, q = 1.5, 0.8, 40, 0.02
    engine = pg.DPEngine(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=ebs,
                         sample_rate=q, seed=3)
    trace = engine.step()
    assert trace.batch_size == 0 and trace.norms.shape == (0,)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    assert grad.numel() >= 10**5
    assert abs(float(grad.std()) / (sigma * C / ebs) - 1) < 0.03
    assert abs(float(grad.mean())) < 0.03 * sigma * C / ebs
    for n, p in model.named_parameters():
        assert bool((trace.clipped_sum[n] == 0).all())
        torch.testing.assert_close(p.grad, trace.noise[n] / ebs, rtol=0, atol=0)
    assert engine.steps == 1 and engine.ledger.steps == 1
    assert engine.epsilon(1e-5) == pytest.approx(
        pg.accounting.epsilon(sigma, q, 1, delta=1e-5), rel=1e-6)


def test_changing_trainable_parameters_between_physical_batches_raises():
    state, x, y, _, C = setup()
    model = fresh(state)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=C, expected_batch_size=13)
    engine.accumulate(losses_of(model, x[:5], y[:5]))
    model.fc.weight.requires_grad_(False)
    with pytest.raises(pg.GradientStateError, match="changed between physical batches"):
        engine.accumulate(losses_of(model, x[5:], y[5:]))


@pytest.mark.parametrize("frozen_during_accumulate", [True, False], ids=["unfreeze", "freeze"])
def test_changing_trainable_parameters_before_step_raises(frozen_during_accumulate):
    state, x, y, _, C = setup()
    model = fresh(state)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=C, expected_batch_size=13)
    model.fc.weight.requires_grad_(not frozen_during_accumulate)
    engine.accumulate(losses_of(model, x[:5], y[:5]))
    model.fc.weight.requires_grad_(frozen_during_accumulate)
    with pytest.raises(pg.GradientStateError, match="trainable parameters changed"):
        engine.step()
