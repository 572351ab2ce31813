"""``StepTrace`` is a value: it holds its step's clipped sum, or says it was not kept.

The oracles: the post-clip per-sample gradients summed (the clipped sum), and ``p.grad``
of the same step (``private_grad``), bit for bit; an engine built with
``keep_clipped_sum=False`` writes the same ``p.grad`` bits from the same seed.
"""

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from privgrad.errors import TraceReleasedError


class Net(nn.Module):
    """Book-kept layers (Embedding, Conv1d, Linear) beside materialised ones (GroupNorm,
    PReLU through the functional fallback, a small Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.norm = nn.GroupNorm(4, 32)
        self.act = nn.PReLU()
        self.fc = nn.Linear(32, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.conv(self.emb(idx).transpose(1, 2)))).mean(2)
        return self.head(torch.tanh(self.fc(h)))


def _data(B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (B, 7), generator=g), torch.randint(0, 3, (B,), generator=g)


def _step(mode: str = "auto", sizes=(20,), keep_clipped_sum: bool = True, keep=(),
          sigma: float = 0.9):
    torch.manual_seed(0)
    model = Net()
    engine = pg.DPEngine(model, noise_multiplier=sigma, max_grad_norm=0.05,
                         expected_batch_size=20, mode=mode, seed=3,
                         keep_clipped_sum=keep_clipped_sum)
    data = [_data(size, b) for b, size in enumerate(sizes)]
    for idx, y in data:
        engine.accumulate(F.cross_entropy(model(idx), y, reduction="none"), keep, retain=True)
    trace = engine.step()
    return model, engine, trace, data


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("sizes", [(20,), (12, 8)])
def test_the_held_clipped_sum_is_the_sum_of_the_clipped_per_sample_gradients(mode, sizes):
    model, _, trace, _ = _step(mode, sizes)
    post = trace.per_sample_grads(clipped=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(trace.clipped_sum[n], post[n].sum(0), rtol=1e-5, atol=1e-7)
        assert torch.equal(trace.private_grad[n], p.grad), n
        assert trace.clipped_sum[n].data_ptr() != p.grad.data_ptr(), n


def test_the_trace_is_unchanged_by_what_happens_after_the_step():
    model, engine, trace, data = _step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    sums = {n: s.clone() for n, s in trace.clipped_sum.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    opt.zero_grad(set_to_none=False)  # zeroes p.grad in place
    data[0][0].random_(1, 300)  # the input buffer reused for the next batch
    model.fc.weight.requires_grad_(False)
    idx, y = _data(20, 99)
    engine.backward(F.cross_entropy(model(idx), y, reduction="none"))
    for n in grads:
        assert torch.equal(trace.clipped_sum[n], sums[n]), n
        assert torch.equal(trace.private_grad[n], grads[n]), n
    trace.clipped_sum["fc.weight"].zero_()  # a copy of the dict, the same tensors
    assert not torch.equal(trace.clipped_sum["fc.weight"], sums["fc.weight"])


def test_the_trace_holds_no_callables():
    _, _, trace, _ = _step(sizes=(12, 8))
    for f in dataclasses.fields(trace):
        value = getattr(trace, f.name)
        assert not callable(value), f.name
        if isinstance(value, dict):
            assert not any(callable(v) for v in value.values()), f.name
    assert trace._clipped_sum is not None
    assert all(isinstance(t, torch.Tensor) for t in trace._clipped_sum.values())
    for f in dataclasses.fields(trace._noise_draw):
        assert not isinstance(getattr(trace._noise_draw, f.name),
                              types.FunctionType | types.MethodType), f.name


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_not_kept_writes_the_same_gradient_and_says_so(mode):
    held_model, _, held, _ = _step(mode, (12, 8))
    model, _, trace, _ = _step(mode, (12, 8), keep_clipped_sum=False)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, dict(held_model.named_parameters())[n].grad), n
        assert torch.equal(trace.noise[n], held.noise[n]), n
    assert trace._clipped_sum is None
    for ask in (lambda: trace.clipped_sum, lambda: trace.private_grad):
        with pytest.raises(TraceReleasedError, match=r"clipped_sum not kept.*keep_clipped_sum"):
            ask()
    assert torch.equal(trace.norms, held.norms)  # everything else is there


def test_keep_clipped_sum_for_one_step_of_an_engine_that_does_not_keep_it():
    model, engine, trace, _ = _step(keep_clipped_sum=False, keep="clipped_sum")
    for n, p in model.named_parameters():
        assert torch.equal(trace.private_grad[n], p.grad), n
    model.zero_grad()
    idx, y = _data(20, 5)
    later = engine.backward(F.cross_entropy(model(idx), y, reduction="none"))
    with pytest.raises(TraceReleasedError, match="not kept"):
        _ = later.clipped_sum


class Shifted(nn.Module):
    """A module without a rule that reads a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(24))
        self.register_buffer("shift", torch.zeros(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.scale


def test_a_changed_buffer_is_named_when_per_sample_gradients_are_asked_for_later():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), Shifted(), nn.Linear(24, 2))
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=6)
    x = torch.randn(6, 24)
    trace = engine.backward(model(x).square().sum(1))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model[1].shift.add_(0.5)  # e.g. updated by a callback between steps
    for n, g in grads.items():
        assert torch.equal(trace.private_grad[n], g), n
    with pytest.raises(TraceReleasedError, match=r"buffer that module '1' \(Shifted\)"):
        trace.per_sample_grads(samples=[0])


def test_an_input_modified_in_place_after_the_step_leaves_the_trace_unchanged():
    """The forward got a copy of the marked input, so reusing the caller's buffer is harmless."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 2))
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    x = torch.randn(4, 30)
    trace = engine.backward(model(x).square().sum(1))
    before = trace.per_sample_grads(samples=[1])
    x.copy_(torch.randn(4, 30))  # a reused input buffer
    after = trace.per_sample_grads(samples=[1])
    for n in before:
        assert torch.equal(before[n], after[n]), n


def test_versions_of_a_sparse_input():
    """A sparse argument (a graph's adjacency) has no data pointer; its version still counts."""
    from types import SimpleNamespace

    from privgrad.per_sample.layer_io import first_modified, versions

    adjacency = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.ones(2), (2, 2))
    unit = SimpleNamespace(rule=None, module=nn.Linear(2, 2), path="gnn")
    io = SimpleNamespace(call=SimpleNamespace(args=(torch.randn(2, 2),),
                                              kwargs={"adj": adjacency}, unit=unit),
                         grads=[torch.randn(2, 2)])
    recorded = versions([io])
    assert first_modified([io], recorded) is None
    adjacency.mul_(2)
    assert first_modified([io], recorded) is io
