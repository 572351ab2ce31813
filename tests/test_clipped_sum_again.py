"""A book-kept step writes p.grad into the clipped sum's own tensors; the trace recomputes it.

The oracle is the same step taken with the clipped sum held (``BatchResult.recomputable``
forced off: the noise drawn into a fresh gradient and the clipped sum added): the trace's
recomputed clipped sum and ``p.grad`` must equal it bit for bit.
"""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
import privgrad.engine as engine_module
import privgrad.physical as physical
from privgrad.errors import TraceReleasedError
from privgrad.noise import NoiseSource


class Net(nn.Module):
    """Book-kept layers (Embedding, Conv1d, Linear) beside materialised ones (GroupNorm,
    PReLU through the functional fallback, a small Linear)."""

    def __init__(self, prelu: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.norm = nn.GroupNorm(4, 32)
        self.act = nn.PReLU() if prelu else nn.Tanh()  # PReLU refuses autocast's bfloat16
        self.fc = nn.Linear(32, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.conv(self.emb(idx).transpose(1, 2)))).mean(2)
        return self.head(torch.tanh(self.fc(h)))


def _data(B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (B, 7), generator=g), torch.randint(0, 3, (B,), generator=g)


def _run(monkeypatch, mode: str, held: bool, sizes=(20,), sigma=0.9, clipping=None,
         autocast=False, read_late=False):
    """One logical step of retained physical batches of ``sizes``; the clipped sum held or
    not. ``read_late``: the trace is read after ``optimizer.step()``, ``zero_grad()`` and
    one more step on other data."""
    real = engine_module.clip_batch
    if held:
        monkeypatch.setattr(engine_module, "clip_batch", lambda *a, **k: dataclasses.replace(
            real(*a, **k), recomputable=False))
    else:
        monkeypatch.setattr(engine_module, "clip_batch", real)
    torch.manual_seed(0)
    model = Net(prelu=not autocast)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = pg.DPEngine(model, noise_multiplier=sigma, expected_batch_size=20, mode=mode,
                         seed=3, **({"clipping": clipping} if clipping else
                                    {"max_grad_norm": 0.05}))
    for b, size in enumerate(sizes):
        idx, y = _data(size, b)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = F.cross_entropy(model(idx), y, reduction="none")
            engine.accumulate(losses, retain=True)
    trace = engine.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if read_late:
        opt.step()
        opt.zero_grad()
        idx, y = _data(20, 99)
        engine.backward(F.cross_entropy(model(idx), y, reduction="none"))
    return model, grads, trace


CASES = {
    "auto": {},
    "ghost": {"mode": "ghost"},
    "two-batches": {"sizes": (12, 8)},
    "ghost-three-batches": {"mode": "ghost", "sizes": (5, 9, 6)},
    "sigma0-per-layer": {"sigma": 0.0, "clipping": pg.clipping.PerLayer(
        {"emb": 0.05, "conv": 0.05, "norm": 0.02, "act": 0.02, "fc": 0.05, "head": 0.05})},
    "read-after-the-next-step": {"read_late": True},
    "read-inside-autocast": {},
}


@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_clipped_sum_and_gradient_equal_the_held_ones(monkeypatch, case):
    kw = {"mode": "auto"} | CASES[case]
    _, grads, trace = _run(monkeypatch, held=False, **kw)
    assert "clipped_sum" not in trace.__dict__  # nothing held until asked
    _, ref_grads, ref = _run(monkeypatch, held=True, **kw)
    assert bool((trace.param_clip_factors["fc.weight"] < 1).any())  # the test really clips
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "read-inside-autocast"):
        clipped_sum, private_grad = trace.clipped_sum, trace.private_grad
    for n, g in grads.items():
        assert torch.equal(clipped_sum[n], ref.clipped_sum[n]), n
        assert torch.equal(g, ref_grads[n]), n
        assert torch.equal(private_grad[n], g), n
        assert torch.equal(g, torch.add(clipped_sum[n], trace.noise[n]).div_(20)), n


def test_a_step_under_autocast_keeps_the_clipped_sum(monkeypatch):
    """CPU autocast lowers the precision of the step's matmuls: the sum is held, not redone."""
    monkeypatch.setattr(NoiseSource, "add_gaussian", None)  # the held way only
    model, grads, trace = _run(monkeypatch, "auto", held=False, autocast=True)
    for n, g in grads.items():
        assert torch.equal(trace.private_grad[n], g), n


def test_the_private_gradient_is_written_into_the_clipped_sum(monkeypatch):
    """No second parameter-sized tensor: ``p.grad`` is the clipped sum's own storage."""
    filled: list[int] = []
    real = NoiseSource.add_gaussian

    def spy(self, targets, std, divisor=1.0):
        filled.extend(t.data_ptr() for t in targets.values())
        return real(self, targets, std, divisor)

    monkeypatch.setattr(NoiseSource, "add_gaussian", spy)
    model, _, trace = _run(monkeypatch, "auto", held=False)
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


def test_an_input_modified_in_place_after_the_step_leaves_the_trace_unchanged():
    """The forward got a copy of the marked input, so reusing the caller's buffer is harmless."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 2))
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    x = torch.randn(4, 30)
    trace = engine.backward(model(x).square().sum(1))
    before = trace.per_sample_grads(samples=[1])
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    x.copy_(torch.randn(4, 30))  # a reused input buffer
    after = trace.per_sample_grads(samples=[1])
    for n, g in grads.items():
        assert torch.equal(before[n], after[n]), n
        assert torch.equal(trace.private_grad[n], g), n


def _tensors_reachable(obj, seen=None):
    """Every tensor reachable from ``obj`` through containers, dataclasses and partials."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_reachable(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_reachable(v, seen)
    elif isinstance(obj, functools.partial):
        yield from _tensors_reachable((obj.args, obj.keywords), seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        yield from _tensors_reachable(vars(obj), seen)


def test_the_trace_holds_no_gradient_sized_tensor(monkeypatch):
    model, _, trace = _run(monkeypatch, "auto", held=False)
    big = {p.numel() for p in model.parameters() if p.numel() > 100}
    def gradient_sized(trace):  # the parameters themselves are reachable through the calls
        return [t.shape for t in _tensors_reachable(trace)
                if t.numel() in big and not isinstance(t, nn.Parameter)]

    assert gradient_sized(trace) == []
    _ = trace.clipped_sum  # computed and held once asked for
    assert len(gradient_sized(trace)) == len(big)


def test_a_parameter_frozen_after_the_step_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 2))
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    trace = engine.backward(model(torch.randn(4, 30)).square().sum(1))
    model[0].weight.requires_grad_(False)
    with pytest.raises(TraceReleasedError, match=r"'0\.weight' was frozen or unfrozen"):
        _ = trace.clipped_sum


class Masked(nn.Module):
    """A module without a rule (functional fallback) with a mask argument."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(24))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * self.scale + mask


class WithMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(24, 24)
        self.masked = Masked()
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.masked(self.fc(x), mask=mask)))


def test_an_inference_tensor_among_the_inputs_keeps_the_clipped_sum(monkeypatch):
    """Its in-place changes are not counted, so the step holds the clipped sum."""
    monkeypatch.setattr(NoiseSource, "add_gaussian", None)  # the held way only
    torch.manual_seed(0)
    model = WithMask()
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=6)
    with torch.inference_mode():
        mask = torch.zeros(6, 24)
    trace = engine.backward(model(torch.randn(6, 24), mask).square().sum(1))
    for n, p in model.named_parameters():
        assert torch.equal(trace.private_grad[n], p.grad), n


@pytest.mark.parametrize("change", ["one-ulp", "two-values-swapped", "row-moved"])
def test_a_recomputation_that_differs_is_refused(monkeypatch, change):
    """The checksum: a recomputed clipped sum that is not the step's, bit for bit, raises,
    also when its values only moved (a token rewritten through numpy memory moves an
    embedding row)."""
    _, grads, trace = _run(monkeypatch, "auto", held=False)
    real = physical._clipped_sums

    def changed(*args):
        out = real(*args)
        name = "emb.weight" if change == "row-moved" else "fc.weight"
        w = out[name].clone()
        flat = w.view(-1)
        if change == "one-ulp":
            flat[1] = torch.nextafter(flat[1], torch.tensor(float("inf")))
        elif change == "two-values-swapped":
            flat[[3, 700]] = flat[[700, 3]]
        else:
            w[[5, 9]] = w[[9, 5]]
        assert not torch.equal(w, out[name])
        out[name] = w
        return out

    monkeypatch.setattr(physical, "_clipped_sums", changed)
    with pytest.raises(TraceReleasedError, match=r"computed again .* differs"):
        _ = trace.private_grad


def test_keep_clipped_sum_holds_it_without_per_sample_gradients(monkeypatch):
    _, grads, _ = _run(monkeypatch, "auto", held=False)  # the same step, computed again
    monkeypatch.setattr(NoiseSource, "add_gaussian", None)  # the held way only
    materialised = []
    real = physical.per_sample_grads
    monkeypatch.setattr(physical, "per_sample_grads",
                        lambda ios, *a, **k: materialised.extend(ios) or real(ios, *a, **k))
    torch.manual_seed(0)
    model = Net()
    engine = pg.DPEngine(model, noise_multiplier=0.9, max_grad_norm=0.05, expected_batch_size=20,
                         seed=3)
    idx, y = _data(20, 0)
    trace = engine.backward(F.cross_entropy(model(idx), y, reduction="none"), keep="clipped_sum")
    assert trace.kept == ()  # no per-sample gradients held
    assert {io.call.unit.path for io in materialised} == {"norm", "act"}  # still book-kept
    idx.zero_()  # what the model ran on changes; the held sum does not
    for n, p in model.named_parameters():
        assert torch.equal(trace.private_grad[n], p.grad) and torch.equal(p.grad, grads[n]), n


class Shifted(nn.Module):
    """A module without a rule that reads a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(24))
        self.register_buffer("shift", torch.zeros(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.scale


def test_a_module_with_buffers_keeps_the_clipped_sum_and_names_a_changed_buffer(monkeypatch):
    monkeypatch.setattr(NoiseSource, "add_gaussian", None)  # the held way only
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


def test_the_model_itself_as_the_layer_keeps_its_trace_when_the_input_is_reused():
    model = nn.Linear(30, 2)
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    x = torch.randn(4, 30)
    trace = engine.backward(model(x).square().sum(1))
    before = trace.per_sample_grads(samples=[0])
    x.mul_(2)
    after = trace.per_sample_grads(samples=[0])
    assert torch.equal(before["weight"], after["weight"])


def test_the_recomputation_runs_with_the_steps_thread_count(monkeypatch):
    """A BLAS may split a reduction differently with another thread count."""
    _, _, trace = _run(monkeypatch, "auto", held=False)
    at_step = torch.get_num_threads()
    seen = []
    real = physical._clipped_sums
    monkeypatch.setattr(physical, "_clipped_sums",
                        lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    torch.set_num_threads(1)
    try:
        _ = trace.clipped_sum
        assert seen == [at_step] and torch.get_num_threads() == 1  # and restored after
    finally:
        torch.set_num_threads(at_step)


def test_versions_of_a_sparse_input():
    """A sparse argument (a graph's adjacency) has no data pointer; its version still counts."""
    from types import SimpleNamespace

    from privgrad.per_sample.batch import first_modified, versions

    adjacency = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.ones(2), (2, 2))
    unit = SimpleNamespace(rule=None, module=nn.Linear(2, 2), path="gnn")
    io = SimpleNamespace(call=SimpleNamespace(args=(torch.randn(2, 2),),
                                              kwargs={"adj": adjacency}, unit=unit),
                         grads=[torch.randn(2, 2)])
    recorded = versions([io])
    assert first_modified([io], recorded) is None
    adjacency.mul_(2)
    assert first_modified([io], recorded) is io
