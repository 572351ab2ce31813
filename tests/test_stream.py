"""One book-kept call streamed (``per_sample.stream``): its per-sample gradients made a chunk
at a time, clipped with factors known at once, summed and dropped.

Oracle: the batch-size-1 loop in float64 (norms, factors, ``Σ_i f_i g_i``), and for the
recomputed clipped sum the same step with the clipped sum held, bit for bit.
"""

import dataclasses
import math
from unittest import mock

import pytest
import torch
from torch import nn

import privgrad as pg
import privgrad.engine as engine_module
import privgrad.physical as physical
from oracle import loop_per_sample_grads, sin_loss
from privgrad.per_sample import chunks, ghost, stream
from privgrad.per_sample.batch import LayerIO
from privgrad.per_sample.capture import Call
from privgrad.per_sample.plan import plan_units

T = 24
"""Positions per sample: every book-kept call's per-sample gradients are at most twice its
input and output gradient, so each may be streamed (``stream._eligible``)."""


class Net(nn.Module):
    """Book-kept Conv1d, Embedding and Linear beside a materialised GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv(self.emb(idx).transpose(1, 2))))
        return self.fc(h.transpose(1, 2))  # (B, T, 5): a Linear on sequences


def _force(monkeypatch, winner: type[nn.Module] | None) -> list[type[nn.Module]]:
    """Streaming saves time for ``winner``'s calls only; returns the types measured."""
    measured = []

    def measure(io: LayerIO, batch_size: int) -> float:
        measured.append(type(io.call.unit.module))
        return 1.0 if isinstance(io.call.unit.module, winner or ()) else -1.0

    monkeypatch.setattr(stream, "_SAVED", {})
    monkeypatch.setattr(stream, "_measure", measure)
    monkeypatch.setattr(ghost, "DENSE_ELEMENTS", 0)  # book-keep every rule call
    return measured


def _oracle(model: nn.Module, idx: torch.Tensor, plan_factors) -> tuple:
    """Squared norms, factors and clipped sums; ``plan_factors(sq, C)`` with ``C`` the
    median of the total norms (some samples clipped, some not)."""
    want = loop_per_sample_grads(model, lambda out, i: sin_loss(out).sum(), idx)
    sq = {n: g.flatten(1).square().sum(1) for n, g in want.items()}
    C = float(sum(sq.values()).sqrt().median())
    factors = plan_factors(sq, C)
    sums = {n: torch.tensordot(factors[n], g, dims=1) for n, g in want.items()}
    return sq, factors, sums, C


def _flat_factors():
    def factors(sq, C):
        norms = sum(sq.values()).sqrt()
        f = torch.where(norms > C, C / norms, torch.ones_like(norms))
        return {n: f for n in sq}
    return factors


def _per_layer_factors(groups: dict[str, str]):
    def factors(sq, C):
        total = {}
        for n, s in sq.items():
            total[groups[n]] = total.get(groups[n], 0) + s
        f = {g: torch.where(s.sqrt() > C, C / s.sqrt(), torch.ones_like(s))
             for g, s in total.items()}
        return {n: f[groups[n]] for n in sq}
    return factors


@pytest.mark.parametrize("winner", [nn.Conv1d, nn.Embedding, nn.Linear])
@pytest.mark.parametrize("budget", [1, 500, 10**9])  # one sample, a few, all per chunk
def test_streamed_call_against_the_loop(monkeypatch, winner, budget):
    _force(monkeypatch, winner)
    torch.manual_seed(0)
    model = Net().double()
    idx = torch.randint(0, 50, (7, T))
    sq, factors, sums, C = _oracle(model, idx, _flat_factors())
    chosen = []
    real = physical._stream

    def spy(io, *a):
        chosen.append(type(io.call.unit.module))
        return real(io, *a)

    monkeypatch.setattr(physical, "_stream", spy)
    with mock.patch.object(chunks, "CHUNK_ELEMENTS", budget), \
            pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C,
                        expected_batch_size=7, mode="auto") as engine:
        trace = engine.backward(sin_loss(model(idx)), keep="clipped_sum")
    assert chosen == [winner]
    torch.testing.assert_close(trace.norms, sum(sq.values()).sqrt(), rtol=1e-10, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(trace.layer_norms[n], sq[n].sqrt(), rtol=1e-10, atol=0)
        torch.testing.assert_close(trace.param_clip_factors[n], factors[n], rtol=1e-10, atol=0)
        torch.testing.assert_close(p.grad, sums[n] / 7, rtol=1e-10, atol=1e-14, msg=n)
        torch.testing.assert_close(trace.clipped_sum[n], sums[n], rtol=1e-10, atol=1e-14)


def test_streamed_call_with_per_layer_clipping(monkeypatch):
    """Group factors: the streamed call's chunk factors come from its own group's norms
    and the other calls' norms in that group."""
    _force(monkeypatch, nn.Conv1d)
    torch.manual_seed(1)
    model = Net().double()
    idx = torch.randint(0, 50, (6, T))
    groups = {n: n.split(".")[0] for n, _ in model.named_parameters()}
    sq, factors, sums, C = _oracle(model, idx, _per_layer_factors(groups))
    with mock.patch.object(chunks, "CHUNK_ELEMENTS", 200), \
            pg.DPEngine(model, noise_multiplier=0.0,
                        clipping=pg.clipping.PerLayer(dict.fromkeys(set(groups.values()), C)),
                        expected_batch_size=6) as engine:
        engine.backward(sin_loss(model(idx)))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sums[n] / 6, rtol=1e-10, atol=1e-14, msg=n)


@pytest.mark.parametrize("sizes", [(9,), (5, 4)])
def test_recomputed_clipped_sum_is_the_steps_bit_for_bit(monkeypatch, sizes):
    """Written in place (the trace recomputes the streamed call a chunk at a time with the
    step's factors) against held, in float32 with noise: equal bits."""
    _force(monkeypatch, nn.Conv1d)
    again = []
    real_again = physical._stream_again
    monkeypatch.setattr(physical, "_stream_again",
                        lambda io, *a: again.append(type(io.call.unit.module))
                        or real_again(io, *a))
    out = {}
    real = engine_module.clip_batch
    for held in (False, True):
        monkeypatch.setattr(engine_module, "clip_batch", (lambda *a, **k: dataclasses.replace(
            real(*a, **k), recomputable=False)) if held else real)
        torch.manual_seed(2)
        model = Net()
        with mock.patch.object(chunks, "CHUNK_ELEMENTS", 300), \
                pg.DPEngine(model, noise_multiplier=0.7, max_grad_norm=0.1,
                            expected_batch_size=9, seed=5) as engine:
            for b, size in enumerate(sizes):
                idx = torch.randint(0, 50, (size, T), generator=torch.Generator().manual_seed(b))
                engine.accumulate(sin_loss(model(idx)), retain=True)
            trace = engine.step()
            out[held] = ({n: p.grad.clone() for n, p in model.named_parameters()},
                         {n: s.clone() for n, s in trace.clipped_sum.items()})
        # recomputed (in place) once per physical batch; held: never
        assert again == ([] if held else [nn.Conv1d] * len(sizes))
        again.clear()
    for n in out[True][0]:
        assert torch.equal(out[False][0][n], out[True][0][n]), n
        assert torch.equal(out[False][1][n], out[True][1][n]), n


def test_choose_takes_the_largest_saving_and_measures_each_shape_once(monkeypatch):
    measured = _force(monkeypatch, None)
    savings = {nn.Embedding: 0.5, nn.Conv1d: 2.0, nn.Linear: -1.0}
    monkeypatch.setattr(stream, "_measure",
                        lambda io, B: measured.append(type(io.call.unit.module))
                        or savings[type(io.call.unit.module)])
    calls = []
    real = physical._stream
    monkeypatch.setattr(physical, "_stream",
                        lambda io, *a: calls.append(type(io.call.unit.module)) or real(io, *a))
    model = Net()
    with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0,
                     expected_batch_size=4) as engine:
        for _ in range(3):
            engine.backward(sin_loss(model(torch.randint(0, 50, (4, T)))))
            model.zero_grad()
    assert sorted(measured, key=str) == sorted([nn.Embedding, nn.Conv1d, nn.Linear], key=str)
    assert calls == [nn.Conv1d] * 3
    savings[nn.Conv1d] = -2.0  # a new batch-size bucket is measured again
    calls.clear()
    with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0,
                     expected_batch_size=64) as engine:
        engine.backward(sin_loss(model(torch.randint(0, 50, (64, T)))))
    assert calls == [nn.Embedding]


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_only_auto_streams(monkeypatch, mode):
    measured = _force(monkeypatch, nn.Conv1d)
    model = Net()
    with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4,
                     mode=mode) as engine:
        engine.backward(sin_loss(model(torch.randint(0, 50, (4, T)))))
    assert measured == []


def test_one_sample_16_bit_and_single_position_calls_are_not_measured(monkeypatch):
    measured = _force(monkeypatch, nn.Conv1d)
    model = Net()
    with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0,
                     expected_batch_size=1) as engine:
        engine.backward(sin_loss(model(torch.randint(0, 50, (1, T)))))
    assert measured == []
    unit = plan_units(nn.Linear(6, 3))[0]  # 21 parameters

    def io(positions: int, dtype: torch.dtype = torch.float32, half: bool = False) -> LayerIO:
        A, G = torch.randn(4, positions, 6, dtype=dtype), torch.randn(4, positions, 3, dtype=dtype)
        return LayerIO(Call(unit, (A,), {}, [G.shape], [None]), [G], half)

    assert not stream._eligible(io(2, torch.bfloat16, True), 4)
    assert not stream._eligible(io(1), 4)  # 21 > 2 · (6 + 3): one position per sample
    assert stream._eligible(io(2), 4)  # 21 <= 2 · 2 · (6 + 3)


def test_factors_follow_the_parameter_order_not_the_rules_output_order(monkeypatch):
    """A Linear whose bias was registered before its weight: the rule returns weight
    first, the parameters list bias first. The chunks' factors must still be exact slices
    of the batch's (the recomputed clipped sum passes its bit-for-bit checksum)."""
    _force(monkeypatch, nn.Linear)
    streamed = []
    real = physical._stream
    monkeypatch.setattr(physical, "_stream",
                        lambda io, *a: streamed.append(io.call.unit.module) or real(io, *a))
    for seed in range(3):
        torch.manual_seed(seed)
        fc = nn.Linear(8, 5)
        w = fc.weight
        del fc.weight
        fc.weight = w
        assert [n for n, _ in fc.named_parameters()] == ["bias", "weight"]
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), fc)
        monkeypatch.setattr(stream, "_SAVED", {})
        monkeypatch.setattr(stream, "_measure",
                            lambda io, B, fc=fc: 1.0 if io.call.unit.module is fc else -1.0)
        streamed.clear()
        x = torch.randn(16, 3, 4)
        with mock.patch.object(chunks, "CHUNK_ELEMENTS", 100), \
                pg.DPEngine(model, noise_multiplier=0.5, max_grad_norm=0.05,
                            expected_batch_size=16, seed=seed) as engine:
            trace = engine.backward(sin_loss(model(x)))
            sums = trace.clipped_sum  # recomputed and checked
        assert streamed == [fc]
        assert set(sums) == {n for n, _ in model.named_parameters()}


def test_measure_times_both_ways_on_the_real_tensors():
    """The real measurement: a saving in seconds, finite, of either sign."""
    torch.manual_seed(3)
    conv = nn.Conv1d(6, 8, 3, padding=1)
    A, G = torch.randn(16, 6, 12), torch.randn(16, 8, 12)
    unit = plan_units(conv)[0]
    io = LayerIO(Call(unit, (A,), {}, [G.shape], [None]), [G])
    saved = stream._measure(io, 16)
    assert isinstance(saved, float) and math.isfinite(saved) and abs(saved) < 1.0


@pytest.mark.parametrize("winner", [nn.Embedding, nn.Conv1d])
def test_reported_norms_give_exactly_the_applied_factors(monkeypatch, winner):
    """Flat clipping in float32 with a streamed call that is not the last parameter: the
    reported total norms must be the very values the factors came from, so
    ``clip_factors(trace.norms, C)`` is bit for bit ``trace.clip_factors`` and a sample is
    counted unclipped (``norm <= C``, adaptive clipping) exactly when its factor is 1."""
    _force(monkeypatch, winner)
    for seed in range(4):
        torch.manual_seed(seed)
        model = Net()
        idx = torch.randint(0, 50, (32, T))
        with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1e-3,
                         expected_batch_size=32) as engine:
            trace = engine.backward(sin_loss(model(idx)))
        assert torch.equal(trace.clip_factors, pg.clipping.clip_factors(trace.norms, 1e-3))
        # a threshold exactly at each reported norm: that sample is unclipped, factor 1
        C = float(trace.norms[seed])
        model.zero_grad(set_to_none=True)
        with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C,
                         expected_batch_size=32) as engine:
            trace = engine.backward(sin_loss(model(idx)))
        assert float(trace.norms[seed]) == C
        assert float(trace.clip_factors[seed]) == 1.0
