"""``privgrad train``: DP-SGD end to end, with metrics, a checkpoint and an HTML report.

With no arguments it trains a small CNN on scikit-learn's bundled digits at ε = 3,
δ = 1e-5 (σ calibrated from the budget), with Poisson sampling. Everything written to
``--out`` except the final model (``metrics.jsonl``, the report's histograms, accuracies
and losses) is computed from individual training samples and is NOT private.
``--nproc N`` runs N local processes through ``torch.distributed.run`` (gloo).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from privgrad.cli import checkpoint, models
from privgrad.cli.config import CLIPPING, Config, OptionError, check
from privgrad.cli.loop import train
from privgrad.engine import MODES
from privgrad.errors import NonFiniteGradientError


def add_command(sub: argparse._SubParsersAction) -> None:
    """Adds the ``train`` subcommand."""
    d = Config()
    p = sub.add_parser("train", help="DP training end to end, with a report",
                       description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    opt = p.add_argument
    opt("--epsilon", type=float, help=f"privacy budget ε > 0 (default {d.epsilon})")
    opt("--delta", type=float, help=f"δ in (0, 1), below 1/N (default {d.delta})")
    opt("--epochs", type=int, help="passes over the data, round(1/q) steps each (privgrad "
        f"calibrate --epochs counts ceil(E/q) steps in all) (default {d.epochs})")
    opt("--batch-size", type=int, help=f"expected logical batch size q·N (default {d.batch_size})")
    opt("--max-physical-batch-size", type=int,
        help="samples per forward/backward, bounds memory (default: whole logical batch)")
    opt("--max-grad-norm", type=float, help=f"clipping threshold C (default {d.max_grad_norm}; "
        "the initial C for adaptive, the total for per-layer)")
    opt("--lr", type=float, help=f"SGD learning rate (default {d.lr})")
    opt("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    opt("--clipping", choices=CLIPPING, help="clipping rule (default flat)")
    opt("--mode", choices=MODES, help="per-sample computation (default auto; same result)")
    opt("--model", choices=models.MODELS, help="default: cnn for images, else mlp")
    opt("--data", metavar="FILE", help=".npz with X and y, or .csv with a 'label' column "
        "(default: scikit-learn digits)")
    opt("--num-classes", type=int, metavar="K", help="number of classes, labels 0..K-1 "
        "(required with --data: public, never read from the labels; digits: 10)")
    opt("--seed", type=int, help="reproducible run (NOT secure); default: OS entropy")
    opt("--nproc", type=int, help="local processes (torch.distributed, gloo; default 1)")
    opt("--out", metavar="DIR", help="output directory (default privgrad-run)")
    opt("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    opt("--overwrite", action="store_true",
        help="start afresh in an --out DIR that holds an earlier run's record; that record "
        "is moved to DIR/previous-runs/ (nothing is deleted)")
    opt("--checkpoint-every-steps", type=int, metavar="N",
        help="also checkpoint every N steps (default: by time and at every epoch's end)")
    opt("--checkpoint-every-seconds", type=float, default=60.0, metavar="T",
        help="also checkpoint T seconds after the last checkpoint (default 60; inf: never)")
    opt("--stop-after-steps", type=int, metavar="N",
        help="stop as Ctrl-C does (checkpoint, exit 130) once the run has taken N steps")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``privgrad train``; returns the exit status (130 when interrupted)."""
    given = {f.name: getattr(args, f.name) for f in fields(Config)
             if getattr(args, f.name, None) is not None}
    if args.resume is not None:
        if given:
            raise ValueError(
                f"--resume reuses the checkpointed settings; drop {sorted(given)} (changing "
                "them mid-run would break the privacy calibration)."
            )
        out = Path(args.out or args.resume)
        state = checkpoint.load(Path(args.resume) / "checkpoint.pt")
        config = Config(**state["config"])
    else:
        out, state = Path(args.out or "privgrad-run"), None
        config = check(replace(Config(), **given))
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file, not a directory. Fix: --out DIR, a new or "
                          "existing directory for the run's record.")
    schedule = checkpoint.Schedule(args.checkpoint_every_steps, args.checkpoint_every_seconds,
                                   args.stop_after_steps)
    # a fresh run, or a resumed one written elsewhere, must not replace another run's record
    elsewhere = args.resume is None or out.resolve() != Path(args.resume).resolve()
    if elsewhere:
        checkpoint.claim(out, overwrite=args.overwrite)
    if config.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(config.nproc, args)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
        try:
            return _start(config, out, state, schedule)
        finally:
            dist.destroy_process_group()
    return _start(config, out, state, schedule)


def _start(config: Config, out: Path, state: dict[str, Any] | None,
           schedule: checkpoint.Schedule) -> int:
    """Trains; a fresh run first fixes its split seed (``--seed``, or random on rank 0)."""
    if state is None:
        seed = config.seed
        if seed is None:
            box = [int.from_bytes(os.urandom(4), "little")]
            if dist.is_initialized():
                dist.broadcast_object_list(box, src=0)
            seed = box[0]
        config = replace(config, split_seed=seed)
    try:
        return train(config, out, state, schedule)
    except NonFiniteGradientError as e:
        # every input was checked finite when loaded: the model overflowed, not a sample
        raise OptionError(
            "training diverged: a gradient became NaN or infinite although every input was "
            "checked finite when loaded, so the model itself overflowed (its parameters grew "
            f"too large under --lr {config.lr:.6g}, momentum {config.momentum:.6g}, or the "
            "inputs are very large). Fix: a smaller --lr, e.g. --lr "
            f"{min(config.lr / 10, Config().lr):.6g}, and inputs scaled to about [-1, 1] with "
            "public constants."
        ) from e


def _launch(nproc: int, args: argparse.Namespace) -> int:
    """Re-runs this command in ``nproc`` local processes with torch's elastic launcher.

    The launcher is the one behind ``torch.distributed.run`` / ``torchrun --standalone``
    (c10d rendezvous on localhost); each process runs ``privgrad train`` with the same
    options and finds its rank in the environment.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = ["train"]
    for k, v in vars(args).items():
        if k in ("command", "run") or v is None or v is False:
            continue
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                          run_id=uuid.uuid4().hex, max_restarts=0)
    try:
        codes = elastic_launch(config, _worker)(argv)
    except ChildFailedError as e:
        failed = {f.exitcode for f in e.failures.values()}
        return 130 if failed == {130} else 1
    except SignalException:  # Ctrl-C / SIGTERM: the workers checkpointed and stopped
        return 130
    return max(codes.values())


def _worker(argv: list[str]) -> int:
    """One process of ``--nproc N`` (its rank comes from the launcher's environment)."""
    from privgrad.cli import main

    code = main(argv)
    if code == 130:  # stopped by a signal, checkpoint on disk: leave before any teardown
        sys.stdout.flush()  # that could wait on the launcher shutting down around us
        sys.stderr.flush()
        os._exit(130)
    return code
