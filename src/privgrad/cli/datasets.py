"""Datasets of ``privgrad train``: the bundled digits, or a user's ``.npz`` / ``.csv`` file.

Nothing that shapes the model is read from private values:

- the number of classes ``K`` is a public input (``--num-classes``, required with
  ``--data``; the bundled digits have 10): one record with an unseen label must not change
  the output layer, so a label outside ``0..K-1`` is an error naming its row;
- the feature schema (one record's shape) sizes the first layer: it is the file's format,
  treated as public;
- inputs are used as given, except digits, whose pixels are rescaled by their known range
  (0..16) to [-1, 1]. Statistics computed on private training data (means, standard
  deviations) would themselves leak it, outside the guarantee: normalise your own data
  beforehand with public constants.

The train/test split is a seeded function of the whole file (its size, its order and,
through stratification, its labels). It is treated as public: the guarantee covers the
records of the training split, and the held-out records, on which the test accuracy is
measured (NOT private either way), are not protected by it. To protect every record of a
file, split it yourself with a public rule and pass the training part.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from privgrad.errors import PrivgradError

LABEL_COLUMNS = ("label", "labels", "y", "target", "class")
DIGITS_CLASSES = 10


class DataError(PrivgradError, ValueError):
    """A ``--data`` file cannot be used as given (the message names the row and the fix)."""


@dataclass(frozen=True)
class Split:
    """A train/test split as float32 inputs and int64 class indices.

    Attributes:
        x_train: ``(N, *shape)`` inputs; ``shape`` is ``(C, H, W)`` for images.
        y_train: ``(N,)`` class indices in ``[0, num_classes)``.
        x_test: ``(M, *shape)``.
        y_test: ``(M,)``.
        num_classes: Number of classes ``K`` (public: ``--num-classes`` or the digits' 10).
        source: What was loaded, for the report.
        seed: Seed of the split.
        stratified: Whether the split kept the label proportions.
        test_fraction: Share of the records held out.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str
    seed: int = 0
    stratified: bool = True
    test_fraction: float = 0.2


def load(path: str | None, seed: int, test_fraction: float = 0.2, *,
         num_classes: int | None = None) -> Split:
    """Loads a dataset and splits it (stratified where every present class has 2+ records).

    Args:
        path: ``None`` for scikit-learn's digits; else a ``.npz`` with arrays ``X`` and
            ``y``, or a ``.csv`` with a header and a label column (one of
            ``LABEL_COLUMNS``; a UTF-8 byte-order mark and quoted names are accepted);
            images in ``.npz`` may be ``(N, C, H, W)`` or ``(N, H, W)``.
        seed: Seed of the split.
        test_fraction: Share of the records held out for testing.
        num_classes: ``K``, public; required with ``path``; the digits have 10.

    Returns:
        The split.

    Raises:
        DataError: For a missing file, an unknown format, a malformed table, or a label
            that is not an integer in ``0..K-1`` (naming its row).
    """
    if path is None:
        from sklearn.datasets import load_digits

        if num_classes not in (None, DIGITS_CLASSES):
            raise DataError(f"--num-classes {num_classes}: the bundled digits have "
                            f"{DIGITS_CLASSES} classes. Fix: drop --num-classes, or --data FILE.")
        digits = load_digits()
        x = digits.images[:, None].astype(np.float32) / 8.0 - 1.0  # pixels 0..16 → [-1, 1]
        return _split(x, digits.target, DIGITS_CLASSES, seed, test_fraction,
                      "scikit-learn digits (8×8)", "digits", _npz_row)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--data {path}: no such file. Fix: the path of a .npz or .csv file.")
    if num_classes is None:
        raise DataError(f"--data {path}: --num-classes K is required. {NUM_CLASSES_WHY}")
    where: Callable[[int], str]
    if file.suffix == ".npz":
        x, y = _npz(file)
        where = _npz_row
    elif file.suffix == ".csv":
        x, y, lines = _csv(file)

        def where(i: int) -> str:
            return f"line {lines[i]}"
    else:
        raise DataError(f"--data {path}: unknown format {file.suffix!r}. Fix: a .npz with "
                        "arrays X and y, or a .csv with a header and a 'label' column.")
    if x.ndim == 3:
        x = x[:, None]
    return _split(x.astype(np.float32), y, num_classes, seed, test_fraction, file.name,
                  f"--data {path}", where)


NUM_CLASSES_WHY = (
    "The number of classes sizes the output layer, so it must not be read from the private "
    "labels (one record with a new label would change the released model's shape). Fix: "
    "--num-classes K with the labels' public range 0..K-1, e.g. --num-classes 10."
)


def _npz_row(i: int) -> str:
    return f"row {i} (X[{i}], y[{i}])"


def _npz(file: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(file, allow_pickle=False) as archive:
        keys = list(archive.keys())
        if "X" not in keys or "y" not in keys:
            raise DataError(
                f"--data {file}: a .npz needs arrays 'X' (inputs) and 'y' (labels), found "
                f"{keys}. Fix: np.savez(path, X=inputs, y=labels)."
            )
        x, y = archive["X"], archive["y"]
    if x.ndim < 2:
        raise DataError(
            f"--data {file}: X has shape {x.shape}, but needs one row per record, shape "
            "(N, features) or images (N, H, W) / (N, C, H, W). Fix: X.reshape(-1, 1) for "
            "one feature per record."
        )
    if y.ndim != 1:
        raise DataError(
            f"--data {file}: y has shape {y.shape}, but needs one class index per record, "
            "shape (N,). Fix: y.argmax(1) for one-hot labels, or y.reshape(-1) for (N, 1)."
        )
    for name, a in (("X", x), ("y", y)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise DataError(f"--data {file}: {name} has dtype {a.dtype}, not numbers. Fix: "
                            f"np.savez(path, X=X.astype('float32'), y=y.astype('int64')).")
    return x, y


def _csv(file: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The table without its label column, the labels, and each row's line in the file."""
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise DataError(f"--data {file}: not UTF-8 text ({e.reason} at byte {e.start}). Fix: "
                        "save the CSV as UTF-8.") from None
    numbered = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not numbered:
        raise DataError(f"--data {file}: the file is empty. Fix: a header line and rows.")
    try:
        header = [c.strip().lower() for c in next(csv.reader([numbered[0][1]], strict=True))]
    except csv.Error as e:
        raise DataError(f"--data {file}: line {numbered[0][0]}, the header, is malformed "
                        f"({e}). Fix: a header of comma-separated names, e.g. a,b,label.") from None
    found = [c for c in header if c in LABEL_COLUMNS]
    if len(found) != 1:
        raise DataError(
            f"--data {file}: {'no' if not found else 'more than one'} label column in the "
            f"header {header[:8]}{' (found ' + str(found) + ')' if found else ''}. Fix: name "
            f"exactly one column, the class labels, one of {LABEL_COLUMNS}."
        )
    rows, lines = [ln for _, ln in numbered[1:]], [n for n, _ in numbered[1:]]
    if not rows:
        raise DataError(f"--data {file}: a header but no rows. Fix: one line per record.")
    try:
        table = np.loadtxt(rows, delimiter=",", quotechar='"', dtype=np.float64, ndmin=2)
    except ValueError:
        raise _bad_row(file, header, rows, lines) from None
    if table.shape[1] != len(header):
        raise DataError(f"--data {file}: the header names {len(header)} columns but the rows "
                        f"have {table.shape[1]}. Fix: one name per column.")
    col = header.index(found[0])
    return np.delete(table, col, axis=1), table[:, col], lines


def _bad_row(file: Path, header: list[str], rows: list[str], lines: list[int]) -> DataError:
    """The error naming the first row numpy could not read (found again, slowly)."""
    for row, line in zip(csv.reader(rows, strict=True), lines, strict=False):
        if len(row) != len(header):
            return DataError(f"--data {file}: line {line} has {len(row)} fields, the header "
                             f"{len(header)}. Fix: one value per column on every line.")
        for name, value in zip(header, row, strict=True):
            try:
                float(value)
            except ValueError:
                return DataError(f"--data {file}: line {line}, column {name!r}: {value!r} is "
                                 "not a number. Fix: numbers only (labels as class indices "
                                 "0..K-1, features encoded as numbers).")
    return DataError(f"--data {file}: the rows are not a table of numbers. Fix: one "
                     "comma-separated number per column on every line.")


def _split(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int, test_fraction: float,
           source: str, name: str, where: Callable[[int], str]) -> Split:
    """Checks the records (naming a bad one by ``where(index)``) and splits them."""
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} inputs but {len(y)} labels. Fix: one label per "
                        "record.")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
        raise DataError(f"{name}: {where(bad)} has a NaN or infinite input. Fix: clean it.")
    labels = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(labels) & (labels == np.round(labels)) & (labels >= 0) & (
        labels < num_classes)
    if not ok.all():
        bad = int(np.argmin(ok))
        raise DataError(
            f"{name}: {where(bad)} has label {labels[bad]:g}, not a class index in "
            f"0..{num_classes - 1} (--num-classes {num_classes}). A label outside the public "
            "range would change the model's shape. Fix: map the labels to 0..K-1, or a "
            "larger --num-classes if the classes are known in advance."
        )
    y = labels.astype(np.int64)
    if len(y) < 10:
        raise DataError(f"{name}: {len(y)} records; training a classifier needs at least 10.")
    counts = np.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    n_test = math.ceil(test_fraction * len(y))
    stratified = bool(counts[counts > 0].min() >= 2 and min(n_test, len(y) - n_test) >= present)
    xa, xb, ya, yb = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                      stratify=y if stratified else None)
    t = torch.from_numpy
    return Split(t(xa), t(ya), t(xb), t(yb), num_classes, source, seed, stratified,
                 test_fraction)


def public_inputs(data: Split, batch_size: int) -> tuple[str, ...]:
    """What a ``privgrad train`` run on ``data`` treats as public, for its privacy statement.

    Args:
        data: The loaded split.
        batch_size: The expected batch size ``--batch-size``.

    Returns:
        One sentence per public input: what is computed from the dataset size ``N``
        (``N`` itself is stated by ``DPEngine.privacy_statement(dataset_size=N)``), the
        class count, the split, the feature schema.
    """
    n, m = len(data.y_train), len(data.y_test)
    how = "stratified by label" if data.stratified else "not stratified"
    return (
        f"the number of steps, epochs × round(N / batch size), is computed from N too (q = "
        f"{batch_size} / {n}), and σ is calibrated from q and the steps: privgrad train has "
        "no option to fix them without N",
        f"the number of classes K = {data.num_classes} (--num-classes, or the bundled digits'"
        " 10): it sizes the output layer; labels outside 0..K-1 are refused",
        f"the train/test split: {data.test_fraction:.0%} of {data.source} held out ({m} "
        f"records), {how}, with split seed {data.seed}: a function of the whole dataset (its "
        "size, order and labels); the guarantee covers the training records only, and the "
        "test accuracy measured on the held-out ones is NOT private",
        f"the feature schema: one record's input shape {tuple(data.x_train.shape[1:])} "
        "(it sizes the first layer)",
    )
