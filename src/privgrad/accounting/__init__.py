"""Privacy accounting for DP-SGD: events, accountants, calibration and a ledger.

Built on dp_accounting's event algebra and accountants; this subpackage imports
nothing else from privgrad.

Example:
    >>> import privgrad.accounting as acc
    >>> eps = acc.epsilon(1.1, 256 / 60000, epochs=60, delta=1e-5)  # PLD, ≈ 2.38
    >>> sigma = acc.calibrate_noise(3.0, 1e-5, 256 / 60000, epochs=60)
"""

from privgrad.accounting.accountants import (
    DEFAULT_RDP_ORDERS,
    OPACUS_RDP_ORDERS,
    AccountantLike,
    PLDConfig,
    RDPConfig,
    resolve_accountant,
    suggest_pld_interval,
)
from privgrad.accounting.calibrate import calibrate_noise
from privgrad.accounting.compute import epsilon, event_epsilon
from privgrad.accounting.errors import (
    AccountingError,
    CalibrationError,
    LedgerStateError,
    PrivacyParameterError,
)
from privgrad.accounting.events import (
    dp_sgd_step,
    dp_sgd_steps,
    effective_noise_multiplier,
    shared_sample_step,
    simplify_event,
)
from privgrad.accounting.ledger import LedgerEntry, PrivacyLedger
from privgrad.accounting.serialization import event_from_dict, event_to_dict

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "OPACUS_RDP_ORDERS",
    "AccountantLike",
    "AccountingError",
    "CalibrationError",
    "LedgerEntry",
    "LedgerStateError",
    "PLDConfig",
    "PrivacyLedger",
    "PrivacyParameterError",
    "RDPConfig",
    "calibrate_noise",
    "dp_sgd_step",
    "dp_sgd_steps",
    "effective_noise_multiplier",
    "epsilon",
    "event_epsilon",
    "event_from_dict",
    "event_to_dict",
    "resolve_accountant",
    "shared_sample_step",
    "simplify_event",
    "suggest_pld_interval",
]
