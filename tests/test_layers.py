"""Every layer family and the functional fallback against the batch-size-1 loop, in float64."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import privgrad as pg
from oracle import assert_close, loop_per_sample_grads, sin_loss
from test_per_sample_exactness import CellUnrolled

MODES = ["materialize", "vmap", "ghost", "auto"]


def check(model: nn.Module, x: torch.Tensor, mode: str = "auto", batch_dim: int = 0) -> None:
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    want = loop_per_sample_grads(model, lambda out, i: sin_loss(out).sum(), x, batch_dim)
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=float("inf"),
                         expected_batch_size=x.shape[batch_dim], mode=mode)
    try:
        trace = engine.backward(sin_loss(model(x)), keep=("pre_clip",))
        assert_close(trace.per_sample_grads(), want)
        # the lazy path (nothing kept) gives the same samples
        model.zero_grad()
        trace = engine.backward(sin_loss(model(x)))
        idx = [x.shape[batch_dim] - 1, 0]
        assert_close(trace.per_sample_grads(samples=idx), {n: g[idx] for n, g in want.items()})
    finally:
        engine.close()
    # clipping in this mode (ghost norms, one-matmul clipped sums) against the oracle
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in want.values()))
    C = float(norms.median()) if float(norms.median()) > 0 else 1.0
    factors = torch.where(norms > C, C / norms, torch.ones_like(norms))
    model.zero_grad()
    with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C,
                     expected_batch_size=x.shape[batch_dim], mode=mode) as engine:
        trace = engine.backward(sin_loss(model(x)))
    torch.testing.assert_close(trace.norms, norms, rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():
        if p.requires_grad:
            expected = torch.tensordot(factors, want[n], dims=1) / x.shape[batch_dim]
            torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12, msg=n)
    model.zero_grad()


@given(B=st.integers(1, 3), T=st.sampled_from([1, 2, 33]), d=st.integers(1, 9),
       p=st.integers(1, 9), mode=st.sampled_from(["auto", "ghost"]))
def test_linear_ghost_long_sequences(B, T, d, p, mode):
    check(nn.Linear(d, p), torch.randn(B, T, d), mode)


@given(
    B=st.integers(1, 5), mid=st.lists(st.integers(1, 4), max_size=2),
    d=st.integers(1, 6), p=st.integers(1, 6), bias=st.booleans(),
    mode=st.sampled_from(MODES),
)
def test_linear_any_rank(B, mid, d, p, bias, mode):
    check(nn.Linear(d, p, bias=bias), torch.randn(B, *mid, d), mode)


conv_cfg = st.fixed_dictionaries({
    "dim": st.sampled_from([1, 2, 3]),
    "B": st.integers(1, 3),
    "groups": st.sampled_from([1, 2]),
    "cin_per_group": st.integers(1, 2),
    "cout_per_group": st.integers(1, 2),
    "k": st.integers(1, 3),
    "stride": st.integers(1, 2),
    "dilation": st.integers(1, 2),
    "padding": st.sampled_from([0, 1, "same", "valid"]),
    "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    "bias": st.booleans(),
})


def make_conv(cfg: dict, bias: bool | None = None) -> nn.Module:
    """The convolution a ``conv_cfg`` draw describes (bias from the draw unless given)."""
    conv_t = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[cfg["dim"]]
    stride = 1 if cfg["padding"] == "same" else cfg["stride"]
    g = cfg["groups"]
    return conv_t(g * cfg["cin_per_group"], g * cfg["cout_per_group"], cfg["k"], stride=stride,
                  padding=cfg["padding"], dilation=cfg["dilation"], groups=g,
                  bias=cfg["bias"] if bias is None else bias, padding_mode=cfg["padding_mode"])


@settings(max_examples=40)
@given(cfg=conv_cfg, mode=st.sampled_from(MODES))
def test_conv(cfg, mode):
    g, m = cfg["groups"], make_conv(cfg)
    size = 5  # ≥ the largest dilated kernel (3 taps, dilation 2)
    check(m, torch.randn(cfg["B"], g * cfg["cin_per_group"], *([size] * cfg["dim"])), mode)


def test_conv_asymmetric_same_padding():
    # even kernel with "same" needs asymmetric padding
    check(nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(1, 2)), torch.randn(3, 2, 6, 7))


@given(B=st.integers(1, 4), T=st.integers(1, 6), padding=st.sampled_from([None, 0, 3]),
       mode=st.sampled_from(MODES))
def test_embedding(B, T, padding, mode):
    class EmbModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3, padding_idx=padding)

        def forward(self, idx):
            return self.emb(idx)

    idx = torch.randint(0, 7, (B, T))
    idx[0, 0] = 3  # a token repeated within a sample
    if T > 1:
        idx[0, 1] = 3
    check(EmbModel(), idx, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make,shape", [
    (lambda: nn.LayerNorm(4), (3, 4)),
    (lambda: nn.LayerNorm([3, 4]), (2, 5, 3, 4)),
    (lambda: nn.LayerNorm(4, bias=False), (3, 2, 4)),
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
    (lambda: nn.GroupNorm(1, 4), (1, 4, 3, 3)),
    (lambda: nn.InstanceNorm1d(3, affine=True), (2, 3, 6)),
    (lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 4)),
    (lambda: nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 3)),
    (lambda: nn.RMSNorm(4), (3, 5, 4)),
    (lambda: nn.RMSNorm([2, 4], eps=1e-5), (3, 2, 4)),
])
def test_normalization(make, shape, mode):
    model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), make())
    check(model, torch.randn(*shape), mode)


class Scale(nn.Module):
    """A custom module holding a Parameter and a child Linear."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x * self.alpha).tanh()


class MHA(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)

    def forward(self, x):
        out = self.attn(x, x, x, need_weights=False)[0]
        return out if self.attn.batch_first else out.transpose(0, 1)


class RNN(nn.Module):
    def __init__(self, cell, batch_first):
        super().__init__()
        self.rnn = cell(3, 4, num_layers=2, batch_first=batch_first)

    def forward(self, x):
        out = self.rnn(x)[0]
        return out if self.rnn.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_fallback_custom_module(mode):
    check(nn.Sequential(nn.Linear(3, 4), Scale()), torch.randn(4, 3), mode)


@pytest.mark.parametrize("batch_first", [True, False])
def test_fallback_multihead_attention(batch_first):
    x = torch.randn(3, 5, 4) if batch_first else torch.randn(5, 3, 4)
    check(MHA(batch_first), x, batch_dim=0 if batch_first else 1)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [True, False])
def test_fallback_recurrent(cell, batch_first):
    x = torch.randn(3, 5, 3) if batch_first else torch.randn(5, 3, 3)
    check(RNN(cell, batch_first), x, batch_dim=0 if batch_first else 1)


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_fallback_lstm_cell_whose_outputs_depend_on_each_other(mode):
    check(CellUnrolled(), torch.randn(3, 4, 3), mode)  # h computed from c at each step


class KeywordMHA(nn.Module):
    """Sequence-first attention called with keywords and a per-sample padding mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)

    def forward(self, x):
        mask = x[..., 0].T > 0.5  # (B, T): differs between samples, read from the sample
        mask[:, 0] = False  # never every key of a sample
        out = self.attn(query=x, key=x, value=x, key_padding_mask=mask, need_weights=False)[0]
        return out.transpose(0, 1)


@pytest.mark.parametrize("T", [2, 5])
def test_fallback_sequence_first_attention_called_with_keywords(T):
    """Batch on dim 1 of query/key/value but dim 0 of key_padding_mask (T == B, which the
    self-check's input-mixing test refuses, is in test_per_sample_exactness.py)."""
    check(KeywordMHA(), torch.randn(T, 3, 4), batch_dim=1)


def test_fallback_conv_transpose():
    check(nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2), nn.Tanh()), torch.randn(3, 2, 4, 4))


class Tied(nn.Module):
    """Embedding and output layer share one Parameter; a block is called twice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = self.block(torch.tanh(self.block(h)))
        return self.head(h)


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_tied_weights_and_repeated_module(mode):
    check(Tied(), torch.randint(0, 6, (4, 3)), mode)


def test_frozen_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    trace = engine.backward(sin_loss(model(torch.randn(4, 3, dtype=torch.double))))
    assert model[0].weight.grad is None
    assert set(trace.clipped_sum) == {"0.bias", "2.weight", "2.bias"}
    engine.close()
    model.zero_grad()
    check(model, torch.randn(4, 3))


def _run_formula(rule, m, A, G, name):
    """``{attr: (B,)}``: each parameter's squared norms by the formula ``name`` where it has
    one (its only formula otherwise)."""
    from privgrad.per_sample import policy

    formulas = rule.norm_formulas(m, A, G)
    return {a: policy.run(fs[name] if name in fs else next(iter(fs.values())), A.shape[0],
                          A.device) for a, fs in formulas.items()}


@given(cfg=conv_cfg, formula=st.sampled_from(["ghost", "gram", "materialized"]))
def test_conv_norm_formulas_equal_materialised(cfg, formula):
    from privgrad.per_sample.rules import conv as rules

    g, m = cfg["groups"], make_conv(cfg, bias=True).double()
    A = torch.randn(cfg["B"], g * cfg["cin_per_group"], *([5] * cfg["dim"]), dtype=torch.double)
    G = torch.randn_like(m(A))
    want = {k: v.flatten(1).square().sum(1) for k, v in rules.per_sample_grads(m, A, G).items()}
    assert_close(_run_formula(rules.RULES[0], m, A, G, formula), want)
    f = torch.rand(cfg["B"], dtype=torch.double)
    psg = rules.per_sample_grads(m, A, G)
    assert_close(rules.clipped_sum(m, A, G, {"weight": f, "bias": f}),
                 {k: torch.tensordot(f, v, dims=1) for k, v in psg.items()})


@given(B=st.integers(1, 3), T=st.sampled_from([1, 2, 17]), d=st.integers(1, 7),
       p=st.integers(1, 7), formula=st.sampled_from(["ghost", "materialized", "outer"]))
def test_linear_norm_formulas_equal_materialised(B, T, d, p, formula):
    from privgrad.per_sample.rules import linear as rules

    m = nn.Linear(d, p).double()
    A = torch.randn(B, T, d, dtype=torch.double)
    G = torch.randn(B, T, p, dtype=torch.double)
    want = {k: v.flatten(1).square().sum(1) for k, v in rules.per_sample_grads(m, A, G).items()}
    assert_close(_run_formula(rules.RULES[0], m, A, G, formula), want)


# ---- batch chunks: per-sample norms through large intermediates run a few samples at a time


@settings(max_examples=25)
@given(cfg=conv_cfg, mode=st.sampled_from(["ghost", "auto", "materialize"]))
def test_conv_norms_in_chunks_of_one_sample(cfg, mode):
    from privgrad.per_sample import chunks

    g, m = cfg["groups"], make_conv(cfg)
    size = 5  # ≥ the largest dilated kernel (3 taps, dilation 2)
    x = torch.randn(cfg["B"] + 1, g * cfg["cin_per_group"], *([size] * cfg["dim"]))
    with mock.patch.object(chunks, "CHUNK_ELEMENTS", 1):
        check(m, x, mode)  # every chunk is one sample


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.LayerNorm([3, 4]), (3, 5, 3, 4)),
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
    (lambda: nn.InstanceNorm2d(3, affine=True), (3, 3, 4, 4)),
    (lambda: nn.RMSNorm(4), (3, 5, 4)),
])
def test_normalization_in_chunks(make, shape):
    from privgrad.per_sample import chunks

    model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), make())
    with mock.patch.object(chunks, "CHUNK_ELEMENTS", 2 * shape[-1]):  # uneven chunks
        check(model, torch.randn(*shape), "auto")


def test_chunked_concatenation_is_the_whole():
    from privgrad.per_sample import chunks

    x = torch.randn(7, 3)
    with mock.patch.object(chunks, "CHUNK_ELEMENTS", 10):
        assert chunks.chunk_size(7, 3) == 3 and chunks.chunk_size(7, 11) == 1
        calls = []
        got = chunks.per_sample_chunked(lambda s: calls.append(s) or x[s].sum(1), 7, 3)
        assert [(s.start, s.stop) for s in calls] == [(0, 3), (3, 6), (6, 7)]
        torch.testing.assert_close(got, x.sum(1))
        got = chunks.per_sample_chunked(lambda s: {"a": x[s], "b": x[s, 0]}, 7, 3)
        torch.testing.assert_close(got["a"], x)
        torch.testing.assert_close(got["b"], x[:, 0])
    assert chunks.chunk_size(7, 3) == 7


@settings(max_examples=60)
@given(cfg=conv_cfg)
def test_im2col_matches_torch_unfold(cfg):
    """privgrad's strided-view im2col equals F.unfold (1d via a unit height; 3d by a loop)."""
    import torch.nn.functional as F

    from privgrad.per_sample.rules import conv as rules

    g, m = cfg["groups"], make_conv(cfg, bias=True).double()
    A = torch.randn(cfg["B"], g * cfg["cin_per_group"], *([5] * cfg["dim"]), dtype=torch.double)
    got = rules._unfolded(m, A)
    Ap, pad = rules.padded_input(m, A)
    k, st, dl = m.kernel_size, m.stride, m.dilation
    if cfg["dim"] == 1:
        want = F.unfold(Ap.unsqueeze(2), (1, *k), dilation=(1, *dl), padding=(0, *pad),
                        stride=(1, *st))
    elif cfg["dim"] == 2:
        want = F.unfold(Ap, k, dilation=dl, padding=tuple(pad), stride=st)
    else:  # one 2d unfold per kernel depth offset and output depth position
        Ap = F.pad(Ap, [x for p in reversed(pad) for x in (p, p)])
        out_d = (Ap.shape[2] - dl[0] * (k[0] - 1) - 1) // st[0] + 1
        per = [[F.unfold(Ap[:, :, z * st[0] + i * dl[0]], k[1:], dilation=dl[1:], stride=st[1:])
                .view(A.shape[0], A.shape[1], 1, -1, 1, got.shape[-1] // out_d)
                for z in range(out_d)] for i in range(k[0])]
        want = torch.cat([torch.cat(row, dim=4) for row in per], dim=2)
        want = want.reshape(A.shape[0], A.shape[1] * k[0] * k[1] * k[2], -1)
    assert got.shape[-1] == m(A).shape[2:].numel()
    torch.testing.assert_close(got.reshape(A.shape[0], -1, got.shape[-1]), want, rtol=0, atol=0)


# ---- small per-sample gradients are materialised, large ones book-kept (ghost.split)

from privgrad.per_sample import ghost as _ghost  # noqa: E402


@pytest.mark.parametrize("threshold", [0, 4 * 40, 4 * 200, 1 << 21])
@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_layers_on_both_sides_of_the_materialisation_threshold(threshold, mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.conv = nn.Conv1d(6, 8, 3, padding="same", padding_mode="reflect")
            self.norm = nn.GroupNorm(2, 8)
            self.small = nn.Linear(8, 4)  # 36 parameters
            self.big = nn.Linear(4, 40)  # 200 parameters
            self.frozen_w = nn.Linear(40, 5)
            self.frozen_w.weight.requires_grad_(False)

        def forward(self, idx):
            h = self.norm(self.conv(self.emb(idx).transpose(1, 2))).transpose(1, 2)
            return self.frozen_w(torch.tanh(self.big(torch.tanh(self.small(h)))))

    with mock.patch.object(_ghost, "DENSE_ELEMENTS", threshold):
        check(Net(), torch.randint(0, 11, (4, 7)), mode)


def spy_paths(monkeypatch) -> list[tuple[str, nn.Module, set[str]]]:
    """Records how each recorded call was handled: ``(kind, module, parameter attributes)``.

    ``kind`` is ``"materialised"`` (per-sample gradients, ``layer_io.materialize``) or
    ``"book-kept"`` (norms by ``policy.squared_norms``); both are wrapped, not replaced.
    """
    from privgrad.per_sample import policy
    from privgrad.step import clip_batch

    calls = []
    real_norms, real_materialize = policy.squared_norms, clip_batch.materialize
    current = {}

    def norms(formulas, *a, **k):
        calls.append(("book-kept", current.get("module"), set(formulas)))
        return real_norms(formulas, *a, **k)

    def materialize(ios, *a, **k):
        for io in ios:
            calls.append(("materialised", io.call.unit.module,
                          {n for n, p in io.call.unit.params.items() if p.requires_grad}))
        return real_materialize(ios, *a, **k)

    real_squared = _ghost.squared_norms

    def squared(ios, *a, **k):  # which module each policy call is for
        out = {}
        for io in ios:
            current["module"] = io.call.unit.module
            out |= real_squared([io], *a, **k)
        return out

    monkeypatch.setattr(policy, "squared_norms", norms)
    monkeypatch.setattr(clip_batch, "materialize", materialize)
    monkeypatch.setattr(_ghost, "squared_norms", squared)
    return calls


def test_a_frozen_weight_is_never_materialised_for_its_trainable_bias(monkeypatch):
    calls = spy_paths(monkeypatch)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    model[0].weight.requires_grad_(False)  # bias-only fine-tuning of the big layer
    with pg.DPEngine(model, 0.0, max_grad_norm=1.0, expected_batch_size=64,
                     self_check=False) as engine:
        engine.backward(model(torch.randn(64, 256)).sin().sum(1))
    assert {frozenset(keys) for _, m, keys in calls if m is model[0]} == {frozenset({"bias"})}
    assert any(m is model[2] for _, m, _ in calls)
    assert model[0].bias.grad is not None and model[0].weight.grad is None


# Linear(256, 10): 2570 parameters; per sample T·266 input and output-gradient values, so
# materialised from T = 5 (2570 <= 2·5·266) on.
@pytest.mark.parametrize(("positions", "materialised"),
                         [(None, False), (1, False), (4, False), (5, True), (64, True)])
def test_small_gradients_are_materialised_only_when_not_larger_than_the_io(
        monkeypatch, positions, materialised):
    """A Linear on single vectors is book-kept however small (its ghost norm is free)."""
    calls = spy_paths(monkeypatch)
    model = nn.Linear(256, 10)  # 2570 parameters; B × params = 10,280 (small)
    shape = (4, 256) if positions is None else (4, positions, 256)
    x = torch.randn(shape, dtype=torch.float64)
    model.double()
    with pg.DPEngine(model, 0.0, max_grad_norm=1.0, expected_batch_size=4,
                     self_check=False) as engine:
        trace = engine.backward(sin_loss(model(x)))
    assert [kind for kind, m, _ in calls if m is model] == [
        "materialised" if materialised else "book-kept"]
    want = loop_per_sample_grads(model, lambda out, i: sin_loss(out)[0], x)
    assert_close({n: trace.layer_norms[n] for n in want},
                 {n: g.flatten(1).norm(dim=1) for n, g in want.items()})


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_functional_units_with_unusual_calls_in_book_keeping_modes(monkeypatch, mode):
    """Modules without a rule called with keywords, a list, or a first output without a
    gradient: their recorded arguments are not tensors and are never sized up."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))

        def forward(self, x=None):
            return x * self.w

    class TwoOut(Scale):
        def forward(self, x):
            return x.argmax(1), x * self.w

    class ListIn(Scale):
        def forward(self, xs):
            return xs[0] * self.w

    x = torch.randn(6, 4, dtype=torch.float64)
    for module, call in [(Scale(), lambda m, v: m(x=v)), (TwoOut(), lambda m, v: m(v)[1]),
                         (ListIn(), lambda m, v: m([v]))]:
        with pg.DPEngine(module, 0.0, max_grad_norm=1e9, expected_batch_size=6,
                         mode=mode) as engine:
            trace = engine.backward(call(module, x).sin().sum(1))
        want = torch.stack([torch.autograd.grad(call(module, x[i:i + 1]).sin().sum(),
                                                module.w)[0] for i in range(6)])
        torch.testing.assert_close(trace.layer_norms["w"], want.norm(dim=1))
        torch.testing.assert_close(module.w.grad, want.sum(0) / 6)


@settings(max_examples=30)
@given(cfg=conv_cfg, candidate=st.sampled_from(["ghost", "gram", "materialized"]))
def test_every_conv_formula_against_the_loop(cfg, candidate):
    """Each formula the policy may pick, forced, against per-sample autograd in float64."""
    from privgrad.per_sample.rules import conv as rules

    m = make_conv(cfg, bias=True).double()
    A = torch.randn(cfg["B"], m.in_channels, *([5] * cfg["dim"]), dtype=torch.double)
    G = torch.randn_like(m(A))
    want = {n: [] for n, _ in m.named_parameters()}
    for i in range(cfg["B"]):
        grads = torch.autograd.grad((m(A[i:i + 1]) * G[i:i + 1]).sum(), list(m.parameters()))
        for (n, _), g in zip(m.named_parameters(), grads, strict=True):
            want[n].append(g)
    want = {n: torch.stack(g) for n, g in want.items()}
    assert_close(rules.per_sample_grads(m, A, G), want)
    got = _run_formula(rules.RULES[0], m, A, G, candidate)
    assert_close(got, {n: g.flatten(1).square().sum(1) for n, g in want.items()})


@pytest.mark.parametrize("conv,size", [
    (nn.Conv2d(3, 4, (2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0)), (7, 9)),
    (nn.Conv2d(2, 4, (2, 4), dilation=(1, 2), padding="same", padding_mode="reflect"), (6, 8)),
    (nn.Conv3d(4, 6, (1, 2, 3), stride=(2, 1, 1), dilation=(1, 1, 2), padding=(0, 1, 2),
               groups=2, padding_mode="circular"), (5, 4, 6)),
    (nn.Conv1d(6, 3, 3, stride=2, dilation=2, padding=3, groups=3, padding_mode="replicate"),
     (11,)),
    (nn.Conv2d(4, 5, 1), (3, 4)),  # every kernel size 1: no shifted sums at all
    (nn.Conv2d(3, 2, (1, 3), padding=(0, 1)), (4, 5)),  # kernel size 1 along one dim
    (nn.Conv2d(2, 3, 2, stride=5), (4, 6)),  # stride beyond the input: one output per dim
    (nn.Conv2d(2, 4, 3, padding=1, groups=2), (1, 1)),  # one position: the padding only
])
def test_gram_norms_on_anisotropic_convolutions(conv, size):
    """Different kernel, stride, dilation and padding per dimension: the strided views of
    the channel Gram matrix must step each dimension by its own amounts."""
    from privgrad.per_sample.rules import conv as rules

    m = conv.double()
    for B in (3, 1):  # one sample: B·groups may be 1
        A = torch.randn(B, m.in_channels, *size, dtype=torch.double)
        G = torch.randn_like(m(A))
        want = []
        for i in range(B):
            g, = torch.autograd.grad((m(A[i:i + 1]) * G[i:i + 1]).sum(), m.weight)
            want.append(g.square().sum())
        torch.testing.assert_close(rules._gram_sq_norms(m, A, G), torch.stack(want),
                                   rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape,stride,gram", [
    ((64, 64, 4), 1, True),   # many channels, small image: the channel Gram needs fewer FLOPs
    ((8, 8, 8), 2, False),    # stride 2: four times the padded positions, the unfolded rows win
])
def test_the_cheaper_ghost_formula_is_used(shape, stride, gram):
    from privgrad.per_sample import policy
    from privgrad.per_sample.rules import conv as rules

    cin, cout, hw = shape
    m = nn.Conv2d(cin, cout, 3, padding=1, stride=stride, bias=False).double()
    A = torch.randn(3, cin, hw, hw, dtype=torch.double)
    G = torch.randn_like(m(A))
    formulas = rules.norm_formulas(m, A, G)["weight"]
    ghosts = {n: f for n, f in formulas.items() if f.ghost}
    assert policy.choose(ghosts) == ("gram" if gram else "ghost")
    want = rules.per_sample_grads(m, A, G)["weight"].flatten(1).square().sum(1)
    assert_close(policy.squared_norms({"weight": formulas}, 3, A.device), {"weight": want})


@pytest.mark.parametrize(("T", "d", "p", "pick"), [
    (1, 64, 64, "outer"), (4, 64, 64, "ghost"), (64, 8, 8, "materialized"),
    (4, 16, 16, "ghost"),  # 2·T(d + p) = d·p (float64 ghost norm): a tie goes to the first
    (8, 16, 16, "materialized"),  # listed; twice the float32 flops of the materialised norm
])
def test_the_linear_formula_with_fewer_flops_is_chosen(T, d, p, pick):
    from privgrad.per_sample import policy
    from privgrad.per_sample.rules import linear as rules

    m = nn.Linear(d, p)
    formulas = rules.norm_formulas(m, torch.randn(2, T, d), torch.randn(2, T, p))["weight"]
    assert policy.choose(formulas) == pick


@pytest.mark.parametrize("d,p", [(3, 9), (9, 3)])  # A smaller, then G smaller
def test_clipped_sum_scales_either_operand_exactly(d, p):
    from privgrad.per_sample import chunks
    from privgrad.per_sample.rules import linear as rules

    m = nn.Linear(d, p).double()
    A, G = torch.randn(5, 4, d, dtype=torch.double), torch.randn(5, 4, p, dtype=torch.double)
    f = torch.rand(5, dtype=torch.double)
    A2, G2 = chunks.scale_smaller(A, G, f)
    assert (A2 is A) == (d > p) and (G2 is G) == (d < p)
    psg = rules.per_sample_grads(m, A, G)
    assert_close(rules.clipped_sum(m, A, G, {"weight": f, "bias": f}),
                 {k: torch.tensordot(f, v, dims=1) for k, v in psg.items()})


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("budget,max_chunks", [(1, 100), (7, 100), (1, 3), (10**9, 4)])
def test_clipped_sum_in_chunks_of_samples(T, budget, max_chunks):
    """The scaled copy made a chunk of samples at a time (uneven chunks, the chunk cap,
    one chunk) gives the weighted sum of the per-sample gradients of the loop oracle."""
    from privgrad.per_sample.rules import linear as rules

    torch.manual_seed(T)
    B, d, p = 7, 5, 4
    m = nn.Linear(d, p).double()
    x = torch.randn(B, T, d, dtype=torch.double)
    want = loop_per_sample_grads(m, lambda out, i: sin_loss(out).sum(), x, 0)
    out = m(x)
    G = torch.autograd.grad(sin_loss(out).sum(), out)[0]
    f = torch.rand(B, dtype=torch.double)
    scaled = []
    real = rules.chunks.scale_smaller

    def spy(A, G, factors):
        scaled.append(A.shape[0])
        return real(A, G, factors)

    with mock.patch.object(rules, "SCALED_ELEMENTS", budget), \
            mock.patch.object(rules, "MAX_SCALED_CHUNKS", max_chunks), \
            mock.patch.object(rules.chunks, "scale_smaller", spy):
        got = rules.clipped_sum(m, x, G.detach(), {"weight": f, "bias": f})
    step = max(min(B, max(1, budget // (T * min(d, p)))), -(-B // max_chunks))
    assert scaled == [min(step, B - s) for s in range(0, B, step)]
    assert_close(got, {"weight": torch.tensordot(f, want["weight"], dims=1),
                       "bias": torch.tensordot(f, want["bias"], dims=1)})


def test_bias_gradients_of_single_vectors_are_a_view():
    from privgrad.per_sample.rules import linear as rules

    G = torch.randn(4, 1, 3)
    assert rules._bias_grads(G).data_ptr() == G.data_ptr()
    assert torch.equal(rules._bias_grads(G), G[:, 0])
    G3 = torch.randn(4, 2, 3)
    assert torch.equal(rules._bias_grads(G3), G3.sum(1))


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(6, 5), (3, 4, 6)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1), (3, 2, 5, 5)),
    (lambda: nn.GroupNorm(1, 4), (3, 4, 5)),
])
def test_rules_skip_frozen_parameters(make, shape, frozen):
    """A frozen weight's per-sample gradients (as large as a trainable one's) are never built."""
    from privgrad.per_sample.registry import lookup

    m = make().double()
    getattr(m, frozen).requires_grad_(False)
    A = torch.randn(*shape, dtype=torch.double)
    G = torch.randn_like(m(A))
    rule = lookup(m)
    live = {"weight", "bias"} - {frozen}
    assert set(rule.per_sample_grads(m, A, G)) == live
    if rule.norm_formulas is not None:
        assert set(rule.norm_formulas(m, A, G)) == live
