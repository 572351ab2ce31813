"""Noise drawn in place (``add_gaussian``) and drawn again exactly (``NoiseDraw``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from privgrad.noise import CHUNK, NoiseSource

# Sizes below one chunk, exactly one, and across chunk boundaries with tails of 17 and of
# fewer than 16 values (PyTorch's CPU sampler draws those with a different algorithm, so a
# replay that ignored the chunking would differ there).
SHAPES = {"w": (2 * CHUNK + 17,), "m": (300, 7), "tail": (5,), "one": (CHUNK,), "empty": (0, 3),
          "short": (CHUNK + 5,), "short3": (3 * CHUNK + 3,)}


def targets(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=dtype) for n, s in SHAPES.items()}


@pytest.mark.parametrize("seed", [3, None], ids=["seeded", "secure"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_added_noise_is_drawn_again_bit_for_bit(seed, dtype):
    before = targets(dtype)
    after = {n: t.clone() for n, t in before.items()}
    draw = NoiseSource(seed).add_gaussian(after, 0.7)
    noise = draw.values()
    for n, t in before.items():
        assert noise[n].shape == t.shape and noise[n].dtype == dtype
        assert torch.equal(after[n], torch.add(t, noise[n])), n
        assert t.numel() == 0 or float(noise[n].float().abs().sum()) > 0, n
    assert torch.equal(noise["m"], draw.values()["m"])  # every replay is the same


def test_chunks_are_separate_sampler_calls():
    """A tail of fewer than 16 values after a chunk is drawn by its own call."""
    z = NoiseSource(4).add_gaussian({"z": torch.zeros(CHUNK + 5)}, 1.0).values()["z"]
    g = torch.Generator().manual_seed(4)
    head, tail = torch.empty(CHUNK), torch.empty(5)
    head.normal_(0.0, 1.0, generator=g)
    tail.normal_(0.0, 1.0, generator=g)
    assert torch.equal(z, torch.cat([head, tail]))


def test_noise_statistics_and_independence_across_chunks():
    sigma = 2.5
    draw = NoiseSource(11).add_gaussian({"z": torch.zeros(4 * CHUNK, dtype=torch.float64)}, sigma)
    z = draw.values()["z"]
    n = z.numel()
    # Mean within 5 standard errors; std within 5 standard errors of σ (sd of s ≈ σ/√(2n)).
    assert abs(float(z.mean())) < 5 * sigma / math.sqrt(n)
    assert abs(float(z.std()) - sigma) < 5 * sigma / math.sqrt(2 * n)
    # A sampler restarted per chunk would repeat values; consecutive chunks are uncorrelated.
    parts = z.view(4, CHUNK)
    for a, b in zip(parts[:-1], parts[1:], strict=True):
        assert not torch.equal(a, b)
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(r) < 5 / math.sqrt(CHUNK)


def test_replay_does_not_advance_the_seeded_generator():
    like = {"a": torch.zeros(1000), "b": torch.zeros(CHUNK + 3)}
    plain, replayed = NoiseSource(5), NoiseSource(5)
    plain.add_gaussian({n: t.clone() for n, t in like.items()}, 1.0)
    replayed.add_gaussian({n: t.clone() for n, t in like.items()}, 1.0).values()
    second = [s.add_gaussian({n: t.clone() for n, t in like.items()}, 1.0).values()
              for s in (plain, replayed)]
    assert all(torch.equal(second[0][n], second[1][n]) for n in like)
    assert not torch.equal(second[0]["a"], NoiseSource(5).add_gaussian(
        {"a": torch.zeros(1000)}, 1.0).values()["a"])  # the second draw is a new one


def test_zero_std_adds_nothing_and_replays_zeros():
    t = {"a": torch.randn(40)}
    before = t["a"].clone()
    draw = NoiseSource(None).add_gaussian(t, 0.0)
    assert torch.equal(t["a"], before)
    assert torch.equal(draw.values()["a"], torch.zeros(40))


def test_no_targets():
    draw = NoiseSource(1).add_gaussian({}, 1.0)
    assert draw.values() == {}


def test_non_contiguous_target_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        NoiseSource(0).add_gaussian({"w": torch.zeros(8, 6).t()}, 1.0)


@pytest.mark.parametrize("seed", [7, None], ids=["seeded", "secure"])
def test_trace_noise_is_what_the_step_added(seed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 3))  # 120k > CHUNK
    x, y = torch.randn(9, 300), torch.randint(0, 3, (9,))
    engine = pg.DPEngine(model, noise_multiplier=1.3, max_grad_norm=0.5, expected_batch_size=8,
                         seed=seed)
    trace = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    for n, p in model.named_parameters():
        noise = trace.noise[n]
        assert noise.shape == p.shape
        assert torch.equal(p.grad, torch.add(trace.clipped_sum[n], noise).div_(8)), n
        assert torch.equal(trace.private_grad[n], p.grad), n
    z = torch.cat([v.flatten() for v in trace.noise.values()]).double()
    assert abs(float(z.std()) / (1.3 * 0.5) - 1) < 0.02  # 121k values: sd of the ratio 0.2%


def test_reading_trace_noise_leaves_the_next_steps_unchanged():
    def run(read: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = nn.Linear(20, 4)
        engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=1.0,
                             expected_batch_size=4, seed=123)
        grads = []
        for step in range(3):
            x = torch.randn(4, 20, generator=torch.Generator().manual_seed(step))
            trace = engine.backward(model(x).square().sum(1))
            if read:
                _ = trace.noise, trace.private_grad
            grads.append(model.weight.grad.clone())
            model.zero_grad()
        return grads

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True), strict=True))
