"""Privacy events of DP-SGD, built from dp_accounting's event algebra.

A privacy *event* describes one release precisely enough to account for it; it says
nothing about how privacy is measured (that is the accountant's job). privgrad uses
dp_accounting's immutable :class:`~dp_accounting.DpEvent` classes directly:

- one DP-SGD step is ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``: each record is
  in the batch independently with probability q, and the clipped sum gets Gaussian
  noise of standard deviation σ·C;
- ``n`` such steps are ``SelfComposedDpEvent(step, n)``;
- a changing schedule is a ``ComposedDpEvent`` of such runs.

Formal guarantees:
    Several Gaussian releases computed from the *same* Poisson sample (for example the
    noisy clipped gradient sum and a noisy count of the batch, both with L2 sensitivity
    1 after scaling) are exactly one Gaussian release of the concatenated vector, with
    effective noise multiplier ``(Σ σᵢ⁻²)^(-1/2)`` (Mironov, Talwar and Zhang, 2019,
    section 3). Use :func:`shared_sample_step` for them. Composing separately
    Poisson-sampled events instead would assume independent samples and *understate*
    the privacy loss.

Edge cases:

=====================  ==================================================
input                  result
=====================  ==================================================
σ = 0                  a valid event; every accountant reports ε = inf
steps = 0              ``NoOpDpEvent`` (ε = 0)
q = 1                  still Poisson-sampled with probability 1 (full batch)
=====================  ==================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting

from privgrad.accounting.errors import PrivacyParameterError
from privgrad.accounting.validation import (
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)

__all__ = [
    "dp_sgd_step",
    "dp_sgd_steps",
    "effective_noise_multiplier",
    "gaussian_only_noise_multiplier",
    "shared_sample_step",
    "simplify_event",
]


def dp_sgd_step(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    """Builds the event of one DP-SGD step.

    Args:
        noise_multiplier: σ, the noise standard deviation divided by the clipping norm.
        sample_rate: q, the Poisson sampling probability of each record.

    Returns:
        ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``.

    Raises:
        PrivacyParameterError: If σ or q is invalid.
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def dp_sgd_steps(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """Builds the event of ``steps`` identical DP-SGD steps.

    Args:
        noise_multiplier: σ of every step.
        sample_rate: q of every step.
        steps: Number of steps, >= 0.

    Returns:
        ``SelfComposedDpEvent(dp_sgd_step(σ, q), steps)``, or ``NoOpDpEvent()`` when
        ``steps == 0``.

    Raises:
        PrivacyParameterError: If σ, q or steps is invalid.
    """
    step = dp_sgd_step(noise_multiplier, sample_rate)
    n = check_steps(steps)
    if n == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(step, n)


def effective_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """Noise multiplier of one Gaussian release equivalent to several on the same data.

    Releasing ``f_i(D) + N(0, σᵢ²)`` for sensitivity-1 queries ``f_i`` is, after
    rescaling each coordinate by ``1/σᵢ``, one Gaussian release with sensitivity
    ``sqrt(Σ σᵢ⁻²)`` and unit noise, i.e. noise multiplier ``(Σ σᵢ⁻²)^(-1/2)``.

    Args:
        noise_multipliers: σ of each release, all >= 0; at least one.

    Returns:
        The effective σ (0.0 if any release is noiseless).

    Raises:
        PrivacyParameterError: If the sequence is empty or a σ is invalid.
    """
    sigmas = [check_noise_multiplier(s) for s in noise_multipliers]
    if not sigmas:
        raise PrivacyParameterError(
            "noise_multipliers is empty: there is no release to account for. "
            "Fix: pass at least one noise multiplier, e.g. [1.1]."
        )
    if any(s == 0.0 for s in sigmas):
        return 0.0
    return math.fsum(s**-2 for s in sigmas) ** -0.5


def shared_sample_step(
    sample_rate: float, noise_multipliers: Sequence[float]
) -> dp_accounting.DpEvent:
    """Builds the event of one step releasing several Gaussian queries on one sample.

    Use it when a step releases, besides the noisy clipped gradient sum, other
    sensitivity-1 Gaussian queries computed on the *same* Poisson-sampled batch,
    for example a noisy batch size: ``shared_sample_step(q, [σ_grad, σ_count])``.
    Each query's sensitivity must be normalised to 1 (noise std = σᵢ·sensitivityᵢ).

    Args:
        sample_rate: q, the Poisson sampling probability shared by all queries.
        noise_multipliers: σ of each query.

    Returns:
        ``PoissonSampledDpEvent(q, GaussianDpEvent(σ_eff))`` with
        ``σ_eff = effective_noise_multiplier(noise_multipliers)``.

    Raises:
        PrivacyParameterError: If q or any σ is invalid.
    """
    q = check_sample_rate(sample_rate)
    sigma = effective_noise_multiplier(noise_multipliers)
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def gaussian_only_noise_multiplier(event: dp_accounting.DpEvent) -> float | None:
    """Effective σ of an event made only of Gaussian releases on the same data.

    Args:
        event: A ``GaussianDpEvent`` or a nesting of ``ComposedDpEvent`` /
            ``SelfComposedDpEvent`` that bottoms out in ``GaussianDpEvent``.

    Returns:
        The effective noise multiplier, or None if ``event`` contains anything else.
    """
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return float(event.noise_multiplier)
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        inner = gaussian_only_noise_multiplier(event.event)
        if inner is None or event.count <= 0:
            return None
        return inner / math.sqrt(event.count)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        inners = [gaussian_only_noise_multiplier(e) for e in event.events]
        if not inners or any(s is None for s in inners):
            return None
        return effective_noise_multiplier([s for s in inners if s is not None])
    return None


def simplify_event(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """Rewrites an event into an equivalent one every accountant can compose.

    ``PoissonSampledDpEvent(q, <Gaussians on the same sample>)`` becomes
    ``PoissonSampledDpEvent(q, GaussianDpEvent(σ_eff))`` (see
    :func:`effective_noise_multiplier`); dp_accounting's RDP accountant does this
    internally, its PLD accountant does not, so privgrad does it for both.
    ``ComposedDpEvent`` and ``SelfComposedDpEvent`` are rewritten recursively;
    anything else is returned unchanged.

    Args:
        event: Any ``DpEvent``.

    Returns:
        An equivalent ``DpEvent``.
    """
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        if isinstance(event.event, dp_accounting.GaussianDpEvent):
            return event
        sigma = gaussian_only_noise_multiplier(event.event)
        if sigma is None:
            return event
        return dp_accounting.PoissonSampledDpEvent(
            event.sampling_probability, dp_accounting.GaussianDpEvent(sigma)
        )
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return dp_accounting.SelfComposedDpEvent(simplify_event(event.event), event.count)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return dp_accounting.ComposedDpEvent([simplify_event(e) for e in event.events])
    return event
