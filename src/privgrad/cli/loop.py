"""The training loop of ``privgrad train``: one process, or one rank of ``--nproc N``.

Under ``torch.distributed`` every rank trains on its shard of the Poisson sample (same
model initialisation, identical ``p.grad`` after each step, see ``privgrad.distributed``);
the per-sample statistics of each step are gathered so that rank 0 alone prints the
progress bar and writes the metrics, checkpoints (holding every rank's sampler state)
and the report. Everything written except the model is NOT private.
"""

from __future__ import annotations

import json
import sys
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


def train(c: Config, out: Path, state: dict[str, Any] | None,
          schedule: checkpoint.Schedule | None = None) -> int:
    """Trains with the settings ``c``; resumes from ``state`` (``checkpoint.load``) if given.

    A resumed run continues exactly where its checkpoint was taken, mid-epoch included:
    same batches, noise, ledger, metric lines and final model as a run never interrupted.

    Args:
        c: The run's settings.
        out: The ``--out`` directory (``checkpoint.claim`` already checked it).
        state: A checkpoint's state, or ``None`` for a new run.
        schedule: When to checkpoint and stop early; default every 60 s and every epoch.

    Returns:
        The exit status: 0, or 130 when stopped (Ctrl-C, SIGTERM, ``--stop-after-steps``)
        after writing a checkpoint.
    """
    schedule = schedule or checkpoint.Schedule()
    rank, world = distributed.world()
    lead = rank == 0
    if world != c.nproc:
        raise ValueError(f"the run was set up for {c.nproc} process(es) but {world} are "
                         f"running. Fix: --nproc {c.nproc} (resume uses the checkpointed one).")
    torch.manual_seed(c.split_seed)  # the same split and initial model on every rank
    data = datasets.load(c.data, c.split_seed, num_classes=c.num_classes)
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
    if schedule.stop_after_steps is not None and schedule.stop_after_steps <= engine.steps:
        raise ValueError(f"--stop-after-steps {schedule.stop_after_steps} is not after the "
                         f"checkpointed step {engine.steps}. Fix: a larger value, or drop it.")
    log = _open_record(out, c, state, engine.steps, total, len(loader)) if lead else (
        checkpoint.MetricsLog(None, None))
    start = time.monotonic() - history["seconds"][0]

    def save() -> None:
        samplers = _gather(loader.state_dict())
        history["seconds"] = [time.monotonic() - start]
        if lead:
            checkpoint.save(out / checkpoint.CHECKPOINT, {
                "run": log.mark(), "config": asdict(c), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "engine": engine.state_dict(),
                "sampler": samplers, "history": history})
        schedule.saved()

    progress = Progress(total, enabled=lead)
    histogram_steps = {max(1, round(f * total)) for f in HISTOGRAM_AT}
    stopping = False
    with StopFlag(schedule.stop_after_steps) as stop, log:
        if state is None:
            save()  # from here on a kill loses only the steps since the last checkpoint
        while engine.steps < total and not stopping:
            for batch in loader:  # a resumed loader continues mid-epoch
                epoch = engine.steps // len(loader)
                trace, loss_sum, correct = logical_step(model, engine, optimizer, batch)
                stats, stopping, due = _merged(_stats(trace, loss_sum, correct),
                                               stop.due(engine.steps), schedule.due(engine.steps))
                row = _row(stats, engine, c, epoch, trace.max_grad_norm)
                log.write(row)
                if engine.steps in histogram_steps:
                    history["histograms"].append({
                        "step": engine.steps, "pre": stats.pre.tolist(),
                        "post": stats.post.tolist(), "max_grad_norm": trace.max_grad_norm})
                size = len(stats.pre)
                acc = stats.correct / size if size else float("nan")
                progress.update(engine.steps, f"epoch {epoch + 1}/{c.epochs} loss "
                                f"{row['loss'] or 0:.3f} acc {acc:.2f} "
                                f"ε {row['epsilon']:.2f}/{c.epsilon:g}")
                ended = engine.steps % len(loader) == 0
                if ended:  # recorded before the checkpoint that follows, never twice
                    history["epochs"].append(_epoch_record(model, data, engine, c, epoch))
                if stopping or ended or due:
                    save()
                if ended:
                    last = history["epochs"][-1]
                    progress.update(engine.steps, f"epoch {epoch + 1}/{c.epochs} test acc "
                                    f"{last['test_accuracy']:.3f} ε {last['epsilon']:.2f}",
                                    force=True)
                if stopping:
                    break
    progress.close()
    if stopping:
        if lead:
            print(f"privgrad train: interrupted after step {engine.steps}/{total}; "
                  f"checkpoint written. Continue with: privgrad train --resume {out}")
        return 130
    if lead:
        facts = {"sample_rate": loader.sample_rate, "noise_multiplier": sigma,
                 "effective_noise_multiplier": sigma_eff, "steps": total, "processes": world,
                 "parameters": sum(p.numel() for p in model.parameters())}
        _finish(c, out, data, history, facts, engine, log)
    return 0


def _open_record(out: Path, c: Config, state: dict[str, Any] | None, steps: int, total: int,
                 per_epoch: int) -> checkpoint.MetricsLog:
    """The metrics log of a new run (``run.json`` written), or of a resumed one (told)."""
    if state is None:
        return checkpoint.MetricsLog(out / checkpoint.METRICS, checkpoint.begin(out, asdict(c)))
    run = state["run"]
    prefix, undone = checkpoint.reopen(out, run, steps)
    epoch, within = divmod(steps, per_epoch)
    where = (f"the end of epoch {epoch}" if within == 0 and steps else
             f"after {within} of the {per_epoch} steps of epoch {epoch + 1}")
    lost = "" if not undone else (
        f"; {undone} metric line(s) written after it by steps that a kill undid were moved "
        f"to {out / checkpoint.ROLLED_BACK.format(step=steps)} and those steps run again")
    print(f"privgrad train: resuming run {run['identity']['run_id']} from its checkpoint at "
          f"step {steps}/{total} ({where}){lost}.", file=sys.stderr)
    return checkpoint.MetricsLog(out / checkpoint.METRICS, run["identity"], prefix)


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


def _merged(stats: StepStats, stop: bool, due: bool) -> tuple[StepStats, bool, bool]:
    """The statistics over every rank's samples; whether any rank stops, or saves.

    Every rank takes the same decisions (a checkpoint gathers every rank's sampler), even
    when one is due by its own clock.
    """
    parts = _gather((stats, stop, due))
    if len(parts) == 1:
        return stats, stop, due
    s = [p[0] for p in parts]
    cat = torch.cat
    merged = StepStats(sum(x.loss_sum for x in s), sum(x.correct for x in s),
                       cat([x.pre for x in s]), cat([x.post for x in s]),
                       cat([x.clipped for x in s]))
    return merged, any(p[1] for p in parts), any(p[2] for p in parts)


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
            engine: DPEngine, log: checkpoint.MetricsLog) -> None:
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
        "privacy_statement": engine.privacy_statement(
            deltas=sorted({c.delta, 1e-5, 1e-6, 1e-7}, reverse=True),
            public=datasets.public_inputs(data, c.batch_size),
            dataset_size=len(data.y_train)).to_dict(),
    }
    checkpoint.atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    write_report(out / "report.html", metrics=log.rows(), histograms=history["histograms"],
                 epochs=history["epochs"], summary=summary)
    print(f"test accuracy {summary['test_accuracy']:.4f} at ε = {summary['epsilon']:.3f}, "
          f"δ = {c.delta:g} ({summary['steps']} steps, σ = {summary['noise_multiplier']:.3f}, "
          f"{summary['processes']} process(es)); report: {out / 'report.html'}")
