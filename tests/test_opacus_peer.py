"""Opacus 1.6 as a peer: with σ = 0 privgrad's private gradient equals Opacus's p.grad."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg

opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.ln = nn.LayerNorm(16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        h = self.gn(torch.relu(self.conv(x))).flatten(1)
        return self.out(self.ln(torch.tanh(self.fc(h))))


def opacus_grads(model, x, y, C, ebs):
    gsm = GradSampleModule(model, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=C, expected_batch_size=ebs, loss_reduction="mean")
    F.cross_entropy(gsm(x), y).backward()  # the usual Opacus set-up
    opt.pre_step()
    grads = {n.removeprefix("_module."): p.grad.clone() for n, p in gsm.named_parameters()}
    gsm._close()
    return grads


@pytest.mark.parametrize("C", [0.05, 0.5, 100.0])
def test_matches_opacus_private_gradient(C):
    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(9, 1, 6, 6, dtype=torch.double), torch.randint(0, 5, (9,))
    ebs = 12
    theirs = opacus_grads(model, x, y, C, ebs)
    model.zero_grad()
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=ebs)
    trace = engine.backward(F.cross_entropy(model(x), y, reduction="none"), keep=("pre_clip",))
    # Opacus's factor is min(1, C / (norm + 1e-6)): recompute ours with it, then compare exactly
    f_opacus = torch.clamp(C / (trace.norms + 1e-6), max=1.0)
    pre = trace.per_sample_grads()
    for n, p in model.named_parameters():
        want = torch.tensordot(f_opacus, pre[n], dims=1) / ebs
        torch.testing.assert_close(theirs[n], want, rtol=1e-10, atol=1e-13)
        # and our own p.grad differs from Opacus's only by the 1e-6 in the factor
        torch.testing.assert_close(p.grad, theirs[n], rtol=1e-5, atol=1e-9)
