"""The audit: below the claim for the real engine, with power, and above it for broken ones."""

from __future__ import annotations

import json

import pytest
import torch

import privgrad.clipping as clipping
import privgrad.noise as noise
from privgrad.audit import audit
from privgrad.cli import main


def test_correct_engine_stays_below_the_claim_with_power():
    """q = 1, σ = 1, δ = 1e-5, 5,000 trials: lower bound in [claimed / 4, claimed]."""
    r = audit(1.0, 1.0, 5000, 1e-5)
    assert r.epsilon_claimed == pytest.approx(4.377, abs=0.01)  # the Gaussian mechanism's ε
    assert r.epsilon_claimed / 4 <= r.epsilon_lower <= r.epsilon_claimed
    assert r.true_positive_rate > r.false_positive_rate


def test_correct_engine_in_ghost_mode_at_another_scale():
    r = audit(2.0, 0.3, 3000, 1e-5, mode="ghost", seed=1)
    assert 0 < r.epsilon_lower <= r.epsilon_claimed


class _PerTensorPlan(clipping.ClipPlan):
    """declearn's bug: each tensor clipped to C, but the claimed sensitivity is C."""

    @property
    def sensitivity(self) -> float:
        return max(self.max_norms.values())


def _quarter_noise(m: pytest.MonkeyPatch) -> None:
    real = noise._draw  # every draw of the engine goes through it
    m.setattr(noise, "_draw", lambda targets, std, *rest: real(targets, std / 4, *rest))


def _no_clipping(m: pytest.MonkeyPatch) -> None:
    m.setattr(clipping, "clip_factors", lambda norms, c: torch.ones_like(norms))


def _per_tensor(m: pytest.MonkeyPatch) -> None:
    m.setattr(clipping.Flat, "bind", lambda self, names: _PerTensorPlan(
        {n: n for n in names}, {n: self.max_norm for n in names}))


@pytest.mark.parametrize("breakage", [_quarter_noise, _no_clipping, _per_tensor],
                         ids=["quarter-noise", "no-clipping", "per-tensor-clipping"])
def test_broken_mechanisms_are_caught(monkeypatch, breakage):
    breakage(monkeypatch)
    r = audit(2.0, 1.0, 3000, 1e-5, seed=2)
    assert r.epsilon_lower > r.epsilon_claimed


def test_cli_json_and_errors(capsys):
    assert main(["audit", "--noise-multiplier", "1.5", "--trials", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon_claimed"] > 0 and 0 <= out["epsilon_lower"] <= out["epsilon_claimed"]
    assert main(["audit", "--noise-multiplier", "1.5", "--trials", "200"]) == 0
    assert "empirical lower bound" in capsys.readouterr().out
    assert main(["audit", "--noise-multiplier", "0", "--trials", "200"]) == 2
    assert "noise_multiplier must be > 0" in capsys.readouterr().err
    assert main(["audit", "--noise-multiplier", "1", "--trials", "10"]) == 2
    assert "too few" in capsys.readouterr().err
