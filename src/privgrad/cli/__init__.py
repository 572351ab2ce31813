"""The ``privgrad`` command: ``train``, ``epsilon``, ``calibrate`` and ``audit``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from privgrad.cli import accounting, audit, train
from privgrad.errors import PrivgradError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``privgrad`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="privgrad", description="Transparent, exact and fast DP-SGD for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)
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
