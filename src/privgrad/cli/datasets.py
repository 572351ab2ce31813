"""Datasets of ``privgrad train``: the bundled digits, or a user's ``.npz`` / ``.csv`` file.

Inputs are used as given, except digits, whose pixels are rescaled by their known range
(0..16) to [-1, 1]. Statistics computed on private training data (means, standard
deviations) would themselves leak it, outside the guarantee: normalise your own data
beforehand with public constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

LABEL_COLUMNS = ("label", "labels", "y", "target", "class")


@dataclass(frozen=True)
class Split:
    """A train/test split as float32 inputs and int64 class indices.

    Attributes:
        x_train: ``(N, *shape)`` inputs; ``shape`` is ``(C, H, W)`` for images.
        y_train: ``(N,)`` class indices in ``[0, num_classes)``.
        x_test: ``(M, *shape)``.
        y_test: ``(M,)``.
        num_classes: Number of classes.
        source: What was loaded, for the report.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str


def load(path: str | None, seed: int, test_fraction: float = 0.2) -> Split:
    """Loads a dataset and splits it (stratified where every class has 2+ samples).

    Args:
        path: ``None`` for scikit-learn's digits; else a ``.npz`` with arrays ``X`` and
            ``y``, or a ``.csv`` with a header and a label column (one of
            ``LABEL_COLUMNS``); images in ``.npz`` may be ``(N, C, H, W)`` or ``(N, H, W)``.
        seed: Seed of the split.
        test_fraction: Share of the samples held out for testing.

    Returns:
        The split.

    Raises:
        ValueError: For a missing file, an unknown format, or data without labels.
    """
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images[:, None].astype(np.float32) / 8.0 - 1.0  # pixels 0..16 → [-1, 1]
        return _split(x, digits.target, seed, test_fraction, "scikit-learn digits (8×8)")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--data {path}: no such file. Fix: the path of a .npz or .csv file.")
    if file.suffix == ".npz":
        x, y = _npz(file)
    elif file.suffix == ".csv":
        x, y = _csv(file)
    else:
        raise ValueError(f"--data {path}: unknown format {file.suffix!r}. Fix: a .npz with "
                         "arrays X and y, or a .csv with a header and a 'label' column.")
    if x.ndim == 3:
        x = x[:, None]
    return _split(x.astype(np.float32), y, seed, test_fraction, file.name)


def _npz(file: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(file, allow_pickle=False) as archive:
        keys = list(archive.keys())
        if "X" not in keys or "y" not in keys:
            raise ValueError(
                f"--data {file}: a .npz needs arrays 'X' (inputs) and 'y' (labels), found "
                f"{keys}. Fix: np.savez(path, X=inputs, y=labels)."
            )
        return archive["X"], archive["y"]


def _csv(file: Path) -> tuple[np.ndarray, np.ndarray]:
    with file.open() as f:
        header = [c.strip().lower() for c in f.readline().split(",")]
    found = [c for c in header if c in LABEL_COLUMNS]
    if not found:
        raise ValueError(
            f"--data {file}: no label column in the header {header[:8]}. Fix: name the "
            f"column of class labels one of {LABEL_COLUMNS}."
        )
    table = np.loadtxt(file, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    col = header.index(found[0])
    return np.delete(table, col, axis=1), table[:, col]


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, source: str) -> Split:
    if len(x) != len(y):
        raise ValueError(f"{source}: {len(x)} inputs but {len(y)} labels.")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
        raise ValueError(f"{source}: sample {bad} has a NaN or infinite input. Fix: clean it.")
    if not np.all(np.asarray(y) == np.round(y)):
        raise ValueError(f"{source}: labels must be class indices (integers).")
    classes, y = np.unique(np.asarray(y).astype(np.int64), return_inverse=True)
    if len(classes) < 2 or len(y) < 10:
        raise ValueError(f"{source}: {len(y)} samples in {len(classes)} classes; training a "
                         "classifier needs at least 10 samples and 2 classes.")
    stratify = y if np.bincount(y).min() >= 2 else None
    xa, xb, ya, yb = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                      stratify=stratify)
    t = torch.from_numpy
    return Split(t(xa), t(ya), t(xb), t(yb), len(classes), source)
