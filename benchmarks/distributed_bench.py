"""1 vs 2 processes (torch.distributed, gloo) on the benchmark transformer, same global batch.

Writes its table between markers in benchmarks/RESULTS.md (the rest of the file is left
as it is). Run: .venv/bin/python benchmarks/distributed_bench.py

One process uses all the machine's cores (torch threads = cores); with 2 processes each
rank uses cores / 2 threads and half the global batch, so the comparison is at equal
hardware. The step (forward, privgrad backward with the clipped-sum all-reduce and the
shared noise, optimizer step) is timed on rank 0 after a barrier, so it is the slowest
rank's time; the median over the timed steps is reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import privgrad as pg
from models import SPECS
from sections import publish

BEGIN, END = "<!-- distributed-bench:begin -->", "<!-- distributed-bench:end -->"
WARMUP, STEPS = 3, 15


def timed_steps(B: int, rank: int, world: int) -> list[float]:
    spec = SPECS["transformer"]
    torch.manual_seed(0)
    model = spec.build()
    engine = pg.DPEngine(model, 1.0, max_grad_norm=1.0, expected_batch_size=B, mode="auto",
                         self_check=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = spec.batch(B, torch.Generator().manual_seed(1))
    x, y = x[rank::world], y[rank::world]
    times = []
    for i in range(WARMUP + STEPS):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        engine.backward(spec.loss(model(x), y))
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.barrier()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, init: str, B: int, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        times = timed_steps(B, rank, world)
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def two_processes(B: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times.pt"
        mp.start_processes(worker, args=(2, f"{tmp}/init", B, out), nprocs=2, join=True,
                           start_method="spawn")
        return torch.load(out)


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for B in (64, 256):
        one = statistics.median(timed_steps(B, 0, 1))
        two = statistics.median(two_processes(B))
        rows.append((B, one, two))
        print(f"B={B}: 1 process {one * 1e3:.1f} ms, 2 processes {two * 1e3:.1f} ms", flush=True)
    cores = os.cpu_count()
    lines = [
        "## Distributed: 1 vs 2 processes on the benchmark transformer",
        "",
        f"privgrad `auto`, σ = 1, global batch B split evenly over the ranks (gloo, CPU); "
        f"{cores} cores in all: 1 process × {cores} threads vs 2 processes × "
        f"{max(1, (cores or 1) // 2)} thread(s). Median of {STEPS} steps, slowest rank; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "",
        "| B (global) | 1 process: step (ms) | samples/s | 2 processes: step (ms) | samples/s "
        "| speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for B, one, two in rows:
        lines.append(f"| {B} | {one * 1e3:.1f} | {B / one:.0f} | {two * 1e3:.1f} | {B / two:.0f} "
                     f"| {one / two:.2f}× |")
    lines += [
        "",
        "Both columns use the same cores: the ratio compares splitting the batch over "
        "processes (paying one bucketed all-reduce of the clipped sums and a broadcast seed "
        "for the shared noise per step) with splitting each kernel over threads. It says "
        "nothing about scaling to more hardware; on several machines each rank brings its "
        "own cores.",
    ]
    publish(BEGIN, END, lines)


if __name__ == "__main__":
    main()
