"""A book-kept step writes p.grad into the clipped sum's own tensors; the trace recomputes it.

The oracle is the same step taken with the clipped sum held (``BatchResult.book_kept``
forced off: the noise drawn into a fresh gradient and the clipped sum added): the trace's
recomputed clipped sum and ``p.grad`` must equal it bit for bit.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
import privgrad.engine as engine_module
from privgrad.errors import TraceReleasedError
from privgrad.noise import NoiseSource


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


def _run(monkeypatch, mode: str, held: bool, batches: int = 1):
    """One logical step of ``batches`` retained physical batches; the clipped sum held or not."""
    real = engine_module.clip_batch
    if held:
        monkeypatch.setattr(engine_module, "clip_batch", lambda *a, **k: dataclasses.replace(
            real(*a, **k), book_kept=False))
    else:
        monkeypatch.setattr(engine_module, "clip_batch", real)
    torch.manual_seed(0)
    model = Net()
    engine = pg.DPEngine(model, noise_multiplier=0.9, max_grad_norm=0.05,
                         expected_batch_size=20, mode=mode, seed=3)
    for b in range(batches):
        idx, y = _data(20 // batches, b)
        engine.accumulate(F.cross_entropy(model(idx), y, reduction="none"), retain=True)
    trace = engine.step()
    return model, trace


@pytest.mark.parametrize("batches", [1, 2])
@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_recomputed_clipped_sum_and_gradient_equal_the_held_ones(monkeypatch, mode, batches):
    model, trace = _run(monkeypatch, mode, held=False, batches=batches)
    assert "clipped_sum" not in trace.__dict__  # nothing held until asked
    ref_model, ref = _run(monkeypatch, mode, held=True, batches=batches)
    assert bool((trace.clip_factors < 1).any())  # the test really clips
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(trace.clipped_sum[n], ref.clipped_sum[n]), n
        assert torch.equal(p.grad, q.grad), n
        assert torch.equal(trace.private_grad[n], p.grad), n
        assert torch.equal(p.grad, torch.add(trace.clipped_sum[n], trace.noise[n]).div_(20)), n


def test_the_private_gradient_is_written_into_the_clipped_sum(monkeypatch):
    """No second parameter-sized tensor: ``p.grad`` is the clipped sum's own storage."""
    filled: list[int] = []
    real = NoiseSource.add_gaussian

    def spy(self, targets, std, divisor=1.0):
        filled.extend(t.data_ptr() for t in targets.values())
        return real(self, targets, std, divisor)

    monkeypatch.setattr(NoiseSource, "add_gaussian", spy)
    model, _ = _run(monkeypatch, "auto", held=False)
    assert sorted(p.grad.data_ptr() for p in model.parameters()) == sorted(filled)


def test_keep_holds_the_clipped_sum(monkeypatch):
    monkeypatch.setattr(NoiseSource, "add_gaussian", None)  # must not be called
    torch.manual_seed(0)
    model = Net()
    engine = pg.DPEngine(model, noise_multiplier=0.9, max_grad_norm=0.05, expected_batch_size=8)
    idx, y = _data(8, 0)
    trace = engine.backward(F.cross_entropy(model(idx), y, reduction="none"), keep="post_clip")
    post = trace.per_sample_grads(clipped=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(trace.clipped_sum[n], post[n].sum(0), rtol=1e-5, atol=1e-7)
        assert torch.equal(trace.private_grad[n], p.grad), n


def test_an_input_modified_in_place_after_the_step_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 2))
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    x = torch.randn(4, 30)
    trace = engine.backward(model(x).square().sum(1))
    before = trace.per_sample_grads(samples=[1])
    x.copy_(torch.randn(4, 30))  # a reused input buffer
    for ask in (lambda: trace.clipped_sum, lambda: trace.per_sample_grads(samples=[1])):
        with pytest.raises(TraceReleasedError, match=r"module '0' \(Linear\).*modified in place"):
            ask()
    assert before["0.weight"].shape == (1, 20, 30)
