"""``privgrad audit``: an empirical lower bound on ε for one step of the engine."""

from __future__ import annotations

import argparse
import json

from privgrad.audit import audit
from privgrad.engine import MODES


def add_command(sub: argparse._SubParsersAction) -> None:
    """Adds the ``audit`` subcommand."""
    p = sub.add_parser("audit", help="empirical privacy audit of one DP-SGD step",
                       description="Runs the engine's DP step many times with and without a "
                       "canary and prints the claimed ε and an empirical lower bound on it.")
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="S", help="σ > 0")
    p.add_argument("--max-grad-norm", type=float, default=1.0, metavar="C",
                   help="clipping threshold C (default 1)")
    p.add_argument("--trials", type=int, default=5000, metavar="N",
                   help="mechanism runs, the canary in a random half (default 5000)")
    p.add_argument("--delta", type=float, default=1e-5, metavar="D", help="δ (default 1e-5)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the bound (default 0.95)")
    p.add_argument("--mode", default="auto", choices=MODES, help="the engine's per-sample mode")
    p.add_argument("--seed", type=int, help="seed of the coin flips (the noise stays secure)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prints the claimed ε and the empirical lower bound."""
    result = audit(args.noise_multiplier, args.max_grad_norm, args.trials, args.delta,
                   confidence=args.confidence, mode=args.mode, seed=args.seed)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    verdict = ("consistent with the claim" if result.epsilon_lower <= result.epsilon_claimed
               else "ABOVE the claim: the mechanism leaks more than it reports")
    print(f"claimed ε = {result.epsilon_claimed:.4f} (one step, q = 1, δ = {result.delta:g})\n"
          f"empirical lower bound ε >= {result.epsilon_lower:.4f} at {result.confidence:.0%} "
          f"confidence over {result.trials} trials: {verdict}")
    return 0
