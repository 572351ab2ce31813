"""Side-by-side benchmark: non-private PyTorch vs privgrad vs Opacus, same run, same machine.

    .venv/bin/python benchmarks/run.py            # full run (make bench), writes RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # smoke run (< 1 minute), prints only
    .venv/bin/python benchmarks/run.py --json raw.json --rounds 40

Timing: for each model and batch size, every configuration (see ``configs.py``) is built in
this process on a copy of the same initial model and the same random batch, warmed up
(``--warmup`` steps each), then the configurations are run round-robin, one step of each
per round (the starting configuration rotates every round). The reported time is the
median step time (forward + backward + optimizer step + zero_grad) over ``--rounds``
*quiet* rounds: rounds during which other processes used at most 10% of the CPUs (read
from ``/proc/stat``); on a shared machine rounds continue, within a time budget per
(model, B), until that many quiet rounds are collected.

Memory: peak RSS growth of one step over the post-warm-up baseline, each configuration in
a freshly forked process (details in ``memory.py``), as a ratio to non-private's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import sections
from configs import CLIP, CONFIGS, LR, SIGMA, NotAvailableError, build
from memory import MMAP_ENV
from models import SPECS, n_params

HERE = Path(__file__).resolve().parent
FULL = {"rounds": 30, "warmup": 3, "mem_warmup": 2, "mem_steps": 2, "block_s": 100.0}
QUICK = {"rounds": 2, "warmup": 1, "mem_warmup": 1, "mem_steps": 1, "block_s": 5.0}
MIN_ROUNDS = 5  # the time budget of a block never cuts it below this (quick: 1)
QUIET_LOAD = 0.10  # a round is "quiet" if other processes used at most 10% of the CPUs
WINDOW_S = 0.5  # foreign load is measured over windows of consecutive rounds this long
MAX_ROUND_FACTOR = 3  # at most 3 × --rounds rounds while waiting for quiet ones


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: smaller batches, few rounds; writes RESULTS.md only with --out")
    p.add_argument("--rounds", type=int, help=f"timed rounds (default {FULL['rounds']})")
    p.add_argument("--warmup", type=int, help=f"warm-up steps (default {FULL['warmup']})")
    p.add_argument("--mem-steps", type=int,
                   help=f"steps measured for memory (default {FULL['mem_steps']})")
    p.add_argument("--block-seconds", type=float,
                   help="stop a (model, B) block's rounds early once its timed rounds took this "
                   f"long (default {FULL['block_s']:.0f}; at least {MIN_ROUNDS} rounds are run)")
    p.add_argument("--models", default=",".join(SPECS), help="comma-separated subset")
    p.add_argument("--batch-sizes", help="comma-separated (default 64,256; --quick: 8,16)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write raw numbers to PATH")
    p.add_argument("--out", metavar="PATH",
                   help="markdown report (default benchmarks/RESULTS.md; none with --quick)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.rounds = args.rounds or preset["rounds"]
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    args.mem_warmup = max(preset["mem_warmup"], min(args.warmup, 3))
    args.mem_steps = args.mem_steps or preset["mem_steps"]
    args.block_seconds = args.block_seconds or preset["block_s"]
    args.min_rounds = min(args.rounds, 1 if args.quick else MIN_ROUNDS)
    bs = args.batch_sizes or ("8,16" if args.quick else "64,256")
    args.batch_sizes = [int(b) for b in bs.split(",")]
    # --quick measures memory at the first batch size only (keeps the smoke run < 1 min).
    args.mem_batch_sizes = args.batch_sizes[:1] if args.quick else args.batch_sizes
    args.models = [m for m in args.models.split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c]
    for m in args.models:
        if m not in SPECS:
            p.error(f"unknown model {m!r}; choose from {list(SPECS)}")
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; choose from {list(CONFIGS)}")
    if "non-private" not in args.configs:
        args.configs.insert(0, "non-private")  # every ratio is relative to it
    if args.out is None and not args.quick:
        args.out = str(HERE / "RESULTS.md")
    return args


# --------------------------------------------------------------------------- timing


def time_one(model: str, B: int, args: argparse.Namespace) -> tuple[dict[str, dict], dict]:
    """Median step time of every configuration for one (model, B), interleaved."""
    spec = SPECS[model]
    torch.manual_seed(args.seed)
    base = spec.build()
    x, y = spec.batch(B, torch.Generator().manual_seed(args.seed))
    out: dict[str, dict] = {}
    runners = {}
    for c in args.configs:
        try:
            runners[c] = build(c, spec, base, x, y)
        except NotAvailableError as e:
            out[c] = {"status": "n/a", "reason": str(e)}

    def fail(c: str, e: Exception) -> None:
        out[c] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        runners.pop(c).close()

    for c in list(runners):
        t0 = time.perf_counter()
        try:
            for _ in range(args.warmup):
                runners[c].step()
        except Exception as e:  # a failing configuration is a result, not a crash
            fail(c, e)
            continue
        warm_s = time.perf_counter() - t0
        print(f"    warm-up {c}: {warm_s:.2f} s", file=sys.stderr, flush=True)

    # times[c][r] = step time of configuration c in round r (None if it did not run).
    times: dict[str, list[float | None]] = {c: [] for c in runners}
    loads: list[float] = []  # foreign CPU load of each round (measured over >= WINDOW_S)
    window: list[int] = []
    w0 = cpu_counters()
    gc.collect()
    t_start = time.perf_counter()
    r = 0
    while runners and r < args.rounds * MAX_ROUND_FACTOR:
        quiet = sum(load <= QUIET_LOAD for load in loads)
        elapsed = time.perf_counter() - t_start
        if r >= args.min_rounds and (quiet >= args.rounds or elapsed > args.block_seconds):
            break
        order = list(runners)
        k = r % len(order)
        for c in times:
            times[c].append(None)
        for c in order[k:] + order[:k]:
            t0 = time.perf_counter()
            try:
                runners[c].step()
            except Exception as e:
                fail(c, e)
                continue
            times[c][r] = time.perf_counter() - t0
        window.append(r)
        loads.append(float("nan"))
        w1 = cpu_counters()
        if w1[0] - w0[0] >= WINDOW_S:
            for i in window:
                loads[i] = foreign_load(w0, w1)
            window, w0 = [], w1
        r += 1
    if window:
        w1 = cpu_counters()
        for i in window:
            loads[i] = foreign_load(w0, w1)
    quiet_rounds = [i for i, load in enumerate(loads) if load <= QUIET_LOAD]
    # Medians over the quiet rounds; all rounds only if too few were quiet (flagged).
    use = quiet_rounds if len(quiet_rounds) >= min(args.min_rounds, 3) else list(range(r))
    meta = {
        "rounds": r,
        "quiet_rounds": len(quiet_rounds),
        "used_rounds": len(use),
        "noisy": len(use) != len(quiet_rounds),
        "round_loads": loads,
        "seconds": time.perf_counter() - t_start,
    }
    for c, runner in runners.items():
        runner.close()
        ts = sorted(t for i in use if (t := times[c][i]) is not None)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[c] = {
            "status": "ok",
            "median_ms": 1e3 * statistics.median(ts),
            "p25_ms": 1e3 * q[0],
            "p75_ms": 1e3 * q[2],
            "times_ms": [None if t is None else 1e3 * t for t in times[c]],
        }
    return {c: out[c] for c in args.configs}, meta


def cpu_counters() -> tuple[float, float, float]:
    """(wall s, CPU-busy s of the whole machine, CPU s of this process and its children)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def foreign_load(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Fraction of the machine's CPU capacity used by other processes (and steal) meanwhile."""
    wall = after[0] - before[0]
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other) / (wall * (os.cpu_count() or 1)) if wall > 0 else float("nan")


# --------------------------------------------------------------------------- memory


def measure_memory(args: argparse.Namespace) -> dict[tuple[str, int, str], dict]:
    jobs = [
        {"model": m, "B": B, "config": c, "seed": args.seed, "threads": args.threads,
         "warmup": args.mem_warmup, "steps": args.mem_steps}
        for m in args.models for B in args.mem_batch_sizes for c in args.configs
    ]
    if not Path("/proc/self/clear_refs").exists():
        return {(j["model"], j["B"], j["config"]): {
            "status": "n/a", "reason": "needs Linux /proc/self/clear_refs"} for j in jobs}
    env = {**os.environ, **MMAP_ENV}
    proc = subprocess.run(
        [sys.executable, str(HERE / "memory.py"), json.dumps(jobs)],
        env=env, stdout=subprocess.PIPE, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory server failed (exit {proc.returncode})")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(j["model"], j["B"], j["config"]): r for j, r in zip(jobs, results, strict=True)}


# --------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    try:
        import opacus

        opacus_v = opacus.__version__
    except ImportError:
        opacus_v = "not installed"
    try:
        import privgrad

        privgrad_v = getattr(privgrad, "__version__", "?")
    except ImportError:
        privgrad_v = "not installed"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                             capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        rev = ""
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {affinity} usable",
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus_v,
        "privgrad": f"{privgrad_v} (git {rev or '?'}, working tree as checked out)",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _time_cells(r: dict, ref: dict) -> tuple[str, str]:
    if r["status"] != "ok":
        return r["status"], "–"
    ratio = r["median_ms"] / ref["median_ms"] if ref.get("status") == "ok" else float("nan")
    return f"{r['median_ms']:.1f}", f"{ratio:.2f}×"


def _mem_cell(r: dict | None, ref: dict | None) -> str:
    if r is None:
        return "not measured"
    if r["status"] != "ok":
        return r["status"]
    if ref is None or ref.get("status") != "ok" or ref["extra_mb"] <= 0:
        return f"? ({r['extra_mb']:.0f} MB)"
    return f"{r['extra_mb'] / ref['extra_mb']:.1f}× ({r['extra_mb']:.0f} MB)"


def table(model: str, results: dict, args: argparse.Namespace) -> str:
    head = ["configuration"]
    for B in args.batch_sizes:
        head += [f"B={B} ms", f"B={B} time ×", f"B={B} memory ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in args.configs:
        row = [c]
        for B in args.batch_sizes:
            t = results[model][B]["time"]
            m = results[model][B].get("memory")
            row += list(_time_cells(t[c], t["non-private"]))
            row.append(_mem_cell(m and m[c], m and m["non-private"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def notes(results: dict, args: argparse.Namespace) -> list[str]:
    seen: dict[str, str] = {}
    for m in args.models:
        for B in args.batch_sizes:
            for kind in ("time", "memory"):
                for c, r in (results[m][B].get(kind) or {}).items():
                    if r is not None and r["status"] != "ok":
                        seen.setdefault(f"{c}: {r['status']} — {r['reason']}", f"{m} B={B}")
    return [f"- {k} (first seen: {v})" for k, v in seen.items()]


def block_line(m: str, results: dict, args: argparse.Namespace) -> str:
    parts = []
    for B in args.batch_sizes:
        b = results[m][B]["block"]
        flag = " NOISY" if b["noisy"] else ""
        parts.append(f"B={B}: {b['used_rounds']}/{b['rounds']} rounds used ("
                     f"{b['quiet_rounds']} quiet), foreign load {results[m][B]['foreign_cpu']:.0%}"
                     f"{flag}")
    return "Rounds: " + "; ".join(parts) + "."


def markdown(results: dict, info: dict, args: argparse.Namespace, wall_s: float) -> str:
    out = [
        "# privgrad benchmark results",
        "",
        "Generated by `benchmarks/run.py` (`make bench`); do not edit by hand.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- wall time of this run: {wall_s / 60:.1f} min",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        "## Method",
        "",
        f"- Every configuration uses SGD (lr {LR}), σ = {SIGMA}, C = {CLIP}, expected batch "
        "size = B, and fixed-size batches of random data (the same batch and the same initial "
        "weights for every configuration). One step = forward + backward (private gradient) "
        "+ `optimizer.step()` + `zero_grad()`.",
        "- Configurations: `non-private` = `losses.mean().backward()`; `non-private + noise` "
        "= the same plus drawing the DP noise for every parameter with PyTorch's CPU "
        "Gaussian sampler and adding it (the floor under any DP-SGD step using that "
        "sampler); `privgrad <mode>` = "
        "`DPEngine(model, ..., mode=<mode>)` + `engine.backward(losses)` (the trace holds the "
        "clipped sum; `privgrad auto (sum not kept)`: `keep_clipped_sum=False`); `opacus hooks` = "
        "`GradSampleModule` + `DPOptimizer` (Opacus 1.6, per-sample gradients materialised); "
        "`opacus ghost` = `GradSampleModuleFastGradientClipping(use_ghost_clipping=True)` + "
        "`DPOptimizerFastGradientClipping` + `DPTensorFastGradientClipping.backward()` "
        "(two backward passes). `n/a` = construction raised `ValueError` (mode not "
        "available); `failed` = raised during a step (reasons below).",
        f"- Time: for each model and B all configurations live in one process; each is warmed "
        f"up ({args.warmup} steps), then they run round-robin, one step of each per round "
        "(starting configuration rotated each round). Reported: median step time in ms over "
        f"up to {args.rounds} quiet rounds (next item), and its ratio to non-private "
        "(`time ×`).",
        f"- Memory (`memory ×`): peak extra memory of a step, as a ratio to non-private's, with "
        "the absolute value in parentheses. Measured as RSS growth: each configuration runs in "
        "a freshly forked process (forked from a server that has imported the libraries but "
        "run no tensor op) with `MALLOC_MMAP_THRESHOLD_=65536`, so tensors are mmapped and "
        f"returned to the OS when freed and RSS follows live memory. After {args.mem_warmup} "
        "warm-up steps the kernel's RSS high-water mark is reset (`/proc/self/clear_refs`), "
        f"then {args.mem_steps} steps run; extra = `VmHWM` − `VmRSS` at the reset. It counts "
        "everything a step allocates above what lives between steps (parameters, batch): "
        "activations, gradients, per-sample quantities, noise. Resolution is a few MB, so "
        "ratios for small footprints are coarse.",
        "- On CPU, PyTorch's allocator does not cache: a step's large tensors are fresh "
        "`mmap`s, so page faults and zeroing (system time) are part of every step time. This "
        "is what CPU users pay, and it weighs most on configurations that materialise large "
        "per-sample tensors (hundreds of MB per step).",
        "- Other load on the machine: a shared 2-core machine slows small steps "
        "disproportionately when anything else runs (the intra-op threads wait on each "
        "other). So the CPU time used by other processes is measured from `/proc/stat` "
        f"(machine busy time minus this process's) over windows of ≥ {WINDOW_S} s of "
        f"consecutive rounds; a round is *quiet* if that load was ≤ {QUIET_LOAD:.0%} of the "
        "CPUs. Medians use quiet rounds only; rounds continue (up to "
        f"{MAX_ROUND_FACTOR}× the target, and within a {args.block_seconds:.0f} s budget per "
        f"model and B) until {args.rounds} quiet rounds are collected. Under each table: "
        "rounds used / run, and the mean foreign load over the whole block. A block marked "
        "NOISY had too few quiet rounds and uses all of them.",
        "",
        "## Results",
        "",
    ]
    for m in args.models:
        base = SPECS[m].build()
        out += [f"### {m}: {SPECS[m].description}; {n_params(base):,} parameters", "",
                table(m, results, args), "", block_line(m, results, args), ""]
    extra = notes(results, args)
    if extra:
        out += ["## Configurations that did not run", "", *extra, ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    info = machine()
    print(f"privgrad benchmark on {info['cpu']} ({info['cores']}, torch threads "
          f"{info['torch_threads']}); rounds {args.rounds}, warm-up {args.warmup}",
          file=sys.stderr, flush=True)

    mem = {} if args.no_memory else None
    if mem is None:
        print("memory (fresh process per configuration):", file=sys.stderr, flush=True)
        mem = measure_memory(args)

    results: dict = {}
    for m in args.models:
        results[m] = {}
        for B in args.batch_sizes:
            print(f"timing {m} B={B}:", file=sys.stderr, flush=True)
            c0 = cpu_counters()
            timed, block = time_one(m, B, args)
            c1 = cpu_counters()
            load = foreign_load(c0, c1)
            print(f"    ({c1[0] - c0[0]:.1f} s; {block['quiet_rounds']}/{block['rounds']} rounds "
                  f"quiet; other processes used {load:.0%} of the CPUs)",
                  file=sys.stderr, flush=True)
            results[m][B] = {"time": timed, "block": block, "foreign_cpu": load}
            if mem:
                results[m][B]["memory"] = {c: mem.get((m, B, c)) for c in args.configs}
    wall = time.perf_counter() - start

    for m in args.models:
        print(f"\n{m}: {SPECS[m].description}")
        print(table(m, results, args))
        print(block_line(m, results, args))
    for line in notes(results, args):
        print(line)
    print(f"\ntotal {wall:.0f} s")

    if args.out:
        kept = sections.sections(Path(args.out))  # other benchmarks' tables stay
        Path(args.out).write_text("\n\n".join([markdown(results, info, args, wall), *kept]) + "\n")
        print(f"wrote {args.out}")
    if args.json:
        raw = {"machine": info, "settings": {k: getattr(args, k) for k in (
            "rounds", "warmup", "mem_warmup", "mem_steps", "batch_sizes", "mem_batch_sizes",
            "block_seconds", "configs", "seed", "threads")},
            "sigma": SIGMA, "max_grad_norm": CLIP, "lr": LR, "wall_s": wall,
            "results": {m: {str(B): v for B, v in r.items()} for m, r in results.items()}}
        Path(args.json).write_text(json.dumps(raw, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
