"""A backward pass that accumulates into a trained parameter's ``.grad`` is refused as it
happens (issue 18.8).

privgrad never accumulates into ``.grad``: it assigns ``p.grad`` and takes gradients with
``torch.autograd.grad``. So any accumulation is a non-private ``loss.backward()``, whose
gradient ``optimizer.step()`` would apply unclipped and without noise.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def data(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, generator=g), torch.randint(0, 3, (B,), generator=g)


def losses_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def test_loss_backward_after_engine_step_is_refused_and_never_applied():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = pg.DPEngine(model, 1.0, max_grad_norm=1.0, expected_batch_size=6, seed=0)
    x, y = data()
    trace = engine.backward(losses_of(model, x, y))
    with pytest.raises(pg.GradientStateError) as e:
        F.cross_entropy(model(x), y).backward()
    msg = str(e.value)
    hit = re.search(r"accumulated a gradient into p.grad of '([\w.]+)'", msg).group(1)
    assert hit in dict(model.named_parameters())  # the first parameter the backward reached
    assert "neither clipped nor noised" in msg and "engine.backward(losses) only" in msg
    assert "torch.no_grad()" in msg and "torch.autograd.grad(loss, inputs)" in msg
    # What an optimizer would apply now: the private gradient, or nothing for that one.
    for n, p in model.named_parameters():
        if n == hit:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, trace.private_grad[n].to(p.dtype)), n
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        step = 0 if n == hit else trace.private_grad[n]
        torch.testing.assert_close(p.detach(), before[n] - step, rtol=0, atol=1e-7)
    engine.close()


def test_any_accumulation_is_refused_not_only_loss_backward():
    model = mlp()
    engine = pg.DPEngine(model, 0.0, max_grad_norm=1.0, expected_batch_size=6)
    x, y = data()
    with pytest.raises(pg.GradientStateError, match="p.grad of '0.weight'"):
        torch.autograd.backward(losses_of(model, x, y).sum(), inputs=[model[0].weight])
    assert model[0].weight.grad is None
    engine.close()


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize", "vmap"])
def test_the_engine_itself_and_non_private_evaluation_do_not_trip_it(mode):
    """The self-check's autograd calls, lazy per-sample gradients, torch.autograd.grad and
    torch.no_grad evaluations leave p.grad alone; the written p.grad is the oracle's."""
    model = mlp()
    x, y = data()
    want = loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i:i + 1]), x)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=math.inf, expected_batch_size=6,
                         mode=mode)  # self_check on: its extra backward passes run here
    trace = engine.backward(losses_of(model, x, y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n].sum(0) / 6, rtol=1e-5, atol=1e-7)
    got = trace.per_sample_grads(samples=[4, 1])
    for n in want:
        torch.testing.assert_close(got[n], want[n][[4, 1]], rtol=1e-5, atol=1e-7)
    saliency = torch.autograd.grad(F.cross_entropy(model(x.requires_grad_()), y), x)[0]
    assert saliency.shape == x.shape
    with torch.no_grad():
        model(x)
    for n, p in model.named_parameters():  # still the private gradient only
        torch.testing.assert_close(p.grad, want[n].sum(0) / 6, rtol=1e-5, atol=1e-7)
    engine.close()


def test_after_close_loss_backward_is_the_users_again():
    model = mlp()
    x, y = data()
    engine = pg.DPEngine(model, 0.0, max_grad_norm=1.0, expected_batch_size=6)
    engine.backward(losses_of(model, x, y))
    engine.close()
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    want = loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i:i + 1]), x)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n].sum(0), rtol=1e-5, atol=1e-6)


def test_a_private_gradient_changed_in_place_and_not_zeroed_is_not_taken_for_zero_grad():
    """The ledger no longer takes any version bump for zero_grad(): p.grad must be zero."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=1.0, expected_batch_size=6)
    x, y = data()
    engine.backward(losses_of(model, x, y))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # post-processing, in place
    opt.step()
    with pytest.raises(pg.GradientStateError,
                       match="changed in place since it was written, and not zero"):
        engine.backward(losses_of(model, x, y))
    assert engine.steps == 1
    opt.zero_grad(set_to_none=False)  # zeroed in place: fine
    engine.backward(losses_of(model, x, y))
    assert engine.steps == 2
    engine.close()
