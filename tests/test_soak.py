"""Soak: 2,000 steps with varying batch sizes keep memory flat (no leaked hooks, traces, graphs)."""

from __future__ import annotations

import gc
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_two_thousand_steps_keep_memory_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Tanh(), nn.Linear(64, 10))
    engine = pg.DPEngine(model, 1.0, max_grad_norm=1.0, expected_batch_size=16.0,
                         sample_rate=0.01, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sizes = torch.distributions.Binomial(1600, 0.01).sample((2000,)).long().tolist()
    x_all, y_all = torch.randn(64, 32), torch.randint(0, 10, (64,))
    hooks = _hooks(model)
    traces = []
    rss = {}
    for step, B in enumerate(sizes):
        x, y = x_all[:B], y_all[:B]
        opt.zero_grad(set_to_none=True)
        if step % 3 == 0:  # physical batches of one logical step, some retained
            for part in (slice(0, B // 2), slice(B // 2, B)):
                if part.stop > part.start:
                    engine.accumulate(F.cross_entropy(model(x[part]), y[part], reduction="none"),
                                      keep=("pre_clip",) if step % 7 == 0 else (),
                                      retain=step % 2 == 0)
            trace = engine.step()
        else:
            trace = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
        if B and step % 22 == 0:  # a retained step: materialise one sample lazily
            trace.per_sample_grads(clipped=True, samples=[0])
        opt.step()
        if step % 100 == 0:
            traces.append(weakref.ref(trace))
        if step in (300, 1999):
            gc.collect()
            rss[step] = _rss_mb()
    del trace
    gc.collect()
    assert _hooks(model) == hooks  # no hook added per step
    assert sum(r() is not None for r in traces) == 0  # every trace (and its graph) was freed
    assert engine.steps == 2000 and engine.ledger.steps == 2000  # no step lost from the ledger
    assert rss[1999] - rss[300] < 8.0, rss  # MB
