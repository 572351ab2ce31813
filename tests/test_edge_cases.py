"""Edge cases found in review of the core: each against the batch-size-1 float64 oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import assert_close, loop_per_sample_grads, sin_loss
from test_layers import check


class AddPos(nn.Module):
    """A custom module (no rule) taking a per-sample input and a shared (T, D) table."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x, pos):
        return torch.tanh((x + pos) @ self.w)


class PosNet(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.block = AddPos(d)

    def forward(self, x):
        t = torch.arange(x.shape[1], dtype=x.dtype)[:, None]
        pos = torch.sin(t * torch.arange(1, x.shape[2] + 1, dtype=x.dtype))  # (T, D)
        return self.block(x, pos)


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_shared_input_whose_length_equals_the_batch_size(mode):
    torch.manual_seed(0)
    model = PosNet(3)
    check(model, torch.randn(4, 4, 3), mode)  # B == T: the (T, D) table is not per-sample
    check(model, torch.randn(3, 4, 3), mode)  # B != T on the same module
    check(model, torch.randn(4, 4, 3), mode)


class EmbPos(nn.Module):
    """nanoGPT-style positions: an Embedding on torch.arange(T), broadcast over the batch."""

    def __init__(self, T, d, expand):
        super().__init__()
        self.pos, self.lin, self.expand = nn.Embedding(T, d), nn.Linear(d, 2), expand

    def forward(self, x):
        pos = torch.arange(x.shape[1])
        pos = pos.expand(x.shape[0], -1) if self.expand else pos
        return self.lin(torch.tanh(x + self.pos(pos)))


def test_shared_position_embedding_is_exact_unless_its_length_is_the_batch_size():
    check(EmbPos(4, 3, expand=False), torch.randn(3, 4, 3))  # (T,) ids, T != B: expanded
    model = EmbPos(4, 3, expand=False)  # T == B: (T,) could be one id per sample
    errors = (pg.errors.InvalidLossError, pg.errors.UnsupportedModelError)
    with (pg.DPEngine(model, 0.0, max_grad_norm=1.0, expected_batch_size=4) as engine,
          pytest.raises(errors, match=r"expand\(B, T\)")):
        engine.backward(sin_loss(model(torch.randn(4, 4, 3))))
    check(EmbPos(4, 3, expand=True), torch.randn(4, 4, 3))


class MaskedMHA(nn.Module):
    def __init__(self, L):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)

    def forward(self, x):
        return self.mha(x, x, x, attn_mask=self.mask.to(x.dtype), need_weights=False)[0]


def test_attention_with_a_2d_mask_and_batch_equal_to_length():
    torch.manual_seed(0)
    check(MaskedMHA(5), torch.randn(5, 5, 4))


class Gated(nn.Module):
    """No rule (own parameter), holding a Linear that the model also calls directly."""

    def __init__(self, d):
        super().__init__()
        self.gate = nn.Parameter(torch.rand(d) + 0.5)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x) * self.gate


class SharedInside(nn.Module):
    def __init__(self, d, alias):
        super().__init__()
        self.block = Gated(d)
        if alias:
            self.head = self.block.lin  # the same module registered under a second path

    def forward(self, x):
        h = torch.tanh(self.block(x))
        lin = self.head if hasattr(self, "head") else self.block.lin
        return lin(h)


@pytest.mark.parametrize("alias", [True, False])
@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize", "vmap"])
def test_module_used_inside_a_functional_parent_and_directly(alias, mode):
    torch.manual_seed(0)
    check(SharedInside(3, alias), torch.randn(4, 3), mode)


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(input=self.lin(input=x))


@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_layers_called_with_keyword_input(mode):
    check(KeywordCall(), torch.randn(3, 3), mode)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_sequence_first_recurrent_net_with_one_sample(cell):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(3, 4)

        def forward(self, x):
            return self.rnn(x)[0].transpose(0, 1)

    check(Net(), torch.randn(5, 1, 3), batch_dim=1)


def test_lazy_functional_grads_are_those_of_the_step_after_optimizer_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 4, batch_first=True)).double()
    x = torch.randn(3, 2, 3, dtype=torch.double)
    want = loop_per_sample_grads(model, lambda out, i: sin_loss(out).sum(), x)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=float("inf"), expected_batch_size=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trace = engine.backward(sin_loss(model(x)))
    opt.step()
    assert_close(trace.per_sample_grads(), want)
    engine.close()


def _autocast_reference(model, x, y, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x).float(), y, reduction="sum") / len(y)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_autocast_bfloat16(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 8), nn.LayerNorm(8),
                          nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    want = _autocast_reference(model, x, y, torch.bfloat16)
    model.zero_grad()
    with pg.DPEngine(model, 0.0, max_grad_norm=float("inf"), expected_batch_size=6,
                     mode=mode) as engine:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = F.cross_entropy(model(x).float(), y, reduction="none")
        trace = engine.backward(losses)
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        scale = float(want[n].abs().max())
        torch.testing.assert_close(p.grad, want[n], rtol=3e-2, atol=3e-2 * scale)
    assert trace.norms.dtype == torch.float32


def test_half_precision_norms_do_not_overflow():
    """Squared norms of a float16 layer exceed 65504: they must be accumulated in float32."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64).half()
    x = (torch.randn(4, 8, 64) * 8).half()
    exact = loop_per_sample_grads(lin.double(), lambda out, i: out.sum(), x.double())
    lin.half()
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in exact.values()))
    assert float(norms.square().min()) > 65504  # would be inf in float16
    for mode in ("auto", "ghost"):
        with pg.DPEngine(lin, 0.0, max_grad_norm=1.0, expected_batch_size=4, mode=mode,
                         self_check=False) as engine:
            trace = engine.backward(lin(x).float().flatten(1).sum(1))
        assert torch.isfinite(trace.norms).all()
        torch.testing.assert_close(trace.norms.double(), norms, rtol=2e-3, atol=0)
        lin.zero_grad()
