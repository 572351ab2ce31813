"""Analytic cases of the engine: plain SGD recovered, clipping bounds, noise statistics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def batch(B=7):
    return torch.randn(B, 6, dtype=torch.double), torch.randint(0, 3, (B,))


def losses_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def oracle(model, x, y):
    return loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i : i + 1]), x)


@pytest.mark.parametrize("mode", ["auto", "materialize", "vmap"])
def test_sigma0_cinf_is_plain_sgd(mode):
    model = mlp()
    x, y = batch()
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=math.inf,
                         expected_batch_size=10, mode=mode)
    engine.backward(losses_of(model, x, y))
    private = {n: p.grad.clone() for n, p in model.named_parameters()}
    engine.close()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # mean over the batch
    for n, p in model.named_parameters():
        torch.testing.assert_close(private[n], p.grad * 7 / 10, rtol=1e-12, atol=1e-14)


def test_clipping_matches_oracle_and_bounds():
    model = mlp()
    x, y = batch()
    C = 0.3
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=7)
    trace = engine.backward(losses_of(model, x, y), keep=("pre_clip", "post_clip"))
    want = oracle(model, x, y)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in want.values()))
    torch.testing.assert_close(trace.norms, norms)
    torch.testing.assert_close(trace.clip_factors, torch.clamp(C / norms, max=1.0))
    pre, post = trace.per_sample_grads(), trace.per_sample_grads(clipped=True)
    for n in pre:  # exactly clip_factors[:, None] * pre
        f = trace.clip_factors.reshape(-1, *([1] * (pre[n].dim() - 1)))
        assert torch.equal(post[n], f * pre[n])
        torch.testing.assert_close(trace.layer_norms[n], want[n].flatten(1).norm(dim=1))
    post_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in post.values()))
    assert bool((post_norms <= C * (1 + 1e-12)).all())
    assert bool((trace.norms > C).all())  # the test really clips
    for n, p in model.named_parameters():
        expected = (trace.clip_factors.reshape(-1, *[1] * p.dim()) * want[n]).sum(0) / 7
        torch.testing.assert_close(p.grad, expected)
        torch.testing.assert_close(trace.private_grad[n], p.grad, rtol=0, atol=0)
        torch.testing.assert_close(trace.clipped_sum[n], post[n].sum(0))


def test_zero_clip_norm_gives_zero_gradient():
    model = mlp()
    x, y = batch()
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=0.0, expected_batch_size=7)
    trace = engine.backward(losses_of(model, x, y))
    assert all(bool((p.grad == 0).all()) for p in model.parameters())
    assert bool((trace.clip_factors == 0).all())


def test_zero_norm_sample_has_factor_one():
    model = mlp()
    x, y = batch(3)
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3)
    losses = losses_of(model, x, y) * torch.tensor([1.0, 0.0, 1.0], dtype=torch.double)
    trace = engine.backward(losses)
    assert float(trace.norms[1]) == 0.0
    assert float(trace.clip_factors[1]) == 1.0


def test_noise_std_matches_sigma_c():
    model = nn.Linear(400, 300)  # 120,300 coordinates
    sigma, C, ebs = 1.3, 2.0, 50
    engine = pg.DPEngine(model, noise_multiplier=sigma, max_grad_norm=C,
                         expected_batch_size=ebs, seed=1)
    trace = engine.backward(model(torch.randn(4, 400)).sum(1))
    noise = torch.cat([z.flatten() for z in trace.noise.values()])
    assert noise.numel() >= 10**5
    assert abs(float(noise.std()) / (sigma * C) - 1) < 0.03
    assert abs(float(noise.mean())) < 0.03 * sigma * C
    grad_noise = torch.cat([(p.grad - trace.clipped_sum[n] / ebs).flatten()
                            for n, p in model.named_parameters()])
    assert abs(float(grad_noise.std()) / (sigma * C / ebs) - 1) < 0.03


def test_seed_reproducible_and_none_is_fresh():
    def grads(seed):
        torch.manual_seed(0)
        model = mlp()
        x, y = batch()
        engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0,
                             expected_batch_size=7, seed=seed)
        engine.backward(losses_of(model, x, y))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.equal(grads(3), grads(3))
    assert not torch.equal(grads(3), grads(4))
    assert not torch.equal(grads(None), grads(None))


def test_empty_batch_is_pure_noise():
    model = mlp()
    sigma, C, ebs = 2.0, 0.5, 4
    engine = pg.DPEngine(model, noise_multiplier=sigma, max_grad_norm=C,
                         expected_batch_size=ebs, seed=0)
    x, y = batch(0)
    trace = engine.backward(losses_of(model, x, y), keep=("pre_clip", "post_clip"))
    assert trace.batch_size == 0 and trace.norms.shape == (0,)
    for n, p in model.named_parameters():
        assert bool((trace.clipped_sum[n] == 0).all())
        torch.testing.assert_close(p.grad, trace.noise[n] / ebs, rtol=0, atol=0)
        assert trace.per_sample_grads()[n].shape == (0, *p.shape)
        assert trace.per_sample_grads(clipped=True)[n].shape == (0, *p.shape)
    assert float(torch.cat([p.grad.flatten() for p in model.parameters()]).abs().sum()) > 0


def test_per_layer_clipping():
    model = mlp()
    x, y = batch()
    rule = pg.clipping.PerLayer({"0": 0.2, "2": 0.05, "3.weight": 0.1, "3.bias": 0.01})
    engine = pg.DPEngine(model, noise_multiplier=0.0, clipping=rule, expected_batch_size=7)
    trace = engine.backward(losses_of(model, x, y), keep=("pre_clip",))
    want = oracle(model, x, y)
    assert math.isclose(engine.plan.sensitivity, math.sqrt(0.2**2 + 0.05**2 + 0.1**2 + 0.01**2))
    groups = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"],
              "3.weight": ["3.weight"], "3.bias": ["3.bias"]}
    post = trace.per_sample_grads(clipped=True)
    for g, names in groups.items():
        norm = torch.sqrt(sum(want[n].flatten(1).square().sum(1) for n in names))
        C = rule.max_norms[g]
        torch.testing.assert_close(trace.clip_factors[g], torch.clamp(C / norm, max=1.0))
        post_norm = torch.sqrt(sum(post[n].flatten(1).square().sum(1) for n in names))
        assert bool((post_norm <= C * (1 + 1e-12)).all())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, post[n].sum(0) / 7)
    total = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in post.values()))
    torch.testing.assert_close(trace.clipped_norms, total)


def test_per_layer_single_threshold_and_bad_keys():
    model = mlp()
    engine = pg.DPEngine(model, noise_multiplier=1.0, clipping=pg.clipping.PerLayer(0.5),
                         expected_batch_size=7)
    assert math.isclose(engine.noise_std, 0.5 * math.sqrt(6))
    with pytest.raises(ValueError, match="'3.bias' matches no key"):
        pg.DPEngine(mlp(), noise_multiplier=1.0, expected_batch_size=7,
                    clipping=pg.clipping.PerLayer({"0": 1.0, "2": 1.0, "3.weight": 1.0}))


def test_automatic_clipping():
    model = mlp()
    x, y = batch()
    rule = pg.clipping.Automatic(max_norm=0.7, stability=0.01)
    engine = pg.DPEngine(model, noise_multiplier=0.0, clipping=rule, expected_batch_size=7)
    trace = engine.backward(losses_of(model, x, y))
    torch.testing.assert_close(trace.clip_factors, 0.7 / (trace.norms + 0.01))
    post = trace.per_sample_grads(clipped=True)
    post_norm = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in post.values()))
    assert bool((post_norm < 0.7).all())
    torch.testing.assert_close(trace.clipped_norms, post_norm)


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_lazy_samples_equal_full(mode):
    model = mlp()
    x, y = batch()
    engine = pg.DPEngine(model, noise_multiplier=0.5, max_grad_norm=0.2,
                         expected_batch_size=7, mode=mode, seed=0)
    trace = engine.backward(losses_of(model, x, y))
    full_pre, full_post = trace.per_sample_grads(), trace.per_sample_grads(clipped=True)
    some_pre = trace.per_sample_grads(samples=[5, 2, -1])
    some_post = trace.per_sample_grads(clipped=True, samples=torch.tensor([5, 2, 6]))
    for n in full_pre:
        torch.testing.assert_close(some_pre[n], full_pre[n][[5, 2, 6]], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(some_post[n], full_post[n][[5, 2, 6]], rtol=1e-12, atol=1e-14)
    with pytest.raises(IndexError, match="sample index 7 is out of range"):
        trace.per_sample_grads(samples=[7])


def test_model_not_wrapped_and_optimizer_steps():
    model = mlp()
    keys = list(model.state_dict())
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=7)
    assert type(model) is nn.Sequential and list(model.state_dict()) == keys
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.clone() for p in model.parameters()]
    for _ in range(3):
        x, y = batch()
        engine.backward(losses_of(model, x, y))
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    engine.close()
    model(torch.randn(2, 6, dtype=torch.double)).sum().backward()  # hooks are gone


def test_ledger_one_event_per_step_and_state_round_trip():
    model = mlp()
    engine = pg.DPEngine(model, noise_multiplier=1.1, max_grad_norm=1.0, expected_batch_size=7,
                         sample_rate=0.01, seed=0)
    for _ in range(5):
        x, y = batch()
        engine.backward(losses_of(model, x, y))
        model.zero_grad()
    engine.noise_multiplier = 2.0
    x, y = batch()
    engine.backward(losses_of(model, x, y))
    assert engine.steps == 6 and engine.ledger.steps == 6
    eps = engine.epsilon(1e-5)
    want = pg.accounting.PrivacyLedger()
    want.record(1.1, 0.01, steps=5)
    want.record(2.0, 0.01)
    assert eps == pytest.approx(want.epsilon(1e-5), rel=1e-9)
    restored = pg.DPEngine(mlp(), noise_multiplier=1.1, max_grad_norm=1.0, expected_batch_size=7)
    restored.load_state_dict(engine.state_dict())
    assert restored.epsilon(1e-5) == eps and restored.noise_multiplier == 2.0


def test_epsilon_without_sample_rate_is_an_error():
    model = mlp()
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=7)
    x, y = batch()
    engine.backward(losses_of(model, x, y))
    with pytest.raises(ValueError, match="1 step\\(s\\) ran without a sample_rate"):
        engine.epsilon(1e-5)


def test_seeded_noise_survives_state_round_trip():
    from privgrad.noise import NoiseSource

    like = {"a": torch.zeros(300, 7), "b": torch.zeros(11)}
    source = NoiseSource(5)
    source.gaussian(like, 2.0)
    saved = source.state_dict()
    nxt = source.gaussian(like, 1.0)
    restored = NoiseSource(None)
    restored.load_state_dict(saved)
    again = restored.gaussian(like, 1.0)
    assert all(torch.equal(nxt[n], again[n]) for n in like)


def test_all_modes_give_the_same_private_gradient_for_the_same_seed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6, padding_idx=0)
            self.conv = nn.Conv1d(6, 5, 3, padding="same")
            self.norm = nn.GroupNorm(1, 5)
            self.fc = nn.Linear(5, 3)

        def forward(self, idx):
            h = self.norm(self.conv(self.emb(idx).transpose(1, 2))).transpose(1, 2)
            return self.fc(torch.tanh(h)).mean(1)

    torch.manual_seed(0)
    base = Net().double()
    idx, y = torch.randint(0, 11, (9, 7)), torch.randint(0, 3, (9,))
    grads = {}
    for mode in ("auto", "ghost", "materialize", "vmap"):
        model = Net().double()
        model.load_state_dict(base.state_dict())
        with pg.DPEngine(model, noise_multiplier=0.8, max_grad_norm=0.1, expected_batch_size=9,
                         mode=mode, seed=7) as engine:
            trace = engine.backward(F.cross_entropy(model(idx), y, reduction="none"))
        assert bool((trace.clip_factors < 1).any())
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("ghost", "materialize", "vmap"):
        for n, g in grads["auto"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-10, atol=1e-12, msg=n)


def test_per_layer_single_group_and_fp16_norms():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    engine = pg.DPEngine(model, noise_multiplier=0.0, expected_batch_size=3,
                         clipping=pg.clipping.PerLayer({"0": 1.0}))
    trace = engine.backward(model(torch.randn(3, 4)).sum(1))
    assert trace.clip_factors.shape == (3,)
    half = nn.Linear(4, 2).half()
    engine = pg.DPEngine(half, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3,
                         mode="materialize", self_check=False)
    trace = engine.backward(half(torch.full((3, 4), 30.0, dtype=torch.half)).float().square()
                            .sum(1))
    assert bool(torch.isfinite(trace.norms).all()) and float(trace.norms[0]) > 256
