"""The engine and the noise on a CUDA device (skipped where there is none, as in CI).

The oracle is the same as on the CPU: the batch-size-1 loop in float64.
"""

import pytest
import torch
import torch.nn.functional as F

import privgrad as pg
from oracle import loop_per_sample_grads
from privgrad.noise import CHUNK_ACCELERATOR, NoiseSource
from test_trace import Net, _data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize", "vmap"])
def test_engine_on_cuda_matches_the_loop_oracle(mode):
    dev = torch.device("cuda")
    model = Net().double().to(dev)
    idx, y = (t.to(dev) for t in _data(12, 0))
    engine = pg.DPEngine(model, noise_multiplier=0.9, max_grad_norm=0.05,
                         expected_batch_size=12, mode=mode, seed=3)
    trace = engine.backward(F.cross_entropy(model(idx), y, reduction="none"))
    want = loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i : i + 1]), idx)
    f = trace.clip_factors
    assert bool((f < 1).any())
    lazy = trace.per_sample_grads(clipped=True, samples=[1, 3])
    for n, p in model.named_parameters():
        assert p.grad.device.type == "cuda"
        assert torch.equal(trace.private_grad[n], p.grad), n
        ref = (f.view(-1, *[1] * p.dim()) * want[n]).sum(0)
        torch.testing.assert_close(trace.clipped_sum[n], ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(lazy[n], f[[1, 3]].view(-1, *[1] * p.dim()) * want[n][[1, 3]],
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [3, None], ids=["seeded", "secure"])
def test_noise_on_cuda_is_drawn_again_bit_for_bit(seed, dtype):
    dev = torch.device("cuda")
    shapes = {"big": (2 * CHUNK_ACCELERATOR + 12_345,), "m": (300, 7), "tail": (5,)}
    base = {n: torch.randn(s, device=dev).to(dtype) for n, s in shapes.items()}
    added = {n: t.clone() for n, t in base.items()}
    entropy = iter([5, 5])
    noise = NoiseSource(seed, lambda: next(entropy)).add_gaussian(added, 0.7, 8.0).values()
    written = {n: torch.empty_like(t) for n, t in base.items()}
    NoiseSource(seed, lambda: next(entropy)).fill_gaussian(written, 0.7)
    for n in shapes:
        assert torch.equal(added[n], torch.add(base[n], noise[n]).div_(8.0)), n
        assert torch.equal(written[n], noise[n]), n
    assert abs(float(noise["big"].double().std()) / 0.7 - 1) < 0.01
