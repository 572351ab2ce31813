"""The sensitivity property: one sample moves the clipped sum by at most the rule's S.

Beside the value oracles (tests/test_layers.py), these tests check what the accountant
assumes: for every clipping rule, mode, dtype and physical split, removing one sample
moves ``trace.clipped_sum`` by at most ``engine.max_grad_norm`` (the plan's
sensitivity ``S``), adding an adversarial sample moves it by at most ``S``, and
replacing one by at most ``2S`` — with adversarial samples: aligned (identical) huge
gradients, norms just above the threshold (``C·1.005``, ``C·(1 + 1e-6)``), exactly at it,
and zero. A rule that clipped only above ``1.01·C`` fails: the sample at ``1.005·C``
would then contribute ``1.005·C``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg

C = 1.0
MODES = ("auto", "ghost", "materialize", "vmap")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
B = 12
REMOVED = (0, 6, 11)  # aligned huge, 1.005·C, ordinary


def conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(12, 4),
                         nn.Tanh(), nn.Linear(4, 3))


def embedding_model() -> nn.Module:
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 3))


FAMILIES = {
    "conv-norm-linear": (conv_model, lambda g: torch.randn(B, 2, 6, generator=g)),
    "embedding-layernorm-linear": (embedding_model, lambda g: torch.randint(0, 7, (B, 3),
                                                                            generator=g)),
}

RULES = {
    "flat": lambda: pg.clipping.Flat(C),
    "per-layer": lambda: pg.clipping.PerLayer(C / 2),
    "automatic": lambda: pg.clipping.Automatic(C, stability=1e-3),
    "adaptive": lambda: pg.clipping.Adaptive(initial_max_norm=C),
}


def clipped_sum(model, rule, mode, x, y, w, split):
    """``trace.clipped_sum`` (float64) and the engine's sensitivity for samples ``x, y, w``."""
    engine = pg.DPEngine(model, noise_multiplier=0.0, clipping=rule, expected_batch_size=1.0,
                         mode=mode, seed=0)
    try:
        for s in range(0, len(x), split or max(len(x), 1)):
            part = slice(s, s + split) if split else slice(None)
            xs, ys, ws = x[part], y[part], w[part]
            out = model(xs).float()
            engine.accumulate(ws * F.cross_entropy(out, ys, reduction="none"), retain=True)
        sensitivity = engine.max_grad_norm
        trace = engine.step()
        return {n: t.double() for n, t in trace.clipped_sum.items()}, sensitivity
    finally:
        engine.close()
        model.zero_grad()


def distance(a, b):
    return math.sqrt(sum(float((a[n] - b[n]).square().sum()) for n in a))


@pytest.fixture(scope="module", params=list(FAMILIES))
def batch(request):
    """The family's model (float64 weights) and an adversarial batch.

    Samples 0-5 are identical with loss weight 1e3 (aligned, huge gradients), 6 and 7 are
    scaled to gradient norm ``1.005·C`` and ``C·(1 + 1e-6)``, 8 to exactly ``C``, 9 has
    weight 0 (zero gradient), 10 and 11 are ordinary.
    """
    make, data = FAMILIES[request.param]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = make().double()
    x, y = data(g), torch.randint(0, 3, (B,), generator=g)
    x[:6], y[:6] = x[0], y[0]
    if x.is_floating_point():
        x = x.double()
    w = torch.ones(B, dtype=torch.float64)
    with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=math.inf,
                     expected_batch_size=1.0) as engine:
        norms = engine.backward(F.cross_entropy(model(x), y, reduction="none")).norms
        model.zero_grad()
    w[:6] = 1e3
    for i, target in ((6, 1.005 * C), (7, C * (1 + 1e-6)), (8, C)):
        w[i] = target / float(norms[i])
    w[9] = 0.0
    return request.param, model, x, y, w


def cast(model, x, w, dtype):
    """A copy of the float64 model and batch in ``dtype`` (token ids stay integers)."""
    return (copy.deepcopy(model).to(dtype), x.to(dtype) if x.is_floating_point() else x,
            w.to(dtype))


def covering_cases() -> list[tuple[str, str, torch.dtype, int | None]]:
    """16 (rule, mode, dtype, split) cases in which every PAIR of values occurs.

    An orthogonal array over GF(4): rule ``a``, mode ``b``, dtype ``a + b``, split from
    ``a + 2b`` (GF(4) addition is XOR). Every rule meets every mode, dtype and split,
    every mode every dtype and split, every dtype both splits: the full product (128
    cases per model) adds nothing the pairs miss unless a bug needs three settings at
    once, at 8× the time.
    """
    times2 = (0, 2, 3, 1)  # multiplication by x in GF(4) = {0, 1, x, x + 1}
    rules, cases = list(RULES), []
    for a in range(4):
        for b in range(4):
            cases.append((rules[a], MODES[b], DTYPES[a ^ b], (None, 5)[(a ^ times2[b]) % 2]))
    return cases


CASES = covering_cases()


@pytest.mark.parametrize(("rule", "mode", "dtype", "split"), CASES,
                         ids=[f"{r}-{m}-{str(d)[6:]}-{s or 'one'}" for r, m, d, s in CASES])
def test_one_sample_moves_the_clipped_sum_by_at_most_the_sensitivity(
        batch, rule, mode, dtype, split):
    family, model64, x, y, w = batch
    model, x, w = cast(model64, x, w, dtype)
    full, S = clipped_sum(model, RULES[rule](), mode, x, y, w, split)
    tol = TOL[dtype]
    for j in REMOVED:
        keep = torch.arange(B) != j
        less, _ = clipped_sum(model, RULES[rule](), mode, x[keep], y[keep], w[keep], split)
        d = distance(full, less)
        assert d <= S * (1 + tol), (family, rule, mode, dtype, split, "remove", j, d / S)
    # Add (and replace sample 0 by) the exact opposite of the aligned huge samples.
    x_add, y_add, w_add = torch.cat([x, x[:1]]), torch.cat([y, y[:1]]), torch.cat([w, -w[:1]])
    more, _ = clipped_sum(model, RULES[rule](), mode, x_add, y_add, w_add, split)
    assert distance(full, more) <= S * (1 + tol), (family, rule, mode, dtype, "add")
    w_rep = w.clone()
    w_rep[0] = -w[0]
    replaced, _ = clipped_sum(model, RULES[rule](), mode, x, y, w_rep, split)
    d = distance(full, replaced)
    assert d <= 2 * S * (1 + tol), (family, rule, mode, dtype, "replace", d / S)
    if rule in ("flat", "adaptive", "per-layer"):  # the bound is attained: the test has power
        assert d >= 2 * S * (1 - 10 * tol), (family, rule, mode, dtype, "replace", d / S)


@pytest.mark.parametrize("mode", MODES)
def test_clip_boundary(batch, mode):
    """``‖g‖ = C·(1 + 1e-6)`` gets a factor < 1 and a clipped norm ≤ C; ``‖g‖ = C`` gets 1."""
    family, model, x, y, w = batch
    with pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=1.0,
                     mode=mode) as engine:
        trace = engine.backward(w * F.cross_entropy(model(x), y, reduction="none"))
        model.zero_grad()
    f = trace.clip_factors
    assert float(f[7]) < 1.0 and float(f[6]) < 1.0, family
    assert float(f[9]) == 1.0 and float(f[10]) <= 1.0
    clipped = trace.per_sample_grads(clipped=True)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in clipped.values()))
    assert float(norms.max()) <= C * (1 + 1e-12), (family, mode, norms.tolist())
    torch.testing.assert_close(norms[6], torch.tensor(C, dtype=torch.float64), rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(norms[:6], torch.full((6,), C, dtype=torch.float64), rtol=1e-12,
                               atol=0)
