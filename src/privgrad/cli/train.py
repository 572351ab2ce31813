"""``privgrad train``: DP-SGD end to end, with metrics, a checkpoint and an HTML report.

With no arguments it trains a small CNN on scikit-learn's bundled digits at ε = 3,
δ = 1e-5 (σ calibrated from the budget), with Poisson sampling. Everything written to
``--out`` except the final model (``metrics.jsonl``, the report's histograms, accuracies
and losses) is computed from individual training samples and is NOT private.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from privgrad import accounting, clipping
from privgrad.cli import checkpoint, datasets, models
from privgrad.cli.progress import Progress
from privgrad.cli.report import write_report
from privgrad.data import LogicalBatch, PoissonLoader
from privgrad.engine import MODES, DPEngine
from privgrad.trace import StepTrace

CLIPPING = ("flat", "per-layer", "automatic", "adaptive")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HISTOGRAM_AT = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # fractions of the run


@dataclass(frozen=True)
class Config:
    """The settings of a run (stored in its checkpoint; ``--resume`` reuses them)."""

    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 40
    batch_size: int = 512
    max_physical_batch_size: int | None = None
    max_grad_norm: float = 1.0
    lr: float = 0.06
    momentum: float = 0.9
    clipping: str = "flat"
    mode: str = "auto"
    model: str | None = None
    data: str | None = None
    seed: int | None = None
    split_seed: int = 0


def add_command(sub: argparse._SubParsersAction) -> None:
    """Adds the ``train`` subcommand."""
    d = Config()
    p = sub.add_parser("train", help="DP training end to end, with a report",
                       description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    opt = p.add_argument
    opt("--epsilon", type=float, help=f"privacy budget ε > 0 (default {d.epsilon})")
    opt("--delta", type=float, help=f"δ in (0, 1), below 1/N (default {d.delta})")
    opt("--epochs", type=int, help=f"passes over the data, 1/q steps each (default {d.epochs})")
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
    opt("--seed", type=int, help="reproducible run (NOT secure); default: OS entropy")
    opt("--out", metavar="DIR", help="output directory (default privgrad-run)")
    opt("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``privgrad train``; returns the exit status (130 when interrupted)."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None)
             is not None}
    if args.resume is not None:
        if given:
            raise ValueError(
                f"--resume reuses the checkpointed settings; drop {sorted(given)} (changing "
                "them mid-run would break the privacy calibration)."
            )
        out = Path(args.out or args.resume)
        state = checkpoint.load(Path(args.resume) / "checkpoint.pt")
        return _train(Config(**state["config"]), out, state)
    seed = given.get("seed")
    split_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    config = _checked(replace(Config(), **given, split_seed=split_seed))
    out = Path(args.out or "privgrad-run")
    return _train(config, out, None)


def _checked(c: Config) -> Config:
    rules = [
        (c.epsilon > 0 and math.isfinite(c.epsilon), f"--epsilon must be > 0, got {c.epsilon}"),
        (0 < c.delta < 1, f"--delta must be in (0, 1), got {c.delta}"),
        (c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}"),
        (c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}"),
        (c.max_physical_batch_size is None or c.max_physical_batch_size >= 1,
         f"--max-physical-batch-size must be >= 1, got {c.max_physical_batch_size}"),
        (c.max_grad_norm > 0 and math.isfinite(c.max_grad_norm),
         f"--max-grad-norm must be a finite C > 0, got {c.max_grad_norm}"),
        (c.lr > 0, f"--lr must be > 0, got {c.lr}"),
        (0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message + ".")
    return c


def _rule(c: Config, params: list[str], sigma_eff: float) -> tuple[clipping.ClipRule, float]:
    """The clipping rule and the gradient's noise multiplier for an effective σ."""
    C = c.max_grad_norm
    if c.clipping == "per-layer":
        return clipping.PerLayer(C / math.sqrt(len(params))), sigma_eff
    if c.clipping == "automatic":
        return clipping.Automatic(max_norm=C, stability=0.01), sigma_eff
    if c.clipping == "adaptive":
        rule = clipping.Adaptive(initial_max_norm=C)
        sigma_b = rule.count_noise_multiplier
        if sigma_eff >= sigma_b:
            raise ValueError(
                f"the budget needs an effective noise multiplier {sigma_eff:.3g}, not below the "
                f"adaptive count's {sigma_b}. Fix: a larger --epsilon or fewer --epochs, or "
                "--clipping flat."
            )
        return rule, (sigma_eff**-2 - sigma_b**-2) ** -0.5
    return clipping.Flat(C), sigma_eff


def _train(c: Config, out: Path, state: dict[str, Any] | None) -> int:
    torch.manual_seed(c.split_seed)
    data = datasets.load(c.data, c.split_seed)
    n = len(data.y_train)
    model = models.build(c.model, tuple(data.x_train.shape[1:]), data.num_classes)
    if c.batch_size > n:
        raise ValueError(f"--batch-size {c.batch_size} exceeds the {n} training samples. "
                         "Fix: a smaller --batch-size (q = batch size / samples <= 1).")
    loader = PoissonLoader(TensorDataset(data.x_train, data.y_train),
                           expected_batch_size=c.batch_size,
                           max_physical_batch_size=c.max_physical_batch_size, seed=c.seed)
    total = c.epochs * len(loader)
    sigma_eff = accounting.calibrate_noise(c.epsilon, c.delta, loader.sample_rate, total)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    rule, sigma = _rule(c, names, sigma_eff)
    engine = DPEngine(model, sigma, clipping=rule, expected_batch_size=loader.expected_batch_size,
                      sample_rate=loader.sample_rate, mode=c.mode, seed=c.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
    history: dict[str, list] = {"epochs": [], "histograms": [], "seconds": [0.0]}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
        loader.load_state_dict(state["sampler"])
        history = state["history"]
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    _truncate(metrics_path, engine.steps)
    facts = {"sample_rate": loader.sample_rate, "noise_multiplier": sigma,
             "effective_noise_multiplier": sigma_eff, "steps": total,
             "parameters": sum(p.numel() for p in model.parameters())}

    def save() -> None:
        checkpoint.save(out / "checkpoint.pt", {
            "config": asdict(c), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "engine": engine.state_dict(),
            "sampler": loader.state_dict(), "history": history})

    stop = _StopFlag()
    progress = Progress(total)
    start = time.monotonic() - history["seconds"][0]
    histogram_steps = {max(1, round(f * total)) for f in HISTOGRAM_AT}
    with stop, metrics_path.open("a") as metrics:
        while engine.steps < total:
            epoch = engine.steps // len(loader)
            for batch in loader:
                trace, loss_sum, correct = _logical_step(model, engine, optimizer, batch)
                row = _row(trace, engine, c, epoch, loss_sum, len(batch))
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if engine.steps in histogram_steps:
                    history["histograms"].append({
                        "step": engine.steps, "pre": trace.norms.tolist(),
                        "post": trace.clipped_norms.tolist(), "max_grad_norm": trace.max_grad_norm})
                acc = correct / len(batch) if len(batch) else float("nan")
                progress.update(engine.steps, f"epoch {epoch + 1}/{c.epochs} loss "
                                f"{row['loss'] or 0:.3f} acc {acc:.2f} "
                                f"ε {row['epsilon']:.2f}/{c.epsilon:g}")
                if stop.requested:
                    break
            else:  # the epoch ran to its end
                history["epochs"].append(_epoch_record(model, data, engine, c, epoch))
            history["seconds"] = [time.monotonic() - start]
            save()
            if stop.requested:
                progress.close()
                print(f"privgrad train: interrupted after step {engine.steps}/{total}; "
                      f"checkpoint written. Continue with: privgrad train --resume {out}")
                return 130
            last = history["epochs"][-1]
            progress.update(engine.steps, f"epoch {epoch + 1}/{c.epochs} test acc "
                            f"{last['test_accuracy']:.3f} ε {last['epsilon']:.2f}", force=True)
    progress.close()
    summary = _summary(c, data, history, facts, engine)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    write_report(out / "report.html", metrics=rows, histograms=history["histograms"],
                 epochs=history["epochs"], summary=summary)
    print(f"test accuracy {summary['test_accuracy']:.4f} at ε = {summary['epsilon']:.3f}, "
          f"δ = {c.delta:g} ({total} steps, σ = {sigma:.3f}); report: {out / 'report.html'}")
    return 0


def _logical_step(model: nn.Module, engine: DPEngine, optimizer: torch.optim.Optimizer,
                  batch: LogicalBatch) -> tuple[StepTrace, float, int]:
    """One private step over the physical batches of a logical batch."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum, correct = 0.0, 0
    for x, y in batch:
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        engine.accumulate(losses)
        loss_sum += float(losses.detach().sum())
        correct += int((logits.argmax(1) == y).sum())
    trace = engine.step()
    optimizer.step()
    return trace, loss_sum, correct


def _epoch_record(model: nn.Module, data: datasets.Split, engine: DPEngine, c: Config,
                  epoch: int) -> dict[str, Any]:
    return {"epoch": epoch + 1, "train_accuracy": _accuracy(model, data.x_train, data.y_train),
            "test_accuracy": _accuracy(model, data.x_test, data.y_test),
            "epsilon": engine.epsilon(c.delta)}


def _row(trace: StepTrace, engine: DPEngine, c: Config, epoch: int, loss_sum: float,
         size: int) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` (NOT private: computed from individual samples)."""
    factors = torch.stack(list(trace.param_clip_factors.values())) if size else None
    clipped = float((factors.min(0).values < 1).double().mean()) if factors is not None else None
    return {
        "step": engine.steps, "epoch": epoch + 1, "batch_size": size,
        "loss": loss_sum / size if size else None, "epsilon": engine.epsilon(c.delta),
        "fraction_clipped": clipped, "max_grad_norm": trace.max_grad_norm,
        "norms_pre": _quantiles(trace.norms), "norms_post": _quantiles(trace.clipped_norms),
    }


def _quantiles(x: torch.Tensor) -> dict[str, float | None]:
    keys = [f"q{round(q * 100):02d}" for q in QUANTILES]
    if x.numel() == 0:
        return dict.fromkeys(keys)
    values = torch.quantile(x.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return dict(zip(keys, values.tolist(), strict=True))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in
                  zip(x.split(1024), y.split(1024), strict=True))
    model.train(was)
    return correct / len(y)


def _summary(c: Config, data: datasets.Split, history: dict, facts: dict,
             engine: DPEngine) -> dict[str, Any]:
    last = history["epochs"][-1]
    return {
        "test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
        "epsilon": engine.epsilon(c.delta), "delta": c.delta, "accountant": "pld",
        **facts, "epochs": c.epochs, "expected_batch_size": c.batch_size,
        "max_grad_norm": engine.max_grad_norm, "clipping": c.clipping, "mode": c.mode,
        "model": c.model or ("cnn" if data.x_train.dim() == 4 else "mlp"),
        "data": data.source, "train_samples": len(data.y_train), "test_samples": len(data.y_test),
        "seed": c.seed, "secure_randomness": c.seed is None,
        "wall_seconds": round(history["seconds"][0], 2),
        "not_private": "everything here except the model is computed from individual samples",
    }


def _truncate(path: Path, steps: int) -> None:
    """Drops metric lines after the checkpointed step (a resumed run rewrites them)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= steps]
    path.write_text("".join(ln + "\n" for ln in lines))


class _StopFlag:
    """Turns the first Ctrl-C into a request to stop after the current step (then save)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
