"""The record of a training run on disk: its identity, its checkpoints and its metrics.

A run's record is what it writes into ``--out``: ``run.json`` (its identity: a random run
id, the start time and the settings; written first), ``metrics.jsonl`` (one line per
step), ``checkpoint.pt``, ``summary.json`` and ``report.html``. The rules:

- A checkpoint holds the model, the optimizer, the engine (privacy ledger, noise generator,
  adaptive clip threshold), every rank's sampler position and generator, the history, and
  the run's identity with the length and SHA-256 of the metrics written so far. It is
  written at the start, at every epoch's end, every ``Schedule.every_steps`` steps and
  every ``Schedule.every_seconds`` seconds (default 60), and on a stop request, so a kill
  loses at most that much work; ``--resume`` re-runs the lost steps and says so.
- The file is ``MAGIC``, the SHA-256 of the payload, then the payload (``torch.save`` of the
  state); it is written to a temporary file, flushed to disk and renamed over the old one,
  so a reader sees the old checkpoint or the new one, never a mix. A missing, truncated or
  corrupted checkpoint raises ``CheckpointError``: training never silently restarts from
  scratch, nor falls back to an older checkpoint, either of which would forget privacy
  already spent.
- A checkpoint resumes only its own run: ``run.json`` beside it must carry its run id, and
  ``metrics.jsonl`` must begin with exactly the bytes it counted. Another run's checkpoint
  or metrics, or edited metrics, raise ``RunRecordError`` and nothing is changed.
- No ``--out`` holding any record file is reused by another run. ``--overwrite`` moves the
  earlier record into ``--out/previous-runs/<UTC time>-<run id>/``: nothing is deleted
  (delete that folder yourself once its ledger is no longer needed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privgrad.errors import CheckpointError

FORMAT = "privgrad-train-2"
RUN_FORMAT = "privgrad-run-1"
MAGIC = b"PRIVGRAD-CKPT-1\n"
REQUIRED = ("format", "run", "config", "model", "optimizer", "engine", "sampler", "history")
RUN, METRICS, CHECKPOINT = "run.json", "metrics.jsonl", "checkpoint.pt"
RECORD = (RUN, METRICS, CHECKPOINT, "summary.json", "report.html")
ROLLED_BACK = "metrics.rolled-back-{step}.jsonl"  # lines of steps a kill undid, kept
PREVIOUS = "previous-runs"


class RunRecordError(CheckpointError):
    """A record file belongs to another run, or a run would replace another's record.

    Raised before anything is written: the record on disk is left as it was.
    """


@dataclass
class Schedule:
    """When a run writes checkpoints besides its start, its epochs' ends and a stop.

    Attributes:
        every_steps: Also after every this many steps; ``None``: not by count.
        every_seconds: Also at the first step end this many seconds after the last
            checkpoint (default 60: a kill loses about a minute at most); ``None`` or
            ``inf``: not by time.
        stop_after_steps: Stop as Ctrl-C does (checkpoint, exit 130) once the run has taken
            this many steps in all, counting the steps before a resume.
        clock: Monotonic seconds (a parameter so that a test can drive it).
    """

    every_steps: int | None = None
    every_seconds: float | None = 60.0
    stop_after_steps: int | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        for name, value in (("--checkpoint-every-steps", self.every_steps),
                            ("--stop-after-steps", self.stop_after_steps)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a number of steps >= 1, got {value}.")
        if self.every_seconds is not None and not self.every_seconds > 0:
            raise ValueError(f"--checkpoint-every-seconds must be > 0 (inf: never by time), "
                             f"got {self.every_seconds}.")
        self._last = self.clock()

    def due(self, steps: int) -> bool:
        """Whether a checkpoint is due after step ``steps`` (1-based, counted over the run)."""
        by_count = self.every_steps is not None and steps % self.every_steps == 0
        by_time = self.every_seconds is not None and (
            self.clock() - self._last >= self.every_seconds)
        return by_count or by_time

    def saved(self) -> None:
        """Restarts the clock: a checkpoint was just written."""
        self._last = self.clock()


def save(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` to ``path`` atomically (a reader never sees a partial file).

    Args:
        path: Destination, e.g. ``out/checkpoint.pt``.
        state: Plain containers of tensors, numbers and strings, with the keys of
            ``REQUIRED`` but ``format``.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    payload = buffer.getvalue()
    atomic_write(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file, fsync and rename.

    A reader, or a run resumed after a crash, sees the old file or the new one, never a part.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, or a kill: the old file stays, the partial one goes
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable: no old file back after a crash


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint written by ``save`` and checks that the record beside it is its run's.

    Args:
        path: The checkpoint file, ``DIR/checkpoint.pt``.

    Returns:
        The state; ``state["run"]["dir"]`` is ``DIR``, whose ``metrics.jsonl`` begins with
        the lines the checkpoint counted.

    Raises:
        CheckpointError: If it is missing, unreadable, or not a privgrad checkpoint.
        RunRecordError: If ``run.json`` or ``metrics.jsonl`` beside it are another run's,
            or the metrics were truncated or edited.
    """
    if not path.is_file():
        found = record_files(path.parent)
        if found:
            raise CheckpointError(
                f"privgrad: {path.parent} holds a run's record ({', '.join(found)}) but no "
                f"{path.name}: that run was stopped before its first checkpoint, so there is "
                "nothing to resume (no model was released from it). Fix: start afresh with "
                f"--out {path.parent} --overwrite (its record is moved to "
                f"{path.parent / PREVIOUS}/), or with another --out."
            )
        raise CheckpointError(
            f"privgrad: no checkpoint at {path}. Fix: --resume the --out directory of a run "
            "that wrote one (it is written at the start, every minute, every epoch and on "
            "Ctrl-C)."
        )
    data = path.read_bytes()
    head, digest, payload = data[:len(MAGIC)], data[len(MAGIC):len(MAGIC) + 32], data[
        len(MAGIC) + 32:]
    if head != MAGIC:
        raise _damaged(path, "it does not start with privgrad's checkpoint header")
    if hashlib.sha256(payload).digest() != digest:
        raise _damaged(path, "its checksum does not match (truncated or altered)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _damaged(path, f"{type(e).__name__}: {str(e)[:200]}") from e
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt == "privgrad-train-1":
        raise CheckpointError(
            f"privgrad: {path} was written by an earlier privgrad (format {fmt!r}, without a "
            "run identity), so this one cannot tell its record from another run's. Fix: "
            "finish that run with the privgrad that started it."
        )
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing or fmt != FORMAT:
        raise CheckpointError(
            f"privgrad: {path} is not a privgrad training checkpoint (missing {missing}, "
            f"format {fmt!r}). Fix: --resume a directory written by `privgrad train --out DIR`."
        )
    run = state["run"]
    identity = read_identity(path.parent)
    if identity is not None and identity.get("run_id") != run["identity"]["run_id"]:
        raise RunRecordError(
            f"privgrad: {path} is run {run['identity']['run_id']}'s checkpoint but "
            f"{path.parent / RUN} says the directory holds run {identity.get('run_id')}: "
            "resuming from another run's checkpoint would continue its ledger on this run's "
            f"record. Fix: put this run's own {CHECKPOINT} back, or --resume the directory "
            "that checkpoint came from."
        )
    split_metrics(path.parent, run)
    state["run"] = {**run, "dir": str(path.parent)}
    return state


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"privgrad: the checkpoint {path} is truncated or corrupted ({why}). Its privacy "
        "ledger cannot be read, so the run cannot resume: the privacy already spent is "
        "recorded in metrics.jsonl next to it. Fix: restore the file from a backup; do not "
        "start a fresh run on the same data as if nothing had been spent."
    )


def record_files(out: Path) -> list[str]:
    """Names of the run record files in ``out`` (none if it is not a directory)."""
    if not out.is_dir():
        return []
    rolled = sorted(p.name for p in out.glob(ROLLED_BACK.format(step="*")))
    return [name for name in RECORD if (out / name).exists()] + rolled


def read_identity(out: Path) -> dict[str, Any] | None:
    """``run.json`` of ``out`` (``None`` when there is none).

    Raises:
        RunRecordError: If it is not a run identity written by ``begin``.
    """
    path = out / RUN
    if not path.is_file():
        return None
    try:
        identity = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        identity = {"error": f"{type(e).__name__}: {str(e)[:100]}"}
    if not isinstance(identity, dict) or identity.get("format") != RUN_FORMAT:
        raise RunRecordError(
            f"privgrad: {path} is not a privgrad run identity ({str(identity)[:120]}). Fix: "
            "restore this run's own run.json, or start afresh with --overwrite."
        )
    return identity


def claim(out: Path, *, overwrite: bool) -> Path | None:
    """Makes ``out`` ready for a new run: refuses an earlier record, or moves it aside.

    Under ``torch.distributed`` every rank checks, and only rank 0 (``RANK``) moves.

    Args:
        out: The ``--out`` directory.
        overwrite: ``--overwrite``: move the earlier record to ``out/previous-runs/…/``.

    Returns:
        Where the earlier record went, or ``None``.

    Raises:
        RunRecordError: If ``out`` holds a record and ``overwrite`` is false.
    """
    found = record_files(out)
    if not found:
        return None
    if not overwrite:
        resumable = CHECKPOINT in found
        raise RunRecordError(
            f"privgrad: {out} already holds a run ({_name(out)}: {', '.join(found)}); a new "
            "run there would replace its record and privacy ledger. Fix: "
            + (f"--resume {out} to continue it, " if resumable else "")
            + f"another --out, or --overwrite to move that record to {out / PREVIOUS}/ "
            "first (the privacy its steps spent on your data is spent all the same)."
        )
    if os.environ.get("RANK", "0") != "0":
        return None
    identity = _identity_or_none(out)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{stamp}-{identity['run_id'][:8] if identity else 'no-run-id'}"
    dest, n = out / PREVIOUS / name, 1
    while dest.exists():
        dest, n = out / PREVIOUS / f"{name}-{n}", n + 1
    dest.mkdir(parents=True)
    for f in found:
        os.replace(out / f, dest / f)
    _fsync_dir(dest)
    _fsync_dir(out)
    print(f"privgrad train: --overwrite: moved the earlier record ({', '.join(found)}) to "
          f"{dest}", file=sys.stderr)
    return dest


def begin(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Writes ``run.json`` for a new run in ``out``; returns it (``run_id`` is a new UUID)."""
    out.mkdir(parents=True, exist_ok=True)
    identity = {"format": RUN_FORMAT, "run_id": uuid.uuid4().hex,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": config}
    if (out / RUN).exists():  # another run started there since claim()
        raise RunRecordError(f"privgrad: {out / RUN} appeared while this run started: another "
                             "run writes to the same --out. Fix: give each run its own --out.")
    atomic_write(out / RUN, (json.dumps(identity, indent=2) + "\n").encode())
    return identity


def split_metrics(directory: Path, run: dict[str, Any]) -> tuple[bytes, bytes]:
    """``(the lines counted by the checkpoint's run, what follows)`` of ``metrics.jsonl``.

    What follows was written after the checkpoint, by steps a kill then undid.

    Raises:
        RunRecordError: If the file does not begin with exactly the counted bytes.
    """
    mark, run_id, path = run["metrics"], run["identity"]["run_id"], directory / METRICS
    data = path.read_bytes() if path.is_file() else b""
    prefix = data[:mark["bytes"]]
    if len(prefix) < mark["bytes"] or hashlib.sha256(prefix).hexdigest() != mark["sha256"]:
        what = "is missing" if not path.is_file() else (
            f"does not begin with the {mark['lines']} line(s) ({mark['bytes']} bytes) that run "
            f"{run_id} had written at its checkpoint (another run's metrics, or truncated or "
            "edited)")
        raise RunRecordError(
            f"privgrad: {path} {what}: resuming would mix two records or lose this one. Fix: "
            f"put back run {run_id}'s own metrics.jsonl, or start afresh with --overwrite."
        )
    return prefix, data[mark["bytes"]:]


def reopen(out: Path, run: dict[str, Any], step: int) -> tuple[bytes, int]:
    """Brings ``out``'s record back to the checkpoint of ``run`` (from ``load``) at ``step``.

    In the checkpoint's directory, metric lines written after it are moved to
    ``metrics.rolled-back-STEP.jsonl`` (appended; kept, never deleted) and a lost
    ``run.json`` is restored; into another ``out`` (``--resume A --out B``), the identity
    and the counted metrics are copied and ``A`` is left as it is.

    Returns:
        ``(the counted metrics, the number of lines moved aside)``.
    """
    source = Path(run["dir"])
    prefix, tail = split_metrics(source, run)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN).exists():
        atomic_write(out / RUN, (json.dumps(run["identity"], indent=2) + "\n").encode())
    if out.resolve() != source.resolve():
        atomic_write(out / METRICS, prefix)
        return prefix, 0
    if tail:
        with (out / ROLLED_BACK.format(step=step)).open("ab") as f:
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        os.truncate(out / METRICS, len(prefix))
    return prefix, tail.count(b"\n") + (not tail.endswith(b"\n") and bool(tail))


class MetricsLog:
    """``metrics.jsonl`` opened for appending, with the length and digest of its content.

    Args:
        path: The file; ``None`` writes nothing (ranks other than 0).
        identity: The run's ``run.json`` content.
        prefix: What the file already holds (verified: ``split_metrics``).
    """

    def __init__(self, path: Path | None, identity: dict[str, Any] | None,
                 prefix: bytes = b"") -> None:
        self.path, self.identity = path, identity
        self.lines, self.bytes = prefix.count(b"\n"), len(prefix)
        self._hash = hashlib.sha256(prefix)
        self._file: Any = None

    def __enter__(self) -> MetricsLog:
        if self.path is not None:
            self._file = self.path.open("ab")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, row: dict[str, Any]) -> None:
        """Appends one line (flushed: a kill keeps it)."""
        if self._file is None:
            return
        data = (json.dumps(row) + "\n").encode()
        self._file.write(data)
        self._file.flush()
        self._hash.update(data)
        self.lines, self.bytes = self.lines + 1, self.bytes + len(data)

    def mark(self) -> dict[str, Any]:
        """The run's identity and the metrics so far, for the checkpoint (synced first)."""
        if self._file is not None:  # on disk before the checkpoint that counts them
            os.fsync(self._file.fileno())
        return {"identity": self.identity, "metrics": {
            "lines": self.lines, "bytes": self.bytes, "sha256": self._hash.hexdigest()}}

    def rows(self) -> list[dict[str, Any]]:
        """The lines, parsed, after checking that the file is what this log wrote.

        Raises:
            RunRecordError: If the file was replaced, truncated or edited.
        """
        assert self.path is not None
        data = self.path.read_bytes() if self.path.is_file() else b""
        if len(data) != self.bytes or hashlib.sha256(data).hexdigest() != self._hash.hexdigest():
            raise RunRecordError(
                f"privgrad: {self.path} changed while this run wrote it ({len(data)} bytes, "
                f"{self.bytes} written): the report would show another record. Fix: give each "
                "run its own --out, then --resume this one to rewrite its report."
            )
        return [json.loads(line) for line in data.decode().splitlines()]


def _name(out: Path) -> str:
    identity = _identity_or_none(out)
    return f"run {identity['run_id']}" if identity else "no run.json"


def _identity_or_none(out: Path) -> dict[str, Any] | None:
    try:
        return read_identity(out)
    except RunRecordError:
        return None


def _fsync_dir(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
