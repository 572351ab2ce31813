"""Atomic checkpoints of a training run: written to a temporary file, then renamed.

A checkpoint holds the model, the optimizer, the engine (privacy ledger, noise generator,
adaptive clip threshold), the sampler position and the run's configuration. A missing,
truncated or corrupted checkpoint raises ``CheckpointError``: training never silently
restarts from scratch, which would forget the privacy already spent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from privgrad.errors import CheckpointError

FORMAT = "privgrad-train-1"
REQUIRED = ("format", "config", "model", "optimizer", "engine", "sampler", "history")


def save(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` to ``path`` atomically (a reader never sees a partial file).

    Args:
        path: Destination, e.g. ``out/checkpoint.pt``.
        state: Plain containers of tensors, numbers and strings.
    """
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(
            f"privgrad: the checkpoint {path} is truncated or corrupted ({type(e).__name__}: "
            f"{str(e)[:200]}). Its privacy ledger cannot be read, so the run cannot resume: "
            "the privacy already spent is recorded in metrics.jsonl next to it. Fix: restore "
            "the file from a backup; do not start a fresh run on the same data as if nothing "
            "had been spent."
        ) from e
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing or state.get("format") != FORMAT:
        raise CheckpointError(
            f"privgrad: {path} is not a privgrad training checkpoint (missing {missing}, "
            f"format {state.get('format') if isinstance(state, dict) else None!r}). Fix: "
            "--resume a directory written by `privgrad train --out DIR`."
        )
    return state
