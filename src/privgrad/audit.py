"""Empirical privacy audit of the DP step exactly as ``DPEngine`` runs it (white box).

Each trial runs one real ``DPEngine.backward`` (q = 1: one Gaussian mechanism) on a fixed
background batch, with a canary sample added in a random half of the trials. The canary's
gradient has norm ``>= C`` in every parameter tensor of the audit model, pointing along a
fixed direction ``u``; the distinguisher is the projection ``<p.grad, u>`` of the
released private gradient, which guesses "canary in" above a threshold. For
(ε, δ)-DP every threshold must satisfy ``TPR <= e^ε FPR + δ`` and
``1 - FPR <= e^ε (1 - TPR) + δ``; with Clopper–Pearson bounds on TPR and FPR this gives
a lower bound on ε that holds with the stated confidence (maximised over a grid of
thresholds fixed before the trials, Bonferroni-corrected, so the maximum is valid too).

A correct engine's lower bound stays below the claimed ε; a broken mechanism (noise on the
wrong scale, clipping skipped, or clipping each tensor separately while claiming a bound
on the whole gradient, as declearn did) drives it above. The audit is statistical: it can
show a mechanism is broken, never prove it correct.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from scipy import stats
from torch import nn

from privgrad import accounting
from privgrad.accounting.validation import check_delta
from privgrad.engine import DPEngine
from privgrad.noise import seeded_generator

GRID = tuple(0.25 * k for k in range(-8, 25))  # thresholds, in noise std above the offset
CALIBRATION = 200  # extra runs without the canary that fix the grid's centre


@dataclass(frozen=True)
class AuditResult:
    """What an audit found.

    Attributes:
        epsilon_claimed: ε the engine's accountant reports for the audited step at δ.
        epsilon_lower: Empirical lower bound on ε (holds with ``confidence``); 0 if none.
        delta: δ.
        confidence: Confidence of the bound (e.g. 0.95).
        trials: Number of trials (about half with the canary).
        true_positive_rate: TPR at the threshold that gave the bound (``None``: no bound).
        false_positive_rate: FPR there.
        threshold: That threshold, in claimed noise standard deviations above the
            no-canary median.
    """

    epsilon_claimed: float
    epsilon_lower: float
    delta: float
    confidence: float
    trials: int
    true_positive_rate: float | None
    false_positive_rate: float | None
    threshold: float | None

    def as_dict(self) -> dict[str, float | None]:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


class _AuditModel(nn.Module):
    """``tensors`` linear maps ``R^dim → R``; sample ``x`` of shape ``(tensors, dim)``.

    The loss is the sum of the outputs, so a sample's gradient in tensor ``p`` is ``x[p]``:
    the auditor chooses every per-sample gradient exactly.
    """

    def __init__(self, tensors: int, dim: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(dim, 1, bias=False) for _ in range(tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(lin(x[:, p]) for p, lin in enumerate(self.parts)).squeeze(1)


def audit(
    noise_multiplier: float,
    max_grad_norm: float,
    trials: int,
    delta: float = 1e-5,
    *,
    confidence: float = 0.95,
    batch_size: int = 8,
    tensors: int = 16,
    dim: int = 4,
    canary_norm: float | None = None,
    mode: str = "auto",
    seed: int | None = None,
) -> AuditResult:
    """Audits one DP-SGD step of ``DPEngine`` with flat clipping (q = 1).

    Args:
        noise_multiplier: σ > 0 of the audited engine.
        max_grad_norm: C of the audited engine.
        trials: Number of mechanism runs (>= 100); the canary is in a random half.
        delta: δ of the claimed and audited ε.
        confidence: Confidence of the lower bound.
        batch_size: Background samples per trial (fixed across trials).
        tensors: Parameter tensors of the audit model; the canary has norm ``>= C`` in
            each, so clipping per tensor instead of per sample is detected.
        dim: Size of each tensor.
        canary_norm: Norm of the canary's whole gradient; default ``2·C·sqrt(tensors)``.
        mode: The engine's per-sample mode.
        seed: Seed of the trial coin flips and the background (the engine's noise is
            always drawn from OS entropy, as in training).

    Returns:
        The claimed ε, the empirical lower bound and the rates behind it.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"privgrad.audit: noise_multiplier must be > 0, got {noise_multiplier} "
                         "(without noise ε is infinite and there is nothing to audit).")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"privgrad.audit: max_grad_norm must be finite and > 0, got "
                         f"{max_grad_norm}.")
    if trials < 100:
        raise ValueError(f"privgrad.audit: trials={trials} is too few for a bound; use >= 100 "
                         "(5,000 gives about a quarter of the claimed ε at σ = 1).")
    if not 0 < confidence < 1:
        raise ValueError(f"privgrad.audit: confidence must be in (0, 1), got {confidence}.")
    delta = check_delta(delta)  # before the trials, not after them
    gen = seeded_generator(seed)
    model = _AuditModel(tensors, dim).double()
    canary_norm = 2 * max_grad_norm * math.sqrt(tensors) if canary_norm is None else canary_norm
    u = torch.randn(tensors, dim, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True) / math.sqrt(tensors)  # unit overall, equal per tensor
    canary = (u * canary_norm).unsqueeze(0)
    background = torch.randn(batch_size, tensors, dim, generator=gen, dtype=torch.float64)
    background *= max_grad_norm / background.flatten(1).norm(dim=1)[:, None, None] * 2
    engine = DPEngine(model, noise_multiplier, max_grad_norm=max_grad_norm,
                      expected_batch_size=batch_size + 1, sample_rate=1.0, mode=mode)

    def score(with_canary: bool) -> float:
        x = torch.cat([background, canary]) if with_canary else background
        model.zero_grad(set_to_none=True)
        engine.backward(model(x))
        grad = torch.stack([lin.weight.grad.reshape(-1) for lin in model.parts])
        return float((grad * u.reshape(tensors, dim)).sum())

    # the no-canary centre, from separate calibration runs (so the grid is fixed up front)
    offset = float(torch.tensor([score(False) for _ in range(CALIBRATION)]).median())
    included = torch.rand(trials, generator=gen) < 0.5
    scores = torch.tensor([score(bool(c)) for c in included], dtype=torch.float64)
    engine.close()
    claimed = accounting.epsilon(noise_multiplier, 1.0, 1, delta=delta)
    scale = noise_multiplier * max_grad_norm / (batch_size + 1)  # claimed noise std of a score
    return _bound(scores, included, offset, scale, claimed, delta, confidence)


def _bound(scores: torch.Tensor, included: torch.Tensor, offset: float, scale: float,
           claimed: float, delta: float, confidence: float) -> AuditResult:
    """The best ε lower bound over the threshold grid, Bonferroni-corrected."""
    pos, neg = scores[included], scores[~included]
    alpha = (1 - confidence) / (2 * 2 * len(GRID))  # 2 directions, 2 intervals per threshold
    best: tuple[float, float | None, float | None, float | None] = (0.0, None, None, None)
    for k in GRID:
        thr = offset + k * scale
        tp, fp = int((pos > thr).sum()), int((neg > thr).sum())
        tpr_lo, fpr_hi = _cp_lower(tp, len(pos), alpha), _cp_upper(fp, len(neg), alpha)
        tnr_lo, fnr_hi = _cp_lower(len(neg) - fp, len(neg), alpha), _cp_upper(
            len(pos) - tp, len(pos), alpha)
        for num, den in ((tpr_lo, fpr_hi), (tnr_lo, fnr_hi)):
            if num > delta and den > 0:
                eps = math.log((num - delta) / den)
                if eps > best[0]:
                    best = (eps, tp / len(pos), fp / len(neg), k)
    return AuditResult(claimed, best[0], delta, confidence, len(scores), best[1], best[2],
                       best[3])


def _cp_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper–Pearson lower bound on a rate from ``k`` of ``n``."""
    return 0.0 if k == 0 or n == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))


def _cp_upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper–Pearson upper bound on a rate from ``k`` of ``n``."""
    return 1.0 if k >= n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
