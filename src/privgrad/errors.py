"""Exception types raised by privgrad.

Every error names what was detected (module path, parameter name or sample index),
why it breaks privacy or correctness, and the fix, as code where possible.
"""

from __future__ import annotations


class PrivgradError(Exception):
    """Base class of every error privgrad raises on purpose."""


class InvalidLossError(PrivgradError, ValueError):
    """The losses given to ``DPEngine.backward`` are not one value per sample."""


class UnsupportedModelError(PrivgradError, ValueError):
    """The model contains a layer that mixes samples or cannot be handled exactly."""


class NonFiniteGradientError(PrivgradError, FloatingPointError):
    """A sample's gradient contains NaN or Inf; it would poison the clipped sum."""


class GradientStateError(PrivgradError, RuntimeError):
    """``p.grad`` is in a state that ``DPEngine.backward`` must not overwrite."""


class MissingGradientError(PrivgradError, RuntimeError):
    """A trainable parameter received no per-sample gradient, or only part of it."""


class TraceReleasedError(PrivgradError, RuntimeError):
    """A trace was asked for what its released or since-changed recorded inputs gave.

    Released: a physical batch accumulated without ``retain``. Changed: a recorded tensor
    modified in place, or a parameter frozen or unfrozen, after the step.
    """


class CheckpointError(PrivgradError, RuntimeError):
    """A checkpoint is missing, truncated or corrupted; the privacy ledger is never reset."""
