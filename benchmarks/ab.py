"""Before/after: the step time and memory of two source trees, alternated on one machine.

Runs ``benchmarks/run.py`` (configurations ``non-private``, ``non-private + noise``,
``privgrad auto``) with ``PYTHONPATH`` set to the old tree's ``src`` and then to this
tree's, ``--rounds`` times in alternation (memory in the first round only), and writes
the ratio ``auto / (non-private + noise)`` of each run, and the memory of the first, to
the ``ab`` section of benchmarks/RESULTS.md.

    git archive <commit> src | tar -x -C /tmp/old
    .venv/bin/python benchmarks/ab.py --old /tmp/old/src --label-old <commit>
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

from sections import publish

HERE = pathlib.Path(__file__).parent
CONFIGS = "non-private,non-private + noise,privgrad auto"
BEGIN, END = "<!-- ab:begin -->", "<!-- ab:end -->"


def run(src: str, json_path: pathlib.Path, memory: bool) -> dict:
    cmd = [sys.executable, str(HERE / "run.py"), "--models", "mlp,cnn,transformer",
           "--batch-sizes", "64,256", "--configs", CONFIGS, "--rounds", "12",
           "--block-seconds", "40", "--json", str(json_path), "--out", os.devnull]
    if not memory:
        cmd.append("--no-memory")
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=src),
                   stdout=subprocess.DEVNULL)
    return json.loads(json_path.read_text())


def ratio(d: dict, m: str, B: str) -> float:
    t = d["results"][m][B]["time"]
    return t["privgrad auto"]["median_ms"] / t["non-private + noise"]["median_ms"]


def extra_mb(d: dict, m: str, B: str, config: str) -> float:
    return d["results"][m][B]["memory"][config]["extra_mb"]


def table(runs: dict[str, list[dict]], labels: dict[str, str]) -> list[str]:
    old, new = runs["old"], runs["new"]
    lines = [
        "## Before and after (`benchmarks/ab.py`)",
        "",
        f"Before: {labels['old']}; after: {labels['new']}. `benchmarks/run.py` with each "
        f"tree on `PYTHONPATH`, alternated, {len(old)} runs each; step time of `privgrad auto` "
        "as a ratio to `non-private + noise` (the floor) per run, and the mean ratio after ÷ "
        "before; extra peak memory of `privgrad auto` (first run), MB, with non-private's.",
        "",
        "| model | B | before: auto / floor | after: auto / floor | after ÷ before | "
        "memory before (MB) | memory after (MB) | non-private (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, bs in old[0]["results"].items():
        for B in bs:
            o = [ratio(d, m, B) for d in old]
            n = [ratio(d, m, B) for d in new]
            lines.append(
                f"| {m} | {B} | {', '.join(f'{x:.2f}' for x in o)} | "
                f"{', '.join(f'{x:.2f}' for x in n)} | "
                f"{statistics.mean(n) / statistics.mean(o):.2f} | "
                f"{extra_mb(old[0], m, B, 'privgrad auto'):.1f} | "
                f"{extra_mb(new[0], m, B, 'privgrad auto'):.1f} | "
                f"{extra_mb(new[0], m, B, 'non-private'):.1f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="the old tree's src directory")
    p.add_argument("--label-old", default="the old tree")
    p.add_argument("--label-new", default="this tree")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--from-json", nargs=2, metavar=("OLD_GLOB", "NEW_GLOB"),
                   help="tabulate earlier runs' JSON (e.g. '/tmp/ab_old_*.json') instead")
    args = p.parse_args()
    if args.from_json:
        runs = {k: [json.loads(f.read_text()) for f in sorted(pathlib.Path("/").glob(g[1:]))]
                for k, g in zip(("old", "new"), args.from_json, strict=True)}
    else:
        runs = {"old": [], "new": []}
        for r in range(args.rounds):
            for k, src in (("old", args.old), ("new", str(HERE.parent / "src"))):
                path = pathlib.Path(f"/tmp/ab_{k}_{r}.json")
                runs[k].append(run(src, path, memory=r == 0))
    publish(BEGIN, END, table(runs, {"old": args.label_old, "new": args.label_new}))


if __name__ == "__main__":
    main()
