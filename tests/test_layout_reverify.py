"""An engine re-checks the batch axis whenever a call's size-B pattern is new (layout key)."""

import pytest
import torch
from torch import nn

import privgrad as pg
from privgrad.errors import UnsupportedModelError


def _engine(model: nn.Module, B: int) -> pg.DPEngine:
    return pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0,
                       expected_batch_size=B, mode="ghost", seed=0, self_check=False)


def test_a_sequence_first_batch_after_a_verified_batch_first_one_is_refused():
    torch.manual_seed(0)
    B, d = 4, 3
    model = nn.Linear(d, 2)
    eng = _engine(model, B)
    # Batch-first (B, T, d) with T != B: verified and remembered.
    x = torch.randn(B, 5, d)
    eng.backward(model(x).pow(2).sum((1, 2)))
    model.weight.grad = model.bias.grad = None
    # Sequence-first (T, B, d) with T == B: dim 0 has B rows but they are time steps. The
    # Linear's input now has size B on two axes, a layout not seen: it is checked again.
    x = torch.randn(B, B, d)
    with pytest.raises(UnsupportedModelError, match=r"module '' \(Linear\).*not the batch"):
        eng.backward(model(x).pow(2).sum((0, 2)))


def test_the_same_layout_with_new_sizes_is_not_refused():
    torch.manual_seed(0)
    B, d = 4, 3
    model = nn.Linear(d, 2)
    eng = _engine(model, B)
    for T in (5, 7, 2):  # T never equals B: one layout, checked once, reused
        x = torch.randn(B, T, d)
        eng.backward(model(x).pow(2).sum((1, 2)))
        expected = sum(  # flat clipping at C = 1 of each sample's gradient, no noise
            _clipped(model, x[i:i + 1]) for i in range(B)) / B
        assert torch.allclose(model.weight.grad, expected, atol=1e-6)
        model.weight.grad = model.bias.grad = None


def _clipped(model: nn.Linear, xi: torch.Tensor) -> torch.Tensor:
    m = nn.Linear(model.in_features, model.out_features).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    m(xi.double()).pow(2).sum().backward()
    norm = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()]).norm()
    return (m.weight.grad * min(1.0, 1.0 / float(norm))).float()
