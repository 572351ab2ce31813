"""Noise calibration: the smallest σ whose ε meets a target.

ε is a decreasing function of σ for fixed q, steps and δ, so calibration is a
one-dimensional root-find of ``ε(σ) = target`` over log σ, as in dp_accounting's
``mechanism_calibration`` (the parameter → event → accountant map), but with a
stopping rule on ε rather than on σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from privgrad.accounting.accountants import AccountantLike, resolve_accountant
from privgrad.accounting.compute import epsilon
from privgrad.accounting.errors import CalibrationError, PrivacyParameterError
from privgrad.accounting.validation import (
    check_delta,
    check_sample_rate,
    check_target_epsilon,
    resolve_steps,
)

__all__ = ["MAX_NOISE_MULTIPLIER", "MIN_NOISE_MULTIPLIER", "calibrate_noise"]

#: Smallest σ calibration searches; below it DP-SGD gives no meaningful protection.
MIN_NOISE_MULTIPLIER = 1e-2
#: Largest σ calibration searches.
MAX_NOISE_MULTIPLIER = 1e5
#: Hard guarantee on the result: target·(1 - 0.005) <= ε(σ) <= target.
_HARD_RTOL = 5e-3


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int | None = None,
    *,
    accountant: AccountantLike = "pld",
    epochs: float | None = None,
    rtol: float = 1e-3,
) -> float:
    """Finds the noise multiplier σ whose ε is at most, and close to, a target.

    Formal guarantees:
        The returned σ satisfies ``ε(σ) <= target_epsilon`` as computed by the same
        accountant (so training with it is (target_epsilon, δ)-DP), and
        ``ε(σ) >= (1 - rtol) · target_epsilon`` (never looser than 0.5%), so little
        utility is wasted on excess noise.

    Args:
        target_epsilon: The ε to reach, > 0.
        delta: Target δ in (0, 1).
        sample_rate: q in (0, 1], probability that a record is in a batch.
        steps: Number of steps, >= 1. Exactly one of ``steps`` and ``epochs``.
        accountant: ``"pld"`` (default), ``"rdp"``, or a config object. Calibrate with
            the accountant you will report ε with.
        epochs: Number of epochs; means ``ceil(epochs / sample_rate)`` steps.
        rtol: Relative tolerance on ε, in (0, 0.005].

    Returns:
        σ as a float.

    Raises:
        PrivacyParameterError: If an argument is invalid.
        CalibrationError: If no σ in [1e-2, 1e5] reaches the target.

    Example:
        >>> sigma = calibrate_noise(3.0, 1e-5, 256 / 60000, epochs=60)
        >>> round(sigma, 2)
        0.97
    """
    target = check_target_epsilon(target_epsilon)
    d = check_delta(delta)
    q = check_sample_rate(sample_rate)
    n = resolve_steps(steps, epochs, q)
    config = resolve_accountant(accountant)
    if not (isinstance(rtol, (int, float)) and 0.0 < rtol <= _HARD_RTOL):
        raise PrivacyParameterError(
            f"rtol={rtol!r} must be in (0, {_HARD_RTOL}]: it is the relative distance "
            "below the target ε that the calibrated ε may have. Fix: omit it (1e-3)."
        )
    if n == 0:
        raise PrivacyParameterError(
            "steps=0: with no steps nothing is released and every σ (even 0) gives "
            "ε = 0, so there is nothing to calibrate. Fix: pass the number of training "
            "steps you will run (or epochs=...)."
        )

    def eps_of(sigma: float) -> float:
        return epsilon(sigma, q, n, delta=d, accountant=config)

    low, eps_low, high, eps_high = _bracket(eps_of, target, n, q, d, config.name)
    return _solve(eps_of, target, low, eps_low, high, eps_high, rtol)


def _bracket(
    eps_of: Callable[[float], float],
    target: float,
    steps: int,
    q: float,
    delta: float,
    name: str,
) -> tuple[float, float, float, float]:
    """Finds low < high with ε(low) > target >= ε(high), expanding from σ = 1 by ×4."""
    sigma = 1.0
    eps = eps_of(sigma)
    if eps > target:
        low, eps_low = sigma, eps
        while True:
            high = min(low * 4.0, MAX_NOISE_MULTIPLIER)
            eps_high = eps_of(high)
            if eps_high <= target:
                return low, eps_low, high, eps_high
            if high >= MAX_NOISE_MULTIPLIER:
                raise CalibrationError(
                    f"target_epsilon={target} cannot be reached: even "
                    f"noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives ε={eps_high:.4g} "
                    f"({name} accountant, {steps} steps, sample_rate={q}, delta={delta}). "
                    "Such a small ε needs more noise than any useful training tolerates. "
                    "Fix: raise target_epsilon, train for fewer steps, or lower "
                    "sample_rate."
                )
            low, eps_low = high, eps_high
    high, eps_high = sigma, eps
    while True:
        low = max(high / 4.0, MIN_NOISE_MULTIPLIER)
        eps_low = eps_of(low)
        if eps_low > target:
            return low, eps_low, high, eps_high
        if low <= MIN_NOISE_MULTIPLIER:
            raise CalibrationError(
                f"target_epsilon={target} is looser than the ε={eps_low:.4g} that even "
                f"noise_multiplier={MIN_NOISE_MULTIPLIER:g} gives ({name} accountant, "
                f"{steps} steps, sample_rate={q}, delta={delta}); calibration does not "
                "search smaller noise because such an ε protects nothing in practice. "
                "Fix: lower target_epsilon, or pass the noise multiplier you want "
                "directly."
            )
        high, eps_high = low, eps_low


def _solve(
    eps_of: Callable[[float], float],
    target: float,
    low: float,
    eps_low: float,
    high: float,
    eps_high: float,
    rtol: float,
) -> float:
    """Illinois regula falsi on log ε - log target over log σ, keeping a bracket.

    Invariant: ε(low) > target >= ε(high). log ε is close to linear in log σ, so the
    secant step converges in a few evaluations; the Illinois weight prevents one
    endpoint from sticking, and a bisection step is taken whenever ε(high) = 0.
    """
    u_low, u_high = math.log(low), math.log(high)
    f_low = math.log(eps_low / target)  # > 0
    f_high = math.log(eps_high / target) if eps_high > 0 else -math.inf  # <= 0
    last_side = 0
    for _ in range(200):
        if eps_high >= (1.0 - rtol) * target:
            return math.exp(u_high)
        if u_high - u_low <= 1e-12:
            break
        if math.isfinite(f_high):
            u = u_high - f_high * (u_high - u_low) / (f_high - f_low)
            margin = 1e-3 * (u_high - u_low)
            if not u_low + margin < u < u_high - margin:
                u = 0.5 * (u_low + u_high)
        else:
            u = 0.5 * (u_low + u_high)
        sigma = math.exp(u)
        eps = eps_of(sigma)
        if eps > target:
            u_low, f_low = u, math.log(eps / target)
            if last_side == -1 and math.isfinite(f_high):
                f_high /= 2.0
            last_side = -1
        else:
            if eps >= (1.0 - rtol) * target:
                return sigma
            u_high, eps_high = u, eps
            f_high = math.log(eps / target) if eps > 0 else -math.inf
            if last_side == 1:
                f_low /= 2.0
            last_side = 1
    high = math.exp(u_high)
    if eps_high >= (1.0 - _HARD_RTOL) * target:
        return high
    raise CalibrationError(
        f"Calibration could not get ε within {_HARD_RTOL:.1%} below the target "
        f"{target}: ε jumps from above the target to {eps_high:.6g} at "
        f"noise_multiplier≈{high:.6g}. This comes from the accountant's numerical "
        "discretisation. Fix: use accountant=PLDConfig(value_discretization_interval="
        "1e-5), or accountant='rdp'."
    )
