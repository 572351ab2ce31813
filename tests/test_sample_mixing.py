"""A model or loss that mixes the samples of a batch is refused on the first step with
B >= 2 (issue 18.7).

Per-sample clipping bounds what one sample contributes only if each loss depends on its
own sample alone. Mixing before the first layer (batch standardisation, in-batch mixup)
leaves every per-sample gradient "exact" for the mixed input, so only a derivative with
respect to the model's inputs shows it: ``∂losses[i]/∂x[j] = 0`` for ``i != j``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads


def engine_for(model, **kw):
    kw = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "expected_batch_size": 8} | kw
    return pg.DPEngine(model, **kw)


class Mixing(nn.Module):
    """A parameter-free mixing of the batch before a small MLP."""

    def __init__(self, how, d=5):
        super().__init__()
        self.how = how
        self.body = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        if self.how == "standardise":
            x = (x - x.mean(0)) / x.std(0)
        elif self.how == "mixup":
            x = 0.7 * x + 0.3 * x.roll(1, 0)
        elif self.how == "others":  # sample 0 is left alone, the others are mixed
            x = torch.cat([x[:1], x[1:] + x[1:].mean(0)])
        return self.body(x)


def batch(B=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g), torch.randint(0, 3, (B,), generator=g)


def losses_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def clipped_sum(model, x, y, C):
    """The clipped sum written by an unchecked engine (σ = 0, normaliser 1)."""
    with engine_for(model, max_grad_norm=C, expected_batch_size=1, self_check=False) as e:
        e.backward(losses_of(model, x, y))
    out = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return out


def test_batch_standardisation_breaks_the_sensitivity_and_is_refused():
    torch.manual_seed(0)
    model, (x, y), C = Mixing("standardise"), batch(), 0.1
    x[3] *= 20  # an outlier: removing it moves every other sample's standardised input
    # Why: removing one sample moves the unchecked clipped sum by more than C (1.8·C).
    full = clipped_sum(model, x, y, C)
    worst = max(float((full - clipped_sum(model, torch.cat([x[:j], x[j + 1:]]),
                                          torch.cat([y[:j], y[j + 1:]]), C)).norm())
                for j in range(len(y)))
    assert worst > 1.5 * C
    engine = engine_for(model, max_grad_norm=C)
    with pytest.raises(pg.UnsupportedModelError) as e:
        engine.backward(losses_of(model, x, y))
    msg = str(e.value)
    assert "losses[0] depends on sample" in msg and "model input args[0]" in msg
    assert "(x - x.mean(0)) / x.std(0)" in msg and "Fix:" in msg
    assert engine.steps == 0 and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_in_batch_mixup_inside_the_forward_is_refused(mode):
    model, (x, y) = Mixing("mixup"), batch()
    engine = engine_for(model, mode=mode)
    with pytest.raises(pg.UnsupportedModelError, match="losses\\[0\\] depends on sample 7's"):
        engine.backward(losses_of(model, x, y))


def test_mixing_among_the_other_samples_is_refused():
    model, (x, y) = Mixing("others"), batch()
    engine = engine_for(model)
    with pytest.raises(pg.UnsupportedModelError,
                       match="model input args\\[0\\] reaches another sample's loss"):
        engine.backward(losses_of(model, x, y))


def contrastive(z):
    """In-batch InfoNCE: sample i's positive is its own pair, the negatives the others'."""
    a, b = F.normalize(z[:, :2], dim=1), F.normalize(z[:, 1:], dim=1)
    return F.cross_entropy(a @ b.T / 0.5, torch.arange(len(z)), reduction="none")


def test_in_batch_contrastive_loss_is_refused_on_the_first_step_with_two_samples():
    model = Mixing("none")
    engine = engine_for(model)
    for _ in range(2):  # steps of one sample are taken (nothing to mix) and do not verify
        x, _ = batch(B=1)
        engine.backward(contrastive(model(x)))
        model.zero_grad()
    assert engine.steps == 2
    x, _ = batch(B=4)
    with pytest.raises(pg.UnsupportedModelError, match="mix"):  # which check fires first varies
        engine.backward(contrastive(model(x)))
    assert engine.steps == 2


class TokenMixing(nn.Module):
    """Token ids cannot be marked: the embedding's output is, and the mixing after it shows."""

    def __init__(self, mix):
        super().__init__()
        self.mix = mix
        self.emb, self.head = nn.Embedding(11, 4), nn.Linear(4, 3)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return self.head(h - h.mean(0) if self.mix else h)


@pytest.mark.parametrize("frozen", [True, False])
def test_mixing_after_a_token_embedding_is_refused(frozen):
    ids, y = torch.randint(0, 11, (6, 3)), torch.randint(0, 3, (6,))
    model = TokenMixing(True)
    model.emb.weight.requires_grad_(not frozen)
    # A frozen embedding: only the mark on its output shows the mixing (no per-sample
    # gradient before it); a trained one: sample 0's gradient of emb.weight shows it too.
    match = r"depends on sample \d's output of module 'emb' \(Embedding\)" if frozen else "mix"
    with pytest.raises(pg.UnsupportedModelError, match=match):
        engine_for(model).backward(losses_of(model, ids, y))
    model = TokenMixing(False)
    model.emb.weight.requires_grad_(not frozen)
    engine = engine_for(model, max_grad_norm=math.inf, expected_batch_size=6)
    want = loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i:i + 1]), ids)
    engine.backward(losses_of(model, ids, y))
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n].sum(0) / 6, rtol=1e-5, atol=1e-7)


class TwoInputs(nn.Module):
    """Float inputs positional and by keyword, one of them requiring grad already."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, x, *, extra):
        return torch.tanh(self.a(x) + self.b(extra)).sum(1)


def test_independent_samples_pass_and_the_check_changes_no_value():
    torch.manual_seed(0)
    model = TwoInputs()
    x, extra = torch.randn(5, 3), torch.randn(5, 2, requires_grad=True)
    want = {n: torch.stack([torch.autograd.grad(model(x[i:i + 1], extra=extra[i:i + 1]).sum(),
                                                p)[0] for i in range(5)])
            for n, p in model.named_parameters()}
    grads = []
    for check in (True, False):
        with engine_for(model, max_grad_norm=math.inf, expected_batch_size=5,
                        self_check=check) as engine:
            engine.backward(model(x, extra=extra))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    for n in want:
        assert torch.equal(grads[0][n], grads[1][n]), n  # bit for bit with and without
        torch.testing.assert_close(grads[0][n], want[n].sum(0) / 5, rtol=1e-5, atol=1e-7)


def test_self_check_false_checks_nothing():
    """Documented: without the self-check, sample independence is the user's responsibility."""
    model, (x, y) = Mixing("standardise"), batch()
    engine = engine_for(model, self_check=False)
    engine.backward(losses_of(model, x, y))
    assert engine.steps == 1


class Seen(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.inputs = nn.Linear(3, 2), []

    def forward(self, x):
        self.inputs.append(x)
        return self.lin(x).sum(1)


def test_inputs_are_marked_only_until_a_step_with_two_samples_is_verified():
    model = Seen()
    engine = engine_for(model)
    xs = [torch.randn(1, 3), torch.randn(4, 3), torch.randn(4, 3)]
    for x in xs:
        engine.backward(model(x))
        model.zero_grad()
    got = model.inputs
    assert got[0] is not xs[0] and got[1] is not xs[1]  # marked leaves on the same memory
    assert torch.equal(got[0], xs[0]) and torch.equal(got[1], xs[1])
    assert got[2] is xs[2]  # verified: the user's own tensor again
    engine.close()


def test_a_sequence_first_input_whose_length_equals_the_batch_is_not_taken_for_mixing():
    """The check itself (guards.sample_mixing): dim 1 is tried as the batch when dim 0
    fails, so an independent (T, B, d) input with T == B passes; mixing fails in both."""
    from privgrad.guards import check_no_mixing, sample_mixing
    from privgrad.per_sample.capture import Marked

    torch.manual_seed(0)
    w = torch.randn(3, 2)
    for mix in (False, True):
        x = torch.randn(4, 4, 3, requires_grad=True)  # (T, B, d), T == B
        h = torch.tanh(x @ w)  # (T, B, 2)
        if mix:
            h = h - h.mean(1, keepdim=True)  # over the batch
        losses = h.square().sum((0, 2))  # (B,)
        found = sample_mixing(losses, [Marked("model input args[0]", x)])
        assert {m.dim for m in found} == {0, 1}
        if mix:
            with pytest.raises(pg.UnsupportedModelError, match="Dims 0 and 1"):
                check_no_mixing(found)
        else:
            check_no_mixing(found)


class TinyLM(nn.Module):
    """LoRA-style: frozen token and position embeddings, (1, T) position ids (as in HF)."""

    def __init__(self, V=20, T=8, d=6):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.register_buffer("position_ids", torch.arange(T).unsqueeze(0), persistent=False)
        self.lora = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)
        for p in (*self.wte.parameters(), *self.wpe.parameters()):
            p.requires_grad_(False)

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(self.position_ids[:, :ids.shape[1]])
        return self.head(torch.tanh(self.lora(h)).mean(1))


@pytest.mark.parametrize("B", [8, 5])
def test_a_position_embedding_broadcast_over_the_batch_is_not_mixing(B):
    """(1, T, d) with T == B is one row shared by all samples, not a sequence-first batch."""
    torch.manual_seed(0)
    model = TinyLM().double()
    ids = torch.randint(0, 20, (B, 8), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(2))
    want = loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i:i + 1]), ids)
    with engine_for(model, max_grad_norm=math.inf, expected_batch_size=1) as e:
        e.backward(F.cross_entropy(model(ids), y, reduction="none"))
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n].sum(0), rtol=1e-10, atol=1e-12)


class InPlaceInput(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.lin = how, nn.Linear(5, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(x) if self.how == "relu" else x.div_(255.0)
        return self.lin(x)


@pytest.mark.parametrize("how", ["relu", "div_"])
def test_a_forward_writing_its_input_in_place_is_verified(how):
    torch.manual_seed(0)
    model = InPlaceInput(how).double()
    x, y = batch()
    x = x.double() * 255
    want = loop_per_sample_grads(model, lambda out, i: F.cross_entropy(out, y[i:i + 1]),
                                 x.clone())
    with engine_for(model, max_grad_norm=math.inf, expected_batch_size=1) as e:
        e.backward(losses_of(model, x.clone(), y))  # the verifying step
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n].sum(0), rtol=1e-10, atol=1e-12)


class Standardise(nn.Module):
    def forward(self, x):
        return (x - x.mean(0)) / x.std(0)


def test_mixing_in_a_submodule_called_directly_is_refused():
    """The loop calls model.features, then model.head: no model(x), yet the features'
    input is checked."""
    model = nn.ModuleDict({"features": nn.Sequential(Standardise(), nn.Linear(5, 4)),
                           "head": nn.Linear(4, 3)})
    x, y = batch()
    with engine_for(model) as e, pytest.raises(
            pg.UnsupportedModelError,
            match=r"losses\[0\] depends on sample \d+'s input of module 'features': args\[0\]"):
        e.backward(F.cross_entropy(model["head"](model["features"](x)), y, reduction="none"))
