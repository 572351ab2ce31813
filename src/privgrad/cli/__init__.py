"""The ``privgrad`` command: ``train``, ``epsilon``, ``calibrate`` and ``audit``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from privgrad.cli import accounting, audit
from privgrad.errors import PrivgradError

try:  # `privgrad train` needs the [cli] extra (scikit-learn's digits, matplotlib's report)
    from privgrad.cli import train
except ModuleNotFoundError as missing:
    train = None
    _MISSING = missing.name


def _train_unavailable(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="(needs: pip install 'privgrad[cli]')", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        raise ValueError(f"privgrad train needs {_MISSING!r}, which is not installed. Fix: "
                         "pip install 'privgrad[cli]' (scikit-learn and matplotlib).")

    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``privgrad`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="privgrad", description="Transparent, exact and fast DP-SGD for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    if train is None:
        _train_unavailable(sub)
    else:
        train.add_command(sub)
    accounting.add_commands(sub)
    audit.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for invalid input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, PrivgradError) as e:
        print(f"privgrad {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (permissions, disk full): no traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"privgrad {args.command}: error: {e.strerror or e}{where}. Fix: a path this "
              "user can read and write, on a disk with free space.", file=sys.stderr)
        return 2
