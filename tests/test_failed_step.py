"""A logical step with a failed physical batch is never released (issue 18, item 4).

Before, the batches accumulated before a ``NonFiniteGradientError`` stayed pending and
were merged into the next step: two Poisson samples released as one ledger step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from privgrad.errors import GradientStateError, NonFiniteGradientError


def batch(seed, n=3, nan=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                              generator=g)
    if nan:
        x[1, 0] = float("nan")
    return x, y


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3,
                         sample_rate=0.1)
    return model, engine


def accumulate(model, engine, xy):
    x, y = xy
    return engine.accumulate(F.cross_entropy(model(x), y, reduction="none"), retain=True)


def test_a_failed_batch_discards_its_step_and_nothing_leaks_into_the_next():
    model, engine = make()
    accumulate(model, engine, batch(1))
    with pytest.raises(NonFiniteGradientError, match=r"sample 1.*2 physical batch\(es\).*"
                                                     r"discarded.*engine.discard\(\)"):
        accumulate(model, engine, batch(2, nan=True))
    with pytest.raises(GradientStateError, match=r"already failed.*engine.discard\(\)"):
        accumulate(model, engine, batch(3))  # the rest of the broken logical batch
    engine.discard()
    assert engine.steps == 0 and engine.ledger.steps == 0
    assert all(p.grad is None for p in model.parameters())
    accumulate(model, engine, batch(4))
    trace = engine.step()
    assert trace.batch_size == 3 and engine.steps == engine.ledger.steps == 1
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The oracle: a fresh engine that only ever saw batch 4.
    model2, engine2 = make()
    accumulate(model2, engine2, batch(4))
    engine2.step()
    for n, p in model2.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=0)


def test_step_after_a_failed_batch_raises_and_records_nothing():
    model, engine = make()
    accumulate(model, engine, batch(1))
    with pytest.raises(NonFiniteGradientError):
        accumulate(model, engine, batch(2, nan=True))
    with pytest.raises(GradientStateError, match="not taken.*ledger is unchanged"):
        engine.step()
    assert engine.steps == 0 and engine.ledger.steps == 0
    assert all(p.grad is None for p in model.parameters())
    accumulate(model, engine, batch(5))  # the failed step is over: a new one starts
    assert engine.step().batch_size == 3


def test_backward_that_fails_ends_its_own_step():
    model, engine = make()
    x, y = batch(2, nan=True)
    with pytest.raises(NonFiniteGradientError, match="discarded"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    x, y = batch(6)
    trace = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert trace.batch_size == 3 and engine.ledger.steps == 1
