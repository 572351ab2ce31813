"""Input checks for the privacy parameters, with errors that name the fix.

Every check returns the validated value converted to a plain Python type (``float`` or
``int``), so numpy scalars and 0-d tensors' ``.item()`` values are accepted.
"""

from __future__ import annotations

import math
import numbers

from privgrad.accounting.errors import PrivacyParameterError

__all__ = [
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "check_target_epsilon",
    "resolve_steps",
]


def _as_real(name: str, value: object) -> float:
    """Converts ``value`` to a finite-or-infinite float, rejecting bools and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacyParameterError(
            f"{name}={value!r} is a {type(value).__name__}, not a real number. "
            f"Privacy accounting needs a plain number here. "
            f"Fix: pass a float, e.g. {name}=float(...)."
        )
    result = float(value)
    if math.isnan(result):
        raise PrivacyParameterError(
            f"{name} is NaN. A NaN privacy parameter makes every guarantee meaningless. "
            f"Fix: check how {name} was computed (a 0/0 or an uninitialised value)."
        )
    return result


def check_noise_multiplier(noise_multiplier: object) -> float:
    """Validates a noise multiplier σ (noise std divided by the sensitivity).

    σ = 0 is accepted and means "no noise": accountants then report ε = inf.

    Args:
        noise_multiplier: The candidate σ.

    Returns:
        σ as a float.

    Raises:
        PrivacyParameterError: If σ is negative, infinite, NaN or not a number.
    """
    sigma = _as_real("noise_multiplier", noise_multiplier)
    if sigma < 0 or math.isinf(sigma):
        raise PrivacyParameterError(
            f"noise_multiplier={sigma!r} is not a finite non-negative number. "
            "σ is the Gaussian noise standard deviation in units of the clipping norm; "
            "a negative or infinite value describes no real mechanism. "
            "Fix: pass noise_multiplier > 0 (typical DP-SGD values are 0.5 to 5), "
            "or use privgrad.accounting.calibrate_noise(...) to pick one for a target ε."
        )
    return sigma


def check_sample_rate(sample_rate: object) -> float:
    """Validates a Poisson sampling rate q (probability that a record is in a batch).

    Args:
        sample_rate: The candidate q.

    Returns:
        q as a float in (0, 1].

    Raises:
        PrivacyParameterError: If q is outside (0, 1] or not a number.
    """
    q = _as_real("sample_rate", sample_rate)
    if not 0.0 < q <= 1.0:
        raise PrivacyParameterError(
            f"sample_rate={q!r} is outside (0, 1]. sample_rate is the probability that "
            "each record is included in a logical batch (Poisson sampling), so it must "
            "be a probability, and 0 would mean no record is ever used. "
            "Fix: pass sample_rate = expected_batch_size / dataset_size, "
            "e.g. sample_rate=256 / 60000."
        )
    return q


def check_delta(delta: object) -> float:
    """Validates a target δ.

    Args:
        delta: The candidate δ.

    Returns:
        δ as a float in (0, 1).

    Raises:
        PrivacyParameterError: If δ is outside (0, 1) or not a number.
    """
    d = _as_real("delta", delta)
    if not 0.0 < d < 1.0:
        raise PrivacyParameterError(
            f"delta={d!r} is outside (0, 1). δ is the probability with which the "
            "(ε, δ) guarantee may fail; δ = 0 gives ε = inf for the Gaussian mechanism "
            "and δ >= 1 guarantees nothing. "
            "Fix: use a δ well below 1 / dataset_size, e.g. delta=1e-5 for 60,000 records."
        )
    return d


def check_steps(steps: object, *, name: str = "steps") -> int:
    """Validates a number of steps (compositions).

    Args:
        steps: The candidate count. Integral floats such as ``100.0`` are accepted.
        name: The argument name to use in error messages.

    Returns:
        The count as an int >= 0.

    Raises:
        PrivacyParameterError: If the count is negative, fractional or not a number.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real):
        raise PrivacyParameterError(
            f"{name}={steps!r} is a {type(steps).__name__}, not an integer. "
            f"{name} counts how many times the mechanism ran. "
            f"Fix: pass an int, e.g. {name}=1000."
        )
    value = float(steps)
    if not math.isfinite(value) or value != math.floor(value):
        raise PrivacyParameterError(
            f"{name}={steps!r} is not a whole number. A mechanism runs a whole number "
            f"of times. Fix: pass an int, e.g. {name}=math.ceil({steps!r})."
        )
    if value < 0:
        raise PrivacyParameterError(
            f"{name}={steps!r} is negative. A mechanism cannot run a negative number of "
            f"times. Fix: pass {name} >= 0."
        )
    return int(value)


def check_target_epsilon(target_epsilon: object) -> float:
    """Validates a target ε for calibration.

    Args:
        target_epsilon: The candidate ε.

    Returns:
        ε as a finite positive float.

    Raises:
        PrivacyParameterError: If ε is not a finite positive number.
    """
    eps = _as_real("target_epsilon", target_epsilon)
    if not 0.0 < eps < math.inf:
        raise PrivacyParameterError(
            f"target_epsilon={eps!r} is not a finite positive number. ε = 0 cannot be "
            "reached by any finite noise with at least one step, and ε = inf needs no "
            "noise at all. Fix: pass target_epsilon > 0, e.g. target_epsilon=3.0."
        )
    return eps


def resolve_steps(steps: object, epochs: object, sample_rate: float) -> int:
    """Turns exactly one of ``steps`` / ``epochs`` into a number of steps.

    ``epochs`` becomes ``ceil(epochs / sample_rate)`` steps: one epoch is, in
    expectation, ``1 / sample_rate`` Poisson-sampled batches. A quotient within
    1e-9 (relative) of an integer is rounded to it, so that floating-point noise such
    as ``3 / 0.03 = 100.00000000000001`` does not add a step.

    Args:
        steps: Number of steps, or None.
        epochs: Number of epochs (may be fractional), or None.
        sample_rate: A validated sampling rate q in (0, 1].

    Returns:
        The number of steps, an int >= 0.

    Raises:
        PrivacyParameterError: If both or neither are given, or either is invalid.
    """
    if (steps is None) == (epochs is None):
        given = "both" if steps is not None else "neither"
        raise PrivacyParameterError(
            f"{given} of steps and epochs were given; exactly one is needed to know how "
            "many times the mechanism runs. "
            "Fix: pass steps=<number of optimizer steps> or "
            "epochs=<passes over the data> (epochs=E means ceil(E / sample_rate) steps)."
        )
    if steps is not None:
        return check_steps(steps)
    n_epochs = _as_real("epochs", epochs)
    if n_epochs < 0 or math.isinf(n_epochs):
        raise PrivacyParameterError(
            f"epochs={n_epochs!r} is not a finite non-negative number. "
            "Fix: pass epochs >= 0, e.g. epochs=10."
        )
    ratio = n_epochs / sample_rate
    nearest = round(ratio)
    if abs(ratio - nearest) <= 1e-9 * max(1.0, ratio):
        return int(nearest)
    return int(math.ceil(ratio))
