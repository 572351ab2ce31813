"""A forward pass that writes the model's own parameters or buffers is refused (issue 18.2).

Whatever a forward writes into the model comes from the batch and is released with the
model, with no clipping and no noise: ``nn.Embedding(max_norm=...)`` renormalises the rows
of the batch's tokens in place, running statistics average the batch's inputs, a custom
module may copy anything into a buffer. One guard (a snapshot of every parameter and
buffer when the root's forward starts, compared when it ends) catches them all.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads


def engine_for(model, **kw):
    kw = {"noise_multiplier": 0.0, "max_grad_norm": math.inf, "expected_batch_size": 4} | kw
    return pg.DPEngine(model, **kw)


def untouched(engine, model):
    assert engine.steps == 0 and len(engine.ledger) == 0
    assert all(p.grad is None for p in model.parameters())


class Tokens(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(3, 2)

    def forward(self, ids):
        out = self.emb(ids)
        return self.head(out if out.dim() == 2 else out.mean(1))


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_embedding_max_norm_is_refused_and_the_written_rows_are_the_batch_tokens(mode):
    torch.manual_seed(0)
    model = Tokens(nn.Embedding(10, 3, max_norm=1.0))
    with torch.no_grad():
        model.emb.weight.mul_(5)  # every row above max_norm
    before = model.emb.weight.detach().clone()
    ids = torch.tensor([[1, 4], [4, 7], [1, 1], [2, 7]])
    engine = engine_for(model, mode=mode)
    with pytest.raises(pg.UnsupportedModelError) as e:
        engine.backward(F.cross_entropy(model(ids), torch.tensor([0, 1, 0, 1]),
                                        reduction="none"))
    msg = str(e.value)
    assert "module 'emb' (Embedding) changed its parameter 'weight' in place" in msg
    assert "max_norm=1.0 renormalises in place the rows of the batch's tokens" in msg
    assert "max_norm=None" in msg and "weight.renorm_(2, 0, 1.0)" in msg
    assert "no step is taken" in msg and "restore its parameters" in msg
    untouched(engine, model)
    # Why: exactly the rows of the batch's tokens moved (to norm max_norm), the rest did not.
    after = model.emb.weight.detach()
    moved = sorted(int(i) for i in (after - before).norm(dim=1).nonzero())
    assert moved == [1, 2, 4, 7]
    torch.testing.assert_close(after[moved].norm(dim=1), torch.ones(4), rtol=1e-6, atol=0)
    engine.close()


def test_embedding_bag_max_norm_is_refused():
    model = Tokens(nn.EmbeddingBag(10, 3, max_norm=0.5, mode="sum"))
    engine = engine_for(model)
    with pytest.raises(pg.UnsupportedModelError,
                       match=r"module 'emb' \(EmbeddingBag\) changed its parameter 'weight'.*"
                             r"max_norm=0.5 renormalises"):
        engine.backward(model(torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])).sum(1))
    untouched(engine, model)


class CustomBatchNorm(nn.Module):
    """BatchNorm written by hand: validate.check does not know it, the guard does."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=True)


class Tracker(nn.Module):
    """A parameter-free module that learns a buffer from its input, three ways."""

    def __init__(self, how, when="always"):
        super().__init__()
        self.how, self.when = how, when
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.when == "always" or (self.when == "eval") == (not self.training):
            if self.how == "copy_":
                self.mean.copy_(x.detach().mean(0))
            elif self.how == "+=":
                self.count += 1
            else:
                self.mean = x.detach().mean(0)  # re-assignment of a registered buffer
        return x


def tracked(how, when="always"):
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(Tracker(how, when)), nn.Linear(4, 2))


@pytest.mark.parametrize(("how", "name", "said"), [
    ("copy_", "mean", "changed its buffer 'mean' in place"),
    ("+=", "count", "changed its buffer 'count' in place"),
    ("assign", "mean", "assigned a new tensor to its buffer 'mean' (like self.mean = x.mean(0))"),
])
def test_custom_module_writing_a_buffer_from_its_input_is_refused(how, name, said):
    model = tracked(how)
    engine = engine_for(model)
    with pytest.raises(pg.UnsupportedModelError) as e:
        engine.backward(model(torch.randn(4, 4)).sum(1))
    msg = str(e.value)
    assert f"module '1.0' (Tracker) {said} during the forward pass" in msg
    assert f"never write self.{name} in Tracker.forward" in msg
    untouched(engine, model)


def test_hand_written_batchnorm_running_stats_are_refused():
    model = nn.Sequential(nn.Linear(4, 3), CustomBatchNorm(3), nn.Linear(3, 2))
    engine = engine_for(model)
    with pytest.raises(pg.UnsupportedModelError) as e:
        engine.backward(model(torch.randn(4, 4)).sum(1))
    msg = str(e.value)
    assert "module '1' (CustomBatchNorm) changed its buffer 'running_mean' in place" in msg
    assert "module '1' (CustomBatchNorm) changed its buffer 'running_var' in place" in msg
    untouched(engine, model)


def test_a_batchnorm_put_in_after_the_engine_was_built_is_refused():
    # validate.check refuses BatchNorm at construction; one put in later bypasses it.
    model = nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.Linear(3, 2))
    engine = engine_for(model)
    model[1] = nn.BatchNorm1d(3)  # after validate.check ran
    with pytest.raises(pg.UnsupportedModelError, match="module '1' .*running_mean"):
        engine.backward(model(torch.randn(4, 4)).sum(1))
    untouched(engine, model)


def oracle_grad(model, x, ebs):
    grads = loop_per_sample_grads(model, lambda out, i: out.sum(), x)
    return {n: g.sum(0) / ebs for n, g in grads.items()}


def test_no_false_alarm_on_evaluation_optimizer_steps_and_constant_buffers():
    """Writes under torch.no_grad (not recorded), the optimizer's own writes between steps
    and buffers that are never written (HF-style non-persistent position ids) pass; the
    written p.grad is the oracle's."""
    torch.manual_seed(0)
    model = tracked("copy_", when="train")  # writes only in training mode
    model.register_buffer("position_ids", torch.arange(4), persistent=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = engine_for(model)
    model.eval()  # trained in eval mode: the tracker does not write
    for _ in range(3):
        x = torch.randn(4, 4)
        want = oracle_grad(model, x, 4)
        engine.backward(model(x).sum(1))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7)
        opt.step()
        opt.zero_grad()
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 4))  # an evaluation that writes: not recorded
        model.eval()
    assert engine.steps == 3
    model.train()  # now a recorded forward writes
    with pytest.raises(pg.UnsupportedModelError, match="Tracker"):
        engine.backward(model(torch.randn(4, 4)).sum(1))
    assert engine.steps == 3
    engine.close()


def test_buffer_written_only_in_eval_mode_is_refused_in_eval_mode():
    model = tracked("+=", when="eval")
    engine = engine_for(model)
    engine.backward(model(torch.randn(4, 4)).sum(1))  # training mode: no write
    model.zero_grad()
    model.eval()
    with pytest.raises(pg.UnsupportedModelError, match="buffer 'count' in place"):
        engine.backward(model(torch.randn(4, 4)).sum(1))
    assert engine.steps == 1


def test_after_a_refusal_the_next_batch_is_released_alone():
    torch.manual_seed(0)
    model = Tokens(nn.Embedding(10, 3, max_norm=1.0))
    engine = engine_for(model, max_grad_norm=0.5, noise_multiplier=0.0)
    with pytest.raises(pg.UnsupportedModelError):
        engine.backward(model(torch.tensor([1, 2, 3, 4])).sum(1))
    model.emb.max_norm = None  # the fix
    ids = torch.tensor([5, 6, 7, 8])
    grads = loop_per_sample_grads(model, lambda out, i: out.sum(), ids)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    f = torch.clamp(0.5 / norms, max=1.0)
    engine.backward(model(ids).sum(1))
    assert engine.steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.tensordot(f, grads[n], dims=1) / 4,
                                   rtol=1e-5, atol=1e-7)
    engine.close()
    model.emb.max_norm = 1.0
    model(ids)  # hooks are gone with the engine: no guard, no error


class Parts(nn.Module):
    """Called part by part by a training loop (features, then head), not as model(x)."""

    def __init__(self, emb):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_a_submodule_called_directly_is_watched_too():
    torch.manual_seed(0)
    model = Parts(nn.Embedding(10, 3, max_norm=1.0))
    with torch.no_grad():
        model.emb.weight.mul_(5)
    before = model.emb.weight.detach().clone()
    ids = torch.tensor([[1, 4], [4, 7], [1, 1], [2, 7]])
    engine = engine_for(model)
    with pytest.raises(pg.UnsupportedModelError,
                       match=r"module 'emb' \(Embedding\) changed its parameter 'weight' in "
                             r"place during the forward pass \(max_norm=1.0"):
        engine.backward(model.head(model.emb(ids).mean(1)).sum(1))
    untouched(engine, model)
    moved = sorted(int(i) for i in (model.emb.weight - before).norm(dim=1).nonzero())
    assert moved == [1, 2, 4, 7]  # why: the batch's tokens
    engine.close()


def test_direct_submodule_calls_with_an_optimizer_between_steps_match_the_oracle():
    """The watch spans each outermost forward, so optimizer.step() between steps is fine."""
    torch.manual_seed(0)
    model = Parts(nn.Embedding(10, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = engine_for(model, expected_batch_size=1)
    y = torch.tensor([0, 1, 0, 1])
    for step in range(3):
        ids = torch.randint(0, 10, (4, 2), generator=torch.Generator().manual_seed(step))

        want = loop_per_sample_grads(  # on a copy: its forwards are not the engine's
            copy.deepcopy(model), lambda out, i: F.cross_entropy(out, y[i:i + 1]), ids)
        engine.backward(F.cross_entropy(model.head(model.emb(ids).mean(1)), y,
                                        reduction="none"))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n].sum(0), rtol=1e-10, atol=1e-12)
        opt.step()
        opt.zero_grad()
    assert engine.steps == 3
    engine.close()


class GradTracker(nn.Module):
    """Keeps the mean of its output gradients in a buffer, from a tensor hook."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("gstat", torch.zeros(3))

    def forward(self, x):
        out = self.lin(x)
        if out.requires_grad:
            out.register_hook(self._track)
        return out

    def _track(self, g):
        self.gstat.copy_(g.mean(0))


def test_a_write_during_privgrads_backward_pass_is_refused():
    torch.manual_seed(0)
    model = GradTracker()
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    x[0] *= 1e4
    engine = engine_for(model)
    with pytest.raises(pg.UnsupportedModelError) as e:
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    msg = str(e.value)
    assert "the model itself (GradTracker) changed its buffer 'gstat' in place during the " \
           "backward pass" in msg
    assert "unclipped gradients" in msg and "never write self.gstat from a gradient hook" in msg
    untouched(engine, model)
    # Why: the buffer holds the unclipped mean of the batch's output gradients.
    out = model.lin(x)
    want = torch.autograd.grad(F.cross_entropy(out, y, reduction="none").sum(), out)[0].mean(0)
    torch.testing.assert_close(model.gstat, want)
    engine.close()
    with pytest.raises(pg.UnsupportedModelError, match="during the backward pass"):
        pg.clipped_batch_gradients(model, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                                   x, y, 1.0)


def test_spectral_norm_is_refused_with_a_fix_that_works():
    torch.manual_seed(0)
    sn = nn.utils.parametrizations.spectral_norm
    model = nn.Sequential(sn(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    engine = engine_for(model, expected_batch_size=8, max_grad_norm=1.0)
    with pytest.raises(pg.UnsupportedModelError) as e:
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    msg = str(e.value)
    assert "module '0.parametrizations.weight.0' (_SpectralNorm) changed its buffer '_u'" in msg
    assert "spectral norm's power iteration" in msg and "model.0.eval()" in msg
    assert "with torch.no_grad(): model.0.train(); model.0.weight; model.0.eval()" in msg
    untouched(engine, model)
    engine.discard()
    # The fix as the message gives it (model.0 is model[0] here): accepted, and the power
    # iteration still runs between steps, from the weights alone.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model[0].eval()
    for _ in range(3):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model[0].train()
            model[0].weight  # noqa: B018 (the parametrization runs on access)
            model[0].eval()
    assert engine.steps == 3
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(model[0].weight, 2)
    assert abs(float(sigma) - 1) < 1e-2
    engine.close()


def test_the_old_spectral_norm_hook_is_told_to_use_the_parametrization():
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 2))
    engine = engine_for(model, expected_batch_size=8)
    with pytest.raises(pg.UnsupportedModelError,
                       match=r"module '0' \(Linear\) changed its buffer 'weight_u'.*spectral "
                             r"norm's power iteration.*parametrizations.spectral_norm"):
        engine.backward(model(torch.randn(8, 8)).sum(1))
    engine.close()
