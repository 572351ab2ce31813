"""Atomic, checksummed checkpoints of a training run.

A checkpoint holds the model, the optimizer, the engine (privacy ledger, noise generator,
adaptive clip threshold), the sampler position and the run's configuration. The file is
``MAGIC``, the SHA-256 of the payload, then the payload (``torch.save`` of the state); it
is written to a temporary file, flushed to disk and renamed over the old one, so a reader
sees the old checkpoint or the new one, never a mix. A missing, truncated or corrupted
checkpoint (any flipped byte fails the checksum) raises ``CheckpointError``: training
never silently restarts from scratch, and never falls back to an older checkpoint, either
of which would forget privacy already spent.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from privgrad.errors import CheckpointError

FORMAT = "privgrad-train-1"
MAGIC = b"PRIVGRAD-CKPT-1\n"
REQUIRED = ("format", "config", "model", "optimizer", "engine", "sampler", "history")


def save(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` to ``path`` atomically (a reader never sees a partial file).

    Args:
        path: Destination, e.g. ``out/checkpoint.pt``.
        state: Plain containers of tensors, numbers and strings.
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
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable: no fall-back to the old file after a crash
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint written by ``save``.

    Args:
        path: The checkpoint file.

    Returns:
        The state.

    Raises:
        CheckpointError: If it is missing, unreadable, or not a privgrad checkpoint.
    """
    if not path.is_file():
        raise CheckpointError(
            f"privgrad: no checkpoint at {path}. Fix: --resume the --out directory of a run "
            "that wrote one (it is written every epoch and on Ctrl-C)."
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
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise _damaged(path, f"{type(e).__name__}: {str(e)[:200]}") from e
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing or state.get("format") != FORMAT:
        raise CheckpointError(
            f"privgrad: {path} is not a privgrad training checkpoint (missing {missing}, "
            f"format {state.get('format') if isinstance(state, dict) else None!r}). Fix: "
            "--resume a directory written by `privgrad train --out DIR`."
        )
    return state


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"privgrad: the checkpoint {path} is truncated or corrupted ({why}). Its privacy "
        "ledger cannot be read, so the run cannot resume: the privacy already spent is "
        "recorded in metrics.jsonl next to it. Fix: restore the file from a backup; do not "
        "start a fresh run on the same data as if nothing had been spent."
    )
