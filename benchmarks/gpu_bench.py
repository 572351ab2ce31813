"""Step time and extra GPU memory on a CUDA device: non-private, privgrad and Opacus.

    cd benchmarks && python gpu_bench.py [--rounds 30] [--models mlp,cnn,transformer]

Same models, configurations and batches as ``run.py`` (``configs.build``), moved to the
GPU. For each model and B all configurations live in one process and run round-robin,
one step of each per round after 3 warm-up steps; reported: the median step time
(synchronised before and after) and its ratio to non-private, and the peak memory a step
allocates above what lives before it (``torch.cuda.max_memory_allocated``), as a ratio
to non-private's. ``non-private + noise`` is left out (it draws with the CPU generator).
Not part of ``make bench`` (whose machines have no GPU); without a CUDA device it prints
that and writes nothing. Its section of RESULTS.md survives later ``make bench`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import configs
from models import SPECS
from sections import publish

BEGIN, END = "<!-- gpu-bench:begin -->", "<!-- gpu-bench:end -->"
CONFIGS = ("non-private", "privgrad auto", "privgrad ghost", "privgrad materialize",
           "opacus hooks", "opacus ghost")


def _measure(spec, B: int, rounds: int) -> dict[str, tuple[float, float] | str]:
    """``{config: (median step s, peak extra MiB) or "failed: ..."}`` for one model and B."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = spec.build().to(dev)
    x, y = (t.to(dev) for t in spec.batch(B, torch.Generator().manual_seed(0)))
    runners, memory, out = {}, {}, {}
    for c in CONFIGS:
        try:
            r = configs.build(c, spec, base, x, y)
            for _ in range(3):
                r.step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            r.step()
            torch.cuda.synchronize()
            memory[c] = (torch.cuda.max_memory_allocated() - before) / 2**20
            runners[c] = r
        except Exception as e:
            out[c] = f"failed: {type(e).__name__}"
    times: dict[str, list[float]] = {c: [] for c in runners}
    for k in range(rounds):
        order = list(runners)
        for c in order[k % len(order):] + order[:k % len(order)]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            runners[c].step()
            torch.cuda.synchronize()
            times[c].append(time.perf_counter() - start)
    for c, r in runners.items():
        out[c] = (statistics.median(times[c]), memory[c])
        r.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--models", default=",".join(SPECS))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing measured, RESULTS.md unchanged.")
        return
    warnings.filterwarnings("ignore")
    lines = [
        "## On a GPU",
        "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__} "
        f"(`benchmarks/gpu_bench.py`, not part of `make bench`'s CPU tables). Median step "
        "time over "
        f"{args.rounds} interleaved rounds as a ratio to non-private (ms in parentheses), and "
        "the peak GPU memory a step allocates as a ratio to non-private's. These models are "
        "small for a GPU: every configuration is bound by kernel launches and Python, not by "
        "arithmetic. On CUDA privgrad holds the clipped sum beside the private gradient "
        "(the in-place write is CPU-only).",
        "",
        "| model | B | " + " | ".join(CONFIGS) + " |",
        "|---|---|" + "---|" * len(CONFIGS),
    ]
    for name in args.models.split(","):
        for B in (64, 256):
            res = _measure(SPECS[name], B, args.rounds)
            np_t, np_m = res["non-private"]
            cells = []
            for c in CONFIGS:
                v = res.get(c, "n/a")
                cells.append(v if isinstance(v, str) else
                             f"{v[0] / np_t:.2f}× ({v[0] * 1e3:.1f} ms), mem {v[1] / np_m:.2f}×")
            lines.append(f"| {name} | {B} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    publish(BEGIN, END, lines)


if __name__ == "__main__":
    main()
