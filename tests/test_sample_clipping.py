"""pg.clipped_batch_gradients: the float64 oracle's mean of clipped per-sample gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import loop_per_sample_grads

MODES = ("auto", "ghost", "materialize", "vmap")


class GRUHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


FAMILIES = {
    "linear-seq": (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(),
                                         nn.Flatten(), nn.Linear(15, 3)),
                   lambda g: torch.randn(7, 3, 4, generator=g)),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding="same", dilation=2, groups=2),
                                   nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                                   nn.Linear(4 * 16, 3)),
             lambda g: torch.randn(7, 2, 4, 4, generator=g)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(9, 4, padding_idx=0), nn.Flatten(),
                                        nn.Linear(12, 3)),
                  lambda g: torch.randint(0, 9, (7, 3), generator=g)),
    "gru (functional path)": (GRUHead, lambda g: torch.randn(7, 4, 3, generator=g)),
    "conv1d-instancenorm": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2),
                                                  nn.InstanceNorm1d(3, affine=True),
                                                  nn.Flatten(), nn.Linear(9, 3)),
                            lambda g: torch.randn(7, 2, 7, generator=g)),
    "conv3d-rmsnorm": (lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.RMSNorm(16),
                                             nn.Linear(16, 3)),
                       lambda g: torch.randn(7, 1, 3, 3, 3, generator=g)),
}


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_equals_the_oracle_in_every_mode(family):
    make, data = FAMILIES[family]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make().double()
    x = data(g)
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (7,), generator=g)
    per = loop_per_sample_grads(model, lambda o, i: loss_fn(o, y[i:i + 1])[0], x)
    norms = torch.sqrt(sum(p.flatten(1).square().sum(1) for p in per.values()))
    C = float(norms.median())  # some samples clipped, some not
    f = torch.clamp(C / norms, max=1.0)
    want = {n: (f.view(-1, *[1] * (p.dim() - 1)) * p).mean(0) for n, p in per.items()}
    mean = {n: p.mean(0) for n, p in per.items()}
    for mode in MODES:
        got = pg.clipped_batch_gradients(model, loss_fn, x, y, C, mode=mode)
        assert set(got) == set(want)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=(mode, n))
        plain = pg.clipped_batch_gradients(model, loss_fn, x, y, None, mode=mode)
        for n in mean:
            torch.testing.assert_close(plain[n], mean[n], rtol=1e-9, atol=1e-12, msg=(mode, n))
    assert all(p.grad is None for p in model.parameters())  # no side effect
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_bad_input_is_named():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(pg.InvalidLossError):
        pg.clipped_batch_gradients(model, nn.CrossEntropyLoss(), x, y, 1.0)
    with pytest.raises(ValueError, match="empty batch"):
        pg.clipped_batch_gradients(model, loss_fn, x[:0], y[:0], 1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        pg.clipped_batch_gradients(model, loss_fn, x, y, -1.0)
    x[2, 0] = float("nan")
    with pytest.raises(pg.NonFiniteGradientError, match="sample 2"):
        pg.clipped_batch_gradients(model, loss_fn, x, y, 1.0)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # removed after errors
