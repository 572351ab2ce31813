"""Bad input gets an error that names what was found, why, and the fix."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def engine_for(model, **kw):
    kw = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "expected_batch_size": 4} | kw
    return pg.DPEngine(model, **kw)


def data(B=4):
    return torch.randn(B, 4), torch.randint(0, 3, (B,))


def test_mean_reduced_loss():
    model = mlp()
    engine = engine_for(model)
    x, y = data()
    with pytest.raises(pg.InvalidLossError, match="reduction='none'"):
        engine.backward(F.cross_entropy(model(x), y))


def test_loss_with_extra_axes():
    model = mlp()
    engine = engine_for(model)
    with pytest.raises(pg.InvalidLossError, match=r"shape \(4, 3\).*flatten\(1\)"):
        engine.backward(model(torch.randn(4, 4)))


def test_losses_not_connected():
    model = mlp()
    engine = engine_for(model)
    with pytest.raises(pg.InvalidLossError, match="do not depend on any recorded layer"):
        engine.backward(torch.randn(4, requires_grad=True) * 2)
    with torch.no_grad():
        out = model(torch.randn(4, 4))
    with pytest.raises(pg.InvalidLossError, match="do not require grad"):
        engine.backward(out.sum(1))


def test_batch_size_mismatch():
    model = mlp()
    engine = engine_for(model)
    with pytest.raises(pg.InvalidLossError, match="module '0'.*batch of 4 samples"):
        engine.backward(model(torch.randn(4, 4)).sum(1)[:2])


def test_batchnorm_rejected_and_fixed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(pg.UnsupportedModelError) as e:
        engine_for(model)
    msg = str(e.value)
    assert "'1' is BatchNorm2d" in msg and "'3.1' is BatchNorm2d" in msg
    assert "nn.GroupNorm(8, 8)" in msg and "pg.validate.fix(model)" in msg
    keys = [k for k in model.state_dict() if not k.endswith(("running_mean", "running_var",
                                                              "num_batches_tracked"))]
    w = model[1].weight.detach().clone()
    pg.validate.fix(model)
    assert isinstance(model[1], nn.GroupNorm) and isinstance(model[3][1], nn.GroupNorm)
    assert list(model.state_dict()) == keys
    assert torch.equal(model[1].weight, w)
    engine = engine_for(model)
    engine.backward(model(torch.randn(4, 3, 8, 8)).flatten(1).sum(1))


def test_fixed_batchnorm1d_on_features_keeps_the_model_input_dependent():
    """BatchNorm1d(C) on (B, C) features: one channel per group would normalise a single
    value to the constant 0; the fix normalises each sample over its features."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(pg.UnsupportedModelError, match=r"nn.GroupNorm\(1, 16\)"):
        engine_for(model)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    pg.validate.fix(model)
    norm = model[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1
    x, y = data(6)
    h = model[0](x)
    torch.testing.assert_close(norm(h), F.layer_norm(h, (16,), norm.weight, norm.bias))
    out = model(x)
    assert float((out - out[0]).abs().min(dim=1).values[1:].min()) > 1e-4  # not constant
    want = loop_per_sample_grads(model, lambda o, i: F.cross_entropy(o, y[i:i + 1]), x)
    engine = engine_for(model, max_grad_norm=math.inf, expected_batch_size=6)
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    for n, p in model.named_parameters():
        assert float(want[n].abs().max()) > 0, n  # every parameter is trained
        torch.testing.assert_close(p.grad, want[n].sum(0) / 6, rtol=1e-5, atol=1e-7)


def test_instance_norm_running_stats_and_embedding_freq():
    with pytest.raises(pg.UnsupportedModelError, match="track_running_stats=False"):
        engine_for(nn.Sequential(nn.InstanceNorm1d(3, affine=True, track_running_stats=True)))
    with pytest.raises(pg.UnsupportedModelError, match="scale_grad_by_freq"):
        engine_for(nn.Sequential(nn.Embedding(5, 2, scale_grad_by_freq=True)))


def test_nan_sample_is_named_and_step_not_taken():
    model = mlp()
    engine = engine_for(model)
    x, y = data()
    x[2, 1] = float("nan")
    with pytest.raises(pg.NonFiniteGradientError, match="sample 2 of the batch has a NaN"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert all(p.grad is None for p in model.parameters())
    x, y = data()
    losses = F.cross_entropy(model(x), y, reduction="none") * torch.tensor([1, 1, 1, math.inf])
    with pytest.raises(pg.NonFiniteGradientError, match="sample 3"):
        engine.backward(losses)


def test_unused_trainable_parameter():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.extra = nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    model = WithUnused()
    engine = engine_for(model)
    x, y = data()
    with pytest.raises(pg.MissingGradientError, match=r"\['extra.weight', 'extra.bias'\]"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))


def test_second_backward_without_zero_grad():
    model = mlp()
    engine = engine_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    opt.step()
    with pytest.raises(pg.GradientStateError, match="without optimizer.zero_grad"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    opt.zero_grad(set_to_none=False)  # zeroed in place is fine
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    opt.zero_grad()
    with pytest.raises(pg.GradientStateError, match="accumulated a gradient into p.grad of"):
        F.cross_entropy(model(x), y).backward()  # a non-private gradient: refused at once
    assert all(p.grad is None for p in model.parameters())
    model[0].weight.grad = torch.ones_like(model[0].weight)  # written by hand
    with pytest.raises(pg.GradientStateError, match="did you call loss.backward"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))


class TiedOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)

    def forward(self, idx):
        return self.emb(idx) @ self.emb.weight.T  # the weight used outside emb's forward


def test_parameter_used_outside_its_module_is_caught():
    model = TiedOutside()
    engine = engine_for(model)
    with pytest.raises(pg.MissingGradientError, match="'emb.weight' do not add up"):
        engine.backward(model(torch.randint(0, 6, (4, 3))).flatten(1).sum(1))


def test_dropout_inside_functional_module():
    model = nn.Sequential(nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model[0]

        def forward(self, x):
            return self.attn(x, x, x)[0]

    w = Wrap()
    engine = engine_for(w)
    with pytest.raises(pg.UnsupportedModelError, match="'attn'.*dropout"):
        engine.backward(w(torch.randn(4, 3, 4)).flatten(1).sum(1))


@pytest.mark.parametrize("kw,match", [
    ({"noise_multiplier": -1.0}, "noise_multiplier must be"),
    ({"expected_batch_size": 0}, "expected_batch_size must be a positive"),
    ({"max_grad_norm": -0.5}, "max_grad_norm must be >= 0"),
    ({"max_grad_norm": math.inf, "noise_multiplier": 1.0}, "infinite noise"),
    ({"max_grad_norm": None}, "no clipping threshold"),
    ({"clipping": pg.clipping.PerLayer(1.0)}, "not both"),
    ({"mode": "fast"}, "mode='fast'"),
    ({"sample_rate": 2.0}, "outside \\(0, 1\\]"),
])
def test_bad_configuration(kw, match):
    with pytest.raises(ValueError, match=match):
        engine_for(mlp(), **kw)


def test_bad_keep():
    model = mlp()
    engine = engine_for(model)
    with pytest.raises(ValueError, match="keep=\\['norms'\\]"):
        engine.backward(model(torch.randn(4, 4)).sum(1), keep=("norms",))


def test_no_trainable_parameter_at_construction():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"Sequential has no parameter with requires_grad=True"):
        engine_for(model)


@pytest.mark.parametrize("when", ["backward", "step"])
def test_every_parameter_frozen_after_construction(when):
    """A clear error, not autograd's; no step is taken and the ledger stays empty."""
    model = mlp()
    engine = engine_for(model, noise_multiplier=1.0, sample_rate=0.01)
    x, y = data()
    if when == "step":
        engine.accumulate(F.cross_entropy(model(x), y, reduction="none"))
    model.requires_grad_(False)
    with pytest.raises(pg.GradientStateError, match=r"every parameter .* frozen.*Fix"):
        if when == "step":
            engine.step()
        else:
            engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert engine.steps == 0 and engine.ledger.steps == 0 and not engine.ledger.entries
    assert all(p.grad is None for p in model.parameters())
