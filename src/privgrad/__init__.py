"""privgrad: transparent, exact and fast DP-SGD for PyTorch."""

from privgrad import accounting, audit, clipping, data, distributed, federated, validate
from privgrad.engine import DPEngine
from privgrad.errors import (
    GradientStateError,
    InvalidLossError,
    MissingGradientError,
    NonFiniteGradientError,
    PrivgradError,
    UnsupportedModelError,
)
from privgrad.sample_clipping import clipped_batch_gradients
from privgrad.trace import StepTrace

__all__ = [
    "DPEngine",
    "GradientStateError",
    "InvalidLossError",
    "MissingGradientError",
    "NonFiniteGradientError",
    "PrivgradError",
    "StepTrace",
    "UnsupportedModelError",
    "accounting",
    "clipped_batch_gradients",
    "audit",
    "clipping",
    "data",
    "distributed",
    "federated",
    "validate",
]
__version__ = "0.1.0"
