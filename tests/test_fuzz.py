"""Robustness: hypothesis-driven fuzzing of DPEngine's inputs.

Every drawn case either works — and then p.grad equals the float64 batch-size-1 oracle,
clipped — or raises a privgrad error (``PrivgradError``) that names the cause. A raw
internal traceback (any other exception from ``engine.backward``) or a silently wrong
gradient fails the test. Errors raised by the user's own forward pass (e.g. an integer
tensor fed to ``nn.Linear``) happen before privgrad is involved and are not counted.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2}


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def build(family: str) -> tuple[nn.Module, tuple[int, ...], bool]:
    """(model, one input's shape, integer input?)."""
    if family == "mlp":
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)), (5,), False
    if family == "seq-linear":
        return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), (6, 3), False
    if family == "conv":
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                             nn.Flatten(), nn.Linear(4 * 25, 2)), (2, 5, 5), False
    if family == "embedding":
        return nn.Sequential(nn.Embedding(11, 4, padding_idx=0), nn.Flatten(),
                             nn.Linear(12, 2)), (3,), True
    return Recurrent(), (4, 3), False


cases = st.fixed_dictionaries({
    "family": st.sampled_from(["mlp", "seq-linear", "conv", "embedding", "recurrent"]),
    "dtype": st.sampled_from(list(DTYPES)),
    "B": st.integers(0, 5),
    "mode": st.sampled_from(["auto", "ghost", "materialize", "vmap"]),
    "C": st.sampled_from([0.05, 1.0, math.inf]),
    "poison": st.sampled_from([None, "nan", "inf"]),
    "freeze": st.booleans(),
    "reduction": st.sampled_from(["none", "none", "none", "mean"]),
    "int_input": st.booleans(),
})


def _input(shape: tuple[int, ...], B: int, integer: bool, dtype: torch.dtype,
           gen: torch.Generator) -> torch.Tensor:
    if integer:
        return torch.randint(0, 11, (B, *shape), generator=gen)
    return torch.randn(B, *shape, generator=gen).to(dtype)


@settings(max_examples=150, deadline=None)
@given(case=cases, seed=st.integers(0, 2**16))
def test_every_input_works_or_raises_a_named_privgrad_error(case, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case["dtype"]]
    model, shape, integer = build(case["family"])
    model = model.to(dtype)
    x = _input(shape, case["B"], integer or case["int_input"], dtype, gen)
    if case["poison"] and case["B"] > 0 and x.is_floating_point():
        x.view(case["B"], -1)[case["B"] - 1, 0] = float(case["poison"])
    y = torch.randint(0, 2, (case["B"],), generator=gen)
    engine = pg.DPEngine(model, 0.0, max_grad_norm=case["C"], expected_batch_size=4.0,
                         mode=case["mode"])
    for step in range(2):
        if case["freeze"] and step == 1:  # a parameter frozen between steps
            next(model.parameters()).requires_grad_(False)
        model.zero_grad(set_to_none=True)
        try:
            logits = _logits(model(x))
            if logits.dtype == torch.bfloat16:
                logits = logits.float()  # the loss in float32, as under autocast
            losses = F.cross_entropy(logits, y, reduction=case["reduction"])
        except (RuntimeError, TypeError, ValueError):
            return  # the user's own forward rejects this input; privgrad never ran
        try:
            trace = engine.backward(losses)
        except pg.PrivgradError as e:
            assert "Fix" in str(e) or "fix" in str(e), str(e)
            _expected_error(case, e)
            return
        assert case["reduction"] == "none" or case["B"] == 1, "a mean loss was accepted"
        assert not (case["poison"] and case["B"] > 0 and not integer and not case["int_input"]
                    and _oracle_nonfinite(model, x, y)), "a NaN/Inf sample was accepted"
        _check_against_oracle(model, x, y, case["C"], trace, dtype)


def _logits(out: torch.Tensor) -> torch.Tensor:
    return out.mean(1) if out.dim() == 3 else out  # sequence outputs: mean over positions


def _loss(y: torch.Tensor):
    return lambda o, i: F.cross_entropy(_logits(o), y[i:i + 1])


def _expected_error(case: dict, e: Exception) -> None:
    """The error must be one of the causes the case contains."""
    causes = []
    if case["reduction"] == "mean":
        causes.append(pg.InvalidLossError)
    if case["poison"]:
        causes.append(pg.NonFiniteGradientError)
    # freezing a parameter between steps, bfloat16 and recurrent models are all valid
    # input: none of them is a cause of an error
    assert causes and isinstance(e, tuple(causes)), (case, repr(e))


def _oracle_nonfinite(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    ref = copy.deepcopy(model).double()
    xr = x.double() if x.is_floating_point() else x
    grads = loop_per_sample_grads(ref, _loss(y), xr)
    return any(not bool(torch.isfinite(g).all()) for g in grads.values())


def _check_against_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, C: float,
                          trace: pg.StepTrace, dtype: torch.dtype) -> None:
    ref = copy.deepcopy(model).double()
    xr = x.double() if x.is_floating_point() else x
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if x.shape[0] == 0:
        want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in ref.named_parameters()
                if n in trainable}
        norms = torch.zeros(0, dtype=torch.float64)
    else:
        per = loop_per_sample_grads(ref, _loss(y), xr)
        norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per.values()))
        if dtype != torch.float64 and not math.isinf(C) and bool(
                ((norms - C).abs() < 0.1 * C).any()):
            return  # a norm at the threshold: rounding may legitimately flip its factor
        f = torch.ones_like(norms) if math.isinf(C) else torch.clamp(C / norms, max=1.0)
        want = {n: (f.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) / 4.0 for n, g in per.items()}
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
            continue
        tol = TOL[dtype] * max(1.0, float(want[n].abs().max()))
        torch.testing.assert_close(p.grad.double(), want[n], rtol=TOL[dtype], atol=tol, msg=n)
    assert trace.batch_size == x.shape[0]
