"""``privgrad epsilon`` and ``privgrad calibrate``: the accountant on the command line."""

from __future__ import annotations

import argparse

from privgrad import accounting
from privgrad.accounting.accountants import MAX_PLD_STEPS
from privgrad.accounting.validation import resolve_steps
from privgrad.errors import PrivgradError


class AccountingOptionError(PrivgradError, ValueError):
    """An option of ``privgrad epsilon`` / ``calibrate`` is invalid (named, with the fix)."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                   help="probability q that a sample joins a batch (batch size / dataset size)")
    p.add_argument("--delta", type=float, required=True, metavar="D", help="target δ in (0, 1)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, metavar="N", help="number of logical steps")
    length.add_argument("--epochs", type=float, metavar="E", help="epochs (1/q steps each)")
    p.add_argument("--accountant", choices=("pld", "rdp"), default="pld",
                   help="pld (tight, default) or rdp (looser upper bound)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the ``epsilon`` and ``calibrate`` subcommands."""
    p = sub.add_parser("epsilon", help="print ε spent by DP-SGD with Poisson sampling")
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="S", help="σ > 0")
    _common(p)
    p.set_defaults(run=run_epsilon)
    p = sub.add_parser("calibrate", help="print the σ that spends a target ε")
    p.add_argument("--epsilon", type=float, required=True, metavar="E", help="target ε > 0")
    _common(p)
    p.set_defaults(run=run_calibrate)


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.sample_rate <= 1:
        raise ValueError(f"--sample-rate must be in (0, 1], got {args.sample_rate}. "
                         "Fix: batch size / dataset size, e.g. --sample-rate 0.004.")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {args.delta}. "
                         "Fix: below 1 / dataset size, e.g. --delta 1e-5.")
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}.")
    if args.epochs is not None and not args.epochs >= 0:
        raise ValueError(f"--epochs must be >= 0, got {args.epochs}.")
    steps = resolve_steps(args.steps, args.epochs, args.sample_rate)
    if args.accountant == "pld" and steps > MAX_PLD_STEPS:
        given = (f"--steps {steps}" if args.steps is not None else f"--epochs "
                 f"{args.epochs:.6g} at --sample-rate {args.sample_rate:.6g} ({steps} steps)")
        raise AccountingOptionError(
            f"{given}: the PLD accountant is limited to {MAX_PLD_STEPS:,} steps here, because "
            "dp_accounting composes a small one-step privacy loss distribution with an exact "
            "integer power of the step count (seconds at 1e6 steps, minutes at 1e7, never at "
            "1e12). Fix: --accountant rdp (closed form in the number of steps, any count; an "
            "upper bound, typically 5-15% above PLD on long runs)."
        )


def run_epsilon(args: argparse.Namespace) -> int:
    """Prints ε."""
    _check(args)
    if not args.noise_multiplier > 0:
        raise ValueError(f"--noise-multiplier must be > 0, got {args.noise_multiplier}: "
                         "without noise there is no privacy (ε = ∞).")
    eps = accounting.epsilon(args.noise_multiplier, args.sample_rate, args.steps,
                             delta=args.delta, accountant=args.accountant, epochs=args.epochs)
    print(f"{eps:.6g}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """Prints σ."""
    _check(args)
    if not args.epsilon > 0:
        raise ValueError(f"--epsilon must be > 0, got {args.epsilon}.")
    sigma = accounting.calibrate_noise(args.epsilon, args.delta, args.sample_rate, args.steps,
                                       accountant=args.accountant, epochs=args.epochs)
    print(f"{sigma:.6g}")
    return 0
