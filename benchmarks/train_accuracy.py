"""Test accuracy of ``privgrad train`` with its defaults, per clipping rule and seed.

Backs the README's accuracy table: each run is ``privgrad train --clipping R --seed S``
(digits, the default CNN, ε = 3, δ = 1e-5), read back from its ``summary.json``. Writes its
table between markers in benchmarks/RESULTS.md (the rest of the file is left as it is).
Run: .venv/bin/python benchmarks/train_accuracy.py
"""

import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from privgrad.cli import main as privgrad
from sections import write_section

RULES = ("flat", "automatic", "per-layer", "adaptive")
SEEDS = (0, 1, 2)
BEGIN, END = "<!-- train-accuracy:begin -->", "<!-- train-accuracy:end -->"


def run(rule: str, seed: int) -> tuple[float, float, float]:
    """``(test accuracy, ε, seconds)`` of one default run."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            code = privgrad(["train", "--clipping", rule, "--seed", str(seed), "--out", out])
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"privgrad train --clipping {rule} --seed {seed} exited {code}")
        summary = json.loads((Path(out) / "summary.json").read_text())
    return summary["test_accuracy"], summary["epsilon"], seconds


def main() -> None:
    rows, times = [], []
    for rule in RULES:
        accs = []
        for seed in SEEDS:
            acc, eps, seconds = run(rule, seed)
            accs.append(acc)
            times.append(seconds)
            print(f"{rule} seed {seed}: test accuracy {acc:.3f} at ε = {eps:.3f} ({seconds:.1f} s)")
        cells = " | ".join(f"{a:.1%}" for a in accs)
        rows.append(f"| `{rule}` | {cells} | {sum(accs) / len(accs):.1%} |")
    lines = [
        BEGIN,
        "## `privgrad train` test accuracy (defaults: digits, CNN, ε = 3, δ = 1e-5)",
        "",
        f"`privgrad train --clipping R --seed S`, one run each, in-process, on "
        f"{platform.processor() or platform.machine()} with torch {torch.__version__}; "
        f"median {sorted(times)[len(times) // 2]:.1f} s per run (in-process, excluding the "
        "interpreter start-up).",
        "",
        "| `--clipping` | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean |",
        "|---" * (len(SEEDS) + 2) + "|",
        *rows,
        END,
    ]
    write_section(BEGIN, END, "\n".join(lines))


if __name__ == "__main__":
    main()
