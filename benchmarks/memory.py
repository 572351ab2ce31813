"""Peak extra memory of one training step, measured as RSS growth in a fresh process.

Method (Linux): a server process is started once with ``MALLOC_MMAP_THRESHOLD_=65536``
(so glibc serves every tensor larger than 64 KiB with ``mmap`` and gives it back to the
OS on ``free``: RSS then follows live memory instead of the allocator's cache; PyTorch's
default CPU allocator does not cache either). The server imports torch, Opacus and
privgrad but runs no tensor op, then forks one child per (model, B, configuration). The
child builds the model, its batch and the configuration, runs the warm-up steps (which
include one-time work such as privgrad's first-step self-check), then resets the kernel's
RSS high-water mark (``echo 5 > /proc/self/clear_refs``), reads ``VmRSS`` as the baseline,
runs ``steps`` more steps and reads ``VmHWM``. Peak extra memory = ``VmHWM - baseline``:
everything a step allocates above what lives between steps (parameters, batch, optimizer
state): activations, gradients, per-sample quantities, noise.

Run by ``run.py``: ``python memory.py JOBS_JSON`` prints one JSON list on stdout.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import re
import sys
import traceback
import warnings

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(m.group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(job: dict) -> dict:
    """One (model, B, config) measurement; runs inside a freshly forked child."""
    import torch

    from configs import NotAvailableError, build
    from models import SPECS

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    torch.set_flush_denormal(True)
    spec = SPECS[job["model"]]
    torch.manual_seed(job["seed"])
    base = spec.build()
    g = torch.Generator().manual_seed(job["seed"])
    x, y = spec.batch(job["B"], g)
    try:
        runner = build(job["config"], spec, base, x, y)
    except NotAvailableError as e:
        return {"status": "n/a", "reason": str(e)}
    try:
        for _ in range(job["warmup"]):
            runner.step()
        gc.collect()
        before = _status_kb("VmHWM")
        _reset_peak()
        baseline = _status_kb("VmRSS")
        # The kernel's RSS counters are summed lazily across threads, so VmHWM right after
        # the reset may differ from VmRSS by a little; a failed reset leaves it unchanged.
        reset_hwm = _status_kb("VmHWM")
        if reset_hwm > baseline + 4096 and reset_hwm >= before:
            raise RuntimeError("could not reset the RSS high-water mark (clear_refs)")
        for _ in range(job["steps"]):
            runner.step()
        peak = _status_kb("VmHWM")
        after = _status_kb("VmRSS")
    except Exception as e:  # reported, not fatal: one failing configuration is a result
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return {
        "status": "ok",
        "baseline_mb": baseline / 1024,
        "hwm_at_reset_mb": reset_hwm / 1024,
        "peak_mb": peak / 1024,
        "after_mb": after / 1024,
        "extra_mb": (peak - baseline) / 1024,
    }


def _run_in_child(job: dict) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            out = measure(job)
        except BaseException as e:
            out = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}
        with os.fdopen(w, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"status": "failed", "reason": f"child died (wait status {status})"}
    return json.loads(data)


def serve(jobs: list[dict]) -> list[dict]:
    # Import everything once, run no tensor op (no thread pool exists yet), then fork:
    # each child starts clean and does not pay the import again.
    warnings.simplefilter("ignore")
    import torch  # noqa: F401

    import configs  # noqa: F401
    import models  # noqa: F401

    # torch._dynamo: imported lazily by the first torch.optim optimizer (~0.6 s per child).
    for name in ("torch._dynamo", "opacus", "privgrad"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    results = []
    for i, job in enumerate(jobs):
        res = _run_in_child(job)
        extra = f"{res['extra_mb']:.1f} MB" if res["status"] == "ok" else res["status"]
        print(f"  memory [{i + 1}/{len(jobs)}] {job['model']} B={job['B']} "
              f"{job['config']}: {extra}", file=sys.stderr, flush=True)
        results.append(res)
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(serve(json.loads(sys.argv[1]))))
