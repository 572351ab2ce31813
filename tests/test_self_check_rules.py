"""The first step's self-check catches a layer rule that is wrong, before anything is released.

Mutant rules for ``nn.Linear`` are put in the rule table (the safety net is only tested by a
fault): a clipped sum that ignores the factors, takes their square roots or gives them to the wrong
samples, and norm formulas that are too small or take every sample's norm from sample 0.
Each mutant really breaks the guarantee (with ``self_check=False`` one sample moves the
clipped sum by more than ``C``), and each is refused on the first step with the default
``self_check=True``: ``p.grad`` untouched, nothing recorded in the ledger.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
import torch
from torch import nn

import privgrad as pg
from privgrad.errors import PrivgradError
from privgrad.per_sample import registry

C = 1.0
B = 8
HUGE = 3  # neither of the two samples whose norms are checked on their own


def _factors_ignored(m, A, G, f):
    return LINEAR.clipped_sum(m, A, G, {a: torch.ones_like(v) for a, v in f.items()})


def _factors_rooted(m, A, G, f):
    return LINEAR.clipped_sum(m, A, G, {a: v.sqrt() for a, v in f.items()})


def _factors_reversed(m, A, G, f):
    return LINEAR.clipped_sum(m, A, G, {a: v.flip(0) for a, v in f.items()})


def _rescaled(formulas, run):
    return {a: {k: dataclasses.replace(fm, run=run(fm.run)) for k, fm in fs.items()}
            for a, fs in formulas.items()}


def _norms_quartered(m, A, G):
    return _rescaled(LINEAR.norm_formulas(m, A, G), lambda r: lambda s: r(s) / 4)


def _norms_of_sample_0(m, A, G):
    def first(run):
        return lambda s: run(slice(0, 1)).expand(len(range(*s.indices(A.shape[0]))))
    return _rescaled(LINEAR.norm_formulas(m, A, G), first)


LINEAR = registry.RULES[nn.Linear]
MUTANTS = {
    "clipped sum ignores factors": dataclasses.replace(LINEAR, clipped_sum=_factors_ignored),
    "clipped sum roots factors": dataclasses.replace(LINEAR, clipped_sum=_factors_rooted),
    "clipped sum reverses factors": dataclasses.replace(LINEAR, clipped_sum=_factors_reversed),
    "norms 4x too small": dataclasses.replace(LINEAR, norm_formulas=_norms_quartered),
    "every norm is sample 0's": dataclasses.replace(LINEAR, norm_formulas=_norms_of_sample_0),
}


@pytest.fixture(params=list(MUTANTS))
def mutant(request, monkeypatch):
    monkeypatch.setattr(registry, "RULES", MappingProxyType({**registry.RULES,
                                                             nn.Linear: MUTANTS[request.param]}))
    return request.param


def _batch():
    """Sample ``HUGE`` is clipped hard; the others are ordinary, some under ``C``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 64, generator=g) * torch.linspace(0.05, 1.0, B).unsqueeze(1)
    x[HUGE] *= 100.0
    return x, torch.randint(0, 4, (B,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))  # book-kept: T = 1


def _clipped_sum(model, x, y, mode, self_check):
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=1.0,
                         mode=mode, self_check=self_check, seed=0)
    try:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        trace = engine.backward(losses)
        return torch.cat([v.double().flatten() for v in trace.clipped_sum.values()])
    finally:
        engine.close()


def _largest_removal_change(mode, self_check):
    x, y = _batch()
    full = _clipped_sum(_model(), x, y, mode, self_check)
    keep = torch.arange(B) != HUGE
    # one engine per batch: the self-check runs on the first step of each
    return float((full - _clipped_sum(_model(), x[keep], y[keep], mode, self_check)).norm())


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_each_mutant_breaks_the_bound_without_the_check(mutant, mode):
    assert _largest_removal_change(mode, self_check=False) > 1.05 * C


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_the_first_step_refuses_each_mutant_and_releases_nothing(mutant, mode):
    model = _model()
    x, y = _batch()
    engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=B,
                         mode=mode, seed=0)
    try:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(PrivgradError, match="rule|weights the samples"):
            engine.backward(losses)
        assert all(p.grad is None for p in model.parameters())
        assert engine.steps == 0 and len(engine.ledger) == 0
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_the_true_rules_pass_the_check_and_meet_the_bound(mode):
    assert _largest_removal_change(mode, self_check=True) <= C * (1 + 1e-5)
