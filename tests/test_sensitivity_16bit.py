"""Sensitivity of the clipped sum in every dtype: one sample moves it by at most C.

The adversarial case is a batch whose samples' gradients all point the same way, each far
above the threshold, so every clipped contribution is ``C`` times one unit vector and the
clipped sum is ``≈ B·C`` long. Summed or rounded in 16 bits, the sum's own rounding
(relative ``2^-8`` for bfloat16, on a value ``B·C`` long) dwarfs the one sample's ``C``:
removing a sample then moved the clipped sum by far more than ``C`` (this model on
35dd941 at B = 2048: bfloat16 2.0·C book-kept and 3.2·C materialised, float16 1.3·C and
1.2·C; replacing one, up to 4.1·C against 2·C; and 1.004·C at B = 7 in bfloat16, from
factors rounded to 16 bits). The sum and the noise must be accumulated in float32 and
rounded once, into ``p.grad``.

The sums are read as the engine computed them (``trace.clipped_sum``) and compared in
float64. Each model has an Embedding, a Conv1d and a Linear (book-kept in modes
``"auto"``/``"ghost"``, materialised in ``"materialize"``/``"vmap"``) and a GroupNorm
(always materialised), so every way a clipped sum is formed is covered.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import privgrad as pg

MODES = ("auto", "ghost", "materialize", "vmap")
DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
C = 1.0
T, V, D = 4, 16, 8


class Net(nn.Module):
    """Embedding → Conv1d → GroupNorm → Linear: one layer of each rule family."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.conv = nn.Conv1d(D, D, 3, padding=1)
        self.norm = nn.GroupNorm(2, D)
        self.head = nn.Linear(D * T, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(1, 2)  # (B, D, T)
        return self.head(self.norm(self.conv(h)).flatten(1))


def _batch(B: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Identical tokens and targets pointing one way, scaled 30..60: every norm ≫ C.

    The loss ``⟨out_i, t_i⟩`` is linear in ``t_i``, so sample ``i``'s gradient is
    ``s_i`` times one common gradient: aligned, and every sample is clipped.
    """
    tokens = torch.tensor([[3, 7, 7, 11]]).expand(B, T)
    scale = 30.0 * (1 + torch.arange(B, dtype=torch.float64) / max(B - 1, 1))
    targets = (scale.unsqueeze(1) * torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64))
    return tokens, targets.to(dtype)


def _clipped_sum(engine: pg.DPEngine, model: Net, tokens: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, pg.StepTrace]:
    """The engine's clipped sum, all parameters flattened into one float64 vector."""
    for p in model.parameters():
        p.grad = None
    trace = engine.backward((model(tokens) * targets).sum(1))
    assert bool((trace.clip_factors < 1).all())  # every sample clipped
    s = trace.clipped_sum
    return torch.cat([s[n].double().reshape(-1) for n, _ in model.named_parameters()]), trace


def _model(dtype: torch.dtype) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def _large(mode: str, dtype: torch.dtype) -> int:
    """The large batch of each case: 2048 in 16 bits, where the rounding of the sum bites.

    ``"vmap"`` (torch.func, slower) at 256: its clipped sum is the same weighted sum of
    materialised gradients as ``"materialize"``'s. Float32 and float64 at 256: their
    rounding is far below ``C`` at any B, and PyTorch's CPU kernels for a float64 conv
    with the batch folded into its groups take seconds at 2048.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return 256
    return 256 if mode == "vmap" else 2048


@pytest.mark.parametrize("size", ["large", "small"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_removing_or_replacing_one_sample_moves_the_clipped_sum_by_at_most_C(mode, dtype, size):
    B = _large(mode, dtype) if size == "large" else 7
    model = _model(dtype)
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=B,
                         mode=mode)
    tokens, targets = _batch(B, dtype)
    full, trace = _clipped_sum(engine, model, tokens, targets)
    written = {n: p.grad for n, p in model.named_parameters()}
    sums, private = trace.clipped_sum, trace.private_grad
    moved = {}
    for j in (0, B - 1):
        keep = [i for i in range(B) if i != j]
        without, _ = _clipped_sum(engine, model, tokens[keep], targets[keep])
        moved[f"remove {j}"] = float((full - without).norm())
    # replacement by a sample whose gradient points the other way: at most 2C
    flipped = targets.clone()
    flipped[B // 2] = -targets[B // 2]
    replaced, _ = _clipped_sum(engine, model, tokens, flipped)
    moved["replace"] = float((full - replaced).norm())
    bound = {k: (2 if k == "replace" else 1) * C * (1 + 1e-3) for k in moved}
    assert all(moved[k] <= bound[k] for k in moved), {k: v / C for k, v in moved.items()}
    assert moved["replace"] >= 2 * C * (1 - 1e-2)  # the replacement is adversarial
    assert float(full.norm()) > 0.99 * B * C  # aligned: the sum is B·C long
    half = dtype in (torch.float16, torch.bfloat16)
    for n in written:  # accumulated in float32 (or wider) and rounded once, into p.grad
        assert sums[n].dtype == (torch.float32 if half else dtype), n
        assert written[n].dtype == dtype, n
        assert torch.equal(written[n], private[n]), n
        assert torch.equal(written[n], sums[n].div(B).to(dtype)), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("mode", MODES)
def test_each_clipped_contribution_of_a_16_bit_model_is_at_most_C_in_float32(mode, dtype):
    """Factors applied in float32 to the 16-bit per-sample gradients: norm ≤ C (not
    ``C·(1 + 2^-9)`` as when the factor is rounded to 16 bits first)."""
    B = 64
    model = _model(dtype)
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=B,
                         mode=mode)
    tokens, targets = _batch(B, dtype)
    trace = engine.backward((model(tokens) * targets).sum(1), keep=("post_clip",))
    post = trace.per_sample_grads(clipped=True)
    pre = trace.per_sample_grads(clipped=False)
    total = sum(g.double().flatten(1).square().sum(1) for g in post.values()).sqrt()
    assert all(g.dtype == torch.float32 for g in post.values())
    assert float(total.max()) <= C * (1 + 1e-5), float(total.max() / C - 1)
    for n, g in post.items():  # the kept contributions are what the clipped sum adds up
        f = trace.param_clip_factors[n].view(-1, *[1] * (g.dim() - 1))
        assert torch.equal(g, f * pre[n]), n
        torch.testing.assert_close(g.double().sum(0), trace.clipped_sum[n].double(),
                                   rtol=1e-5, atol=1e-5)


def test_noise_is_added_to_the_float32_sum_and_rounded_once():
    """``p.grad = round16((S + noise) / ebs)``: one rounding, of the float32 mechanism."""
    model = _model(torch.bfloat16)
    B = 16
    engine = pg.DPEngine(model, noise_multiplier=0.7, max_grad_norm=C, expected_batch_size=B,
                         mode="ghost", seed=5)
    tokens, targets = _batch(B, torch.bfloat16)
    trace = engine.backward((model(tokens) * targets).sum(1))
    for n, p in model.named_parameters():
        assert trace.noise[n].dtype == torch.float32, n
        want = torch.add(trace.clipped_sum[n], trace.noise[n]).div_(B)
        assert torch.equal(p.grad, want.to(torch.bfloat16)), n
        assert torch.equal(trace.private_grad[n], p.grad), n
