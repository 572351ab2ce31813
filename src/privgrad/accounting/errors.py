"""Exception types raised by ``privgrad.accounting``.

The accounting subpackage imports nothing else from privgrad, so it defines its own
errors. Each subclasses :class:`ValueError`, so ``except ValueError`` keeps working.
Every message says what was detected, why it is a problem and how to fix it.
"""

from __future__ import annotations


class AccountingError(ValueError):
    """Base class of every error ``privgrad.accounting`` raises on purpose."""


class PrivacyParameterError(AccountingError):
    """A privacy parameter (σ, q, δ, steps, ε target, ...) is invalid."""


class CalibrationError(AccountingError):
    """``calibrate_noise`` cannot reach the requested ε inside its search bounds."""


class LedgerStateError(AccountingError):
    """A ledger state dict is malformed or describes an event that cannot be restored."""
