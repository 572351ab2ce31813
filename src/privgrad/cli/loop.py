"""The training loop of ``privgrad train``: one process, or one rank of ``--nproc N``.

Under ``torch.distributed`` every rank trains on its shard of the Poisson sample (same
model initialisation, identical ``p.grad`` after each step, see ``privgrad.distributed``);
the per-sample statistics of each step are gathered so that rank 0 alone prints the
progress bar and writes the metrics, checkpoints (holding every rank's sampler state)
and the report. Everything written except the model is NOT private.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from privgrad import accounting, distributed
from privgrad.cli import checkpoint, datasets, models
from privgrad.cli.config import Config, rule_and_sigma
from privgrad.cli.progress import Progress
from privgrad.cli.report import write_report
from privgrad.cli.stop import StopFlag
from privgrad.data import LogicalBatch, PoissonLoader
from privgrad.engine import DPEngine
from privgrad.trace import StepTrace

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HISTOGRAM_AT = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # fractions of the run


@dataclass(frozen=True)
class StepStats:
    """What the metrics say of one logical step (NOT private: per-sample values).

    Attributes:
        loss_sum: Sum of the samples' losses.
        correct: Samples classified correctly (before the update).
        pre: ``(b,)`` per-sample gradient norms before clipping.
        post: ``(b,)`` after clipping.
        clipped: ``(b,)`` whether each sample's gradient was scaled down.
    """

    loss_sum: float
    correct: int
    pre: torch.Tensor
    post: torch.Tensor
    clipped: torch.Tensor


def train(c: Config, out: Path, state: dict[str, Any] | None) -> int:
    """Trains with the settings ``c``; resumes from ``state`` if given.

    Returns:
        The exit status: 0, or 130 when stopped by Ctrl-C after writing a checkpoint.
    """
    rank, world = distributed.world()
    lead = rank == 0
    if world != c.nproc:
        raise ValueError(f"the run was set up for {c.nproc} process(es) but {world} are "
                         f"running. Fix: --nproc {c.nproc} (resume uses the checkpointed one).")
    torch.manual_seed(c.split_seed)  # the same split and initial model on every rank
    data = datasets.load(c.data, c.split_seed)
    model = models.build(c.model, tuple(data.x_train.shape[1:]), data.num_classes)
    n = len(data.y_train)
    if c.batch_size > n:
        raise ValueError(f"--batch-size {c.batch_size} exceeds the {n} training samples. "
                         "Fix: a smaller --batch-size (q = batch size / samples <= 1).")
    loader = PoissonLoader(TensorDataset(data.x_train, data.y_train),
                           expected_batch_size=c.batch_size,
                           max_physical_batch_size=c.max_physical_batch_size, seed=c.seed,
                           shard=(rank, world))
    total = c.epochs * len(loader)
    sigma_eff = accounting.calibrate_noise(c.epsilon, c.delta, loader.sample_rate, total)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    rule, sigma = rule_and_sigma(c, names, sigma_eff)
    engine = DPEngine(model, sigma, clipping=rule, expected_batch_size=loader.expected_batch_size,
                      sample_rate=loader.sample_rate, mode=c.mode, seed=c.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
    history: dict[str, list] = {"epochs": [], "histograms": [], "seconds": [0.0]}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
        loader.load_state_dict(state["sampler"][rank])
        history = state["history"]
    metrics_path = out / "metrics.jsonl"
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        _truncate(metrics_path, engine.steps)

    def save() -> None:
        samplers = _gather(loader.state_dict())
        if lead:
            checkpoint.save(out / "checkpoint.pt", {
                "config": asdict(c), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "engine": engine.state_dict(),
                "sampler": samplers, "history": history})

    progress = Progress(total, enabled=lead)
    start = time.monotonic() - history["seconds"][0]
    histogram_steps = {max(1, round(f * total)) for f in HISTOGRAM_AT}
    with StopFlag() as stop, (metrics_path.open("a") if lead else _Null()) as metrics:
        while engine.steps < total:
            epoch, stopping = engine.steps // len(loader), False
            for batch in loader:
                trace, loss_sum, correct = logical_step(model, engine, optimizer, batch)
                stats, stopping = _merged(_stats(trace, loss_sum, correct), stop.requested)
                row = _row(stats, engine, c, epoch, trace.max_grad_norm)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if engine.steps in histogram_steps:
                    history["histograms"].append({
                        "step": engine.steps, "pre": stats.pre.tolist(),
                        "post": stats.post.tolist(), "max_grad_norm": trace.max_grad_norm})
                size = len(stats.pre)
                acc = stats.correct / size if size else float("nan")
                progress.update(engine.steps, f"epoch {epoch + 1}/{c.epochs} loss "
                                f"{row['loss'] or 0:.3f} acc {acc:.2f} "
                                f"ε {row['epsilon']:.2f}/{c.epsilon:g}")
                if stopping:
                    break
            if engine.steps % len(loader) == 0:  # the epoch ran to its end
                history["epochs"].append(_epoch_record(model, data, engine, c, epoch))
            history["seconds"] = [time.monotonic() - start]
            save()
            if stopping:
                progress.close()
                if lead:
                    print(f"privgrad train: interrupted after step {engine.steps}/{total}; "
                          f"checkpoint written. Continue with: privgrad train --resume {out}")
                return 130
            last = history["epochs"][-1]
            progress.update(engine.steps, f"epoch {epoch + 1}/{c.epochs} test acc "
                            f"{last['test_accuracy']:.3f} ε {last['epsilon']:.2f}", force=True)
    progress.close()
    if lead:
        facts = {"sample_rate": loader.sample_rate, "noise_multiplier": sigma,
                 "effective_noise_multiplier": sigma_eff, "steps": total, "processes": world,
                 "parameters": sum(p.numel() for p in model.parameters())}
        _finish(c, out, data, history, facts, engine)
    return 0


def logical_step(model: nn.Module, engine: DPEngine, optimizer: torch.optim.Optimizer,
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


def _stats(trace: StepTrace, loss_sum: float, correct: int) -> StepStats:
    factors = list(trace.param_clip_factors.values())
    low = torch.stack(factors).min(0).values if factors else torch.ones(0)
    return StepStats(loss_sum, correct, trace.norms.double(), trace.clipped_norms.double(),
                     low < 1)


def _gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
    if not distributed.is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _merged(stats: StepStats, stop: bool) -> tuple[StepStats, bool]:
    """The statistics over every rank's samples, and whether any rank was asked to stop."""
    parts = _gather((stats, stop))
    if len(parts) == 1:
        return stats, stop
    s = [p[0] for p in parts]
    cat = torch.cat
    merged = StepStats(sum(x.loss_sum for x in s), sum(x.correct for x in s),
                       cat([x.pre for x in s]), cat([x.post for x in s]),
                       cat([x.clipped for x in s]))
    return merged, any(p[1] for p in parts)


def _epoch_record(model: nn.Module, data: datasets.Split, engine: DPEngine, c: Config,
                  epoch: int) -> dict[str, Any]:
    return {"epoch": epoch + 1, "train_accuracy": _accuracy(model, data.x_train, data.y_train),
            "test_accuracy": _accuracy(model, data.x_test, data.y_test),
            "epsilon": engine.epsilon(c.delta)}


def _row(stats: StepStats, engine: DPEngine, c: Config, epoch: int,
         max_norm: float) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` (NOT private: computed from individual samples)."""
    size = len(stats.pre)
    return {
        "step": engine.steps, "epoch": epoch + 1, "batch_size": size,
        "loss": stats.loss_sum / size if size else None, "epsilon": engine.epsilon(c.delta),
        "fraction_clipped": float(stats.clipped.double().mean()) if size else None,
        "max_grad_norm": max_norm,
        "norms_pre": _quantiles(stats.pre), "norms_post": _quantiles(stats.post),
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


def _finish(c: Config, out: Path, data: datasets.Split, history: dict, facts: dict,
            engine: DPEngine) -> None:
    """Writes ``summary.json`` and ``report.html`` and prints the result line."""
    last = history["epochs"][-1]
    summary = {
        "test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
        "epsilon": engine.epsilon(c.delta), "delta": c.delta, "accountant": "pld",
        **facts, "epochs": c.epochs, "expected_batch_size": c.batch_size,
        "max_grad_norm": engine.max_grad_norm, "clipping": c.clipping, "mode": c.mode,
        "model": c.model or models.default_name(tuple(data.x_train.shape[1:])),
        "data": data.source, "train_samples": len(data.y_train), "test_samples": len(data.y_test),
        "seed": c.seed, "secure_randomness": c.seed is None,
        "wall_seconds": round(history["seconds"][0], 2),
        "not_private": "everything here except the model is computed from individual samples",
    }
    checkpoint.atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    write_report(out / "report.html", metrics=rows, histograms=history["histograms"],
                 epochs=history["epochs"], summary=summary)
    print(f"test accuracy {summary['test_accuracy']:.4f} at ε = {summary['epsilon']:.3f}, "
          f"δ = {c.delta:g} ({summary['steps']} steps, σ = {summary['noise_multiplier']:.3f}, "
          f"{summary['processes']} process(es)); report: {out / 'report.html'}")


def _truncate(path: Path, steps: int) -> None:
    """Drops metric lines after the checkpointed step (a resumed run rewrites them)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= steps]
    path.write_text("".join(ln + "\n" for ln in lines))


class _Null:
    """A metrics file for ranks that write nothing."""

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, text: str) -> None:
        """Discards ``text``."""

    def flush(self) -> None:
        """Does nothing."""
