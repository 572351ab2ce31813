"""Noise written (``fill_gaussian``) or added (``add_gaussian``) in place, and drawn again
exactly (``NoiseDraw``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from privgrad.noise import CHUNK, NoiseSource

# Sizes of fewer than 16 values (PyTorch's CPU sampler draws those with another algorithm),
# with a tail after a multiple of 16, large, and empty.
SHAPES = {"w": (70_001,), "m": (300, 7), "tail": (5,), "one": (1,), "empty": (0, 3),
          "sixteen": (16,), "big": (3, 65_536)}


def filled(seed, dtype=torch.float32, std=0.7):
    out = {n: torch.full(s, 9.0, dtype=dtype) for n, s in SHAPES.items()}
    return out, NoiseSource(seed).fill_gaussian(out, std)


@pytest.mark.parametrize("seed", [3, None], ids=["seeded", "secure"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_written_noise_is_drawn_again_bit_for_bit(seed, dtype):
    out, draw = filled(seed, dtype)
    noise = draw.values()
    for n, t in out.items():
        assert noise[n].shape == t.shape and noise[n].dtype == dtype
        assert torch.equal(t, noise[n]), n
        assert not (t == 9.0).any(), n  # every value overwritten
    assert torch.equal(noise["m"], draw.values()["m"])  # every replay is the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_seeded_noise_is_one_generator_drawn_in_chunks(dtype):
    """The oracle: one generator seeded with the seed, one sampler call per CHUNK values;
    16-bit tensors get float32 draws rounded (PyTorch 2.11's CPU sampler bounds 16-bit
    draws at |z| < 4, noise.py), for the written and the added noise alike."""
    out, _ = filled(4, dtype, std=1.3)
    added = {n: torch.zeros(s, dtype=dtype) for n, s in SHAPES.items()}
    NoiseSource(4).add_gaussian(added, 1.3)
    g = torch.Generator().manual_seed(4)
    drawn_in = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for n, shape in SHAPES.items():
        size = math.prod(shape)
        want = [torch.empty(min(CHUNK, size - s), dtype=drawn_in)
                .normal_(0, 1.3, generator=g).to(dtype) for s in range(0, size, CHUNK)]
        want = torch.cat(want) if want else out[n].flatten()
        assert torch.equal(out[n].flatten(), want) and torch.equal(added[n].flatten(), want), n


@pytest.mark.parametrize("seed", [3, None], ids=["seeded", "secure"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_added_noise_is_the_written_noise_bit_for_bit(seed, dtype):
    """``add_gaussian``: ``(t + noise) / divisor`` with the noise its replay (and
    ``fill_gaussian`` from the same state) gives."""
    torch.manual_seed(0)
    base = {n: torch.randn(s).to(dtype) for n, s in SHAPES.items()}
    out = {n: t.clone() for n, t in base.items()}
    entropy = iter([5, 5])  # the secure draw and its written oracle get the same fresh seed
    draw = NoiseSource(seed, lambda: next(entropy)).add_gaussian(out, 0.7, 8.0)
    noise = draw.values()
    written = {n: torch.full(s, 9.0, dtype=dtype) for n, s in SHAPES.items()}
    NoiseSource(seed, lambda: next(entropy)).fill_gaussian(written, 0.7)
    for n, t in out.items():
        assert torch.equal(t, torch.add(base[n], noise[n]).div_(8.0)), n
        assert torch.equal(noise[n], written[n]), n
    big = torch.cat([noise["w"], noise["big"].flatten()]).double()
    assert abs(float(big.std()) / 0.7 - 1) < 0.02
    assert float((noise["w"] == 0).double().mean()) < 0.01  # drawn, not left zero


def test_added_zero_std_only_divides_and_non_contiguous_is_refused():
    t = {"a": torch.randn(40)}
    want = t["a"] / 4
    draw = NoiseSource(None).add_gaussian(t, 0.0, 4.0)
    assert torch.equal(t["a"], want) and torch.equal(draw.values()["a"], torch.zeros(40))
    ok = torch.full((10,), 3.0)
    with pytest.raises(ValueError, match="add_gaussian.*contiguous"):
        NoiseSource(0).add_gaussian({"ok": ok, "w": torch.zeros(8, 6).t()}, 1.0)
    assert torch.equal(ok, torch.full((10,), 3.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_noise_has_gaussian_tails(dtype):
    """PyTorch 2.11's CPU sampler drawing in 16 bits never went beyond |z| = 3.4 (bfloat16)
    or 3.9 (float16): bounded noise. A Gaussian puts 6.3e-5 of its mass beyond 4σ."""
    z = NoiseSource(2).gaussian({"z": torch.empty(2_000_000, dtype=dtype)}, 1.0)["z"].double()
    beyond = int((z.abs() > 4).sum())  # expected about 127
    assert 70 < beyond < 200 and float(z.abs().max()) > 4.5


def test_secure_draws_take_fresh_entropy_once_per_draw():
    """One seed per draw and device, whatever the number of tensors (under torch.distributed
    each seed is a broadcast from rank 0)."""
    seeds = iter([11, 12, 11])
    source = NoiseSource(None, entropy=lambda: next(seeds))
    like = {"w": torch.empty(100), "b": torch.empty(3)}
    draws = [source.gaussian(like, 1.0) for _ in range(3)]
    g = torch.Generator().manual_seed(12)
    for n, t in like.items():
        assert torch.equal(draws[1][n], torch.empty_like(t).normal_(0, 1, generator=g)), n
        assert torch.equal(draws[0][n], draws[2][n]) and not torch.equal(draws[0][n], draws[1][n])


def test_noise_statistics_and_independence_across_tensors():
    sigma = 2.5
    like = {f"t{i}": torch.empty(1 << 16, dtype=torch.float64) for i in range(4)}
    z = NoiseSource(11).fill_gaussian(like, sigma).values()
    flat = torch.cat(list(z.values()))
    n = flat.numel()
    # Mean within 5 standard errors; std within 5 standard errors of σ (sd of s ≈ σ/√(2n)).
    assert abs(float(flat.mean())) < 5 * sigma / math.sqrt(n)
    assert abs(float(flat.std()) - sigma) < 5 * sigma / math.sqrt(2 * n)
    # A sampler restarted per tensor would repeat values; the tensors are uncorrelated.
    parts = list(z.values())
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not torch.equal(parts[i], parts[j])
            r = float(torch.corrcoef(torch.stack([parts[i], parts[j]]))[0, 1])
            assert abs(r) < 5 / math.sqrt(1 << 16), (i, j)


def test_replay_does_not_advance_the_seeded_generator():
    like = {"a": torch.zeros(1000), "b": torch.zeros(70_003)}
    plain, replayed = NoiseSource(5), NoiseSource(5)
    plain.gaussian(like, 1.0)
    replayed.fill_gaussian({n: t.clone() for n, t in like.items()}, 1.0).values()
    second = [s.gaussian(like, 1.0) for s in (plain, replayed)]
    assert all(torch.equal(second[0][n], second[1][n]) for n in like)
    assert not torch.equal(second[0]["a"], NoiseSource(5).gaussian(
        {"a": torch.zeros(1000)}, 1.0)["a"])  # the second draw is a new one


def test_seeded_state_round_trips():
    a = NoiseSource(6)
    a.gaussian({"w": torch.zeros(500)}, 1.0)
    b = NoiseSource(None)
    b.load_state_dict(a.state_dict())
    like = {"w": torch.zeros(500)}
    assert torch.equal(a.gaussian(like, 1.0)["w"], b.gaussian(like, 1.0)["w"])


def test_zero_std_writes_zeros_and_replays_zeros():
    t = {"a": torch.randn(40)}
    draw = NoiseSource(None).fill_gaussian(t, 0.0)
    assert torch.equal(t["a"], torch.zeros(40))
    assert torch.equal(draw.values()["a"], torch.zeros(40))


def test_no_targets():
    draw = NoiseSource(1).fill_gaussian({}, 1.0)
    assert draw.values() == {}


def test_non_contiguous_target_is_refused_before_anything_is_written():
    ok = torch.full((10,), 3.0)
    with pytest.raises(ValueError, match="contiguous"):
        NoiseSource(0).fill_gaussian({"ok": ok, "w": torch.zeros(8, 6).t()}, 1.0)
    assert torch.equal(ok, torch.full((10,), 3.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [7, None], ids=["seeded", "secure"])
def test_trace_noise_is_what_the_step_added(seed, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 3)).to(dtype)
    x, y = torch.randn(9, 300, dtype=dtype), torch.randint(0, 3, (9,))
    engine = pg.DPEngine(model, noise_multiplier=1.3, max_grad_norm=0.5, expected_batch_size=8,
                         seed=seed)
    trace = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    for n, p in model.named_parameters():
        noise = trace.noise[n]
        assert noise.shape == p.shape
        # a 16-bit p.grad is the float32 (sum + noise) / 8 rounded once to its dtype
        assert torch.equal(p.grad, torch.add(trace.clipped_sum[n], noise).div_(8).to(dtype)), n
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
