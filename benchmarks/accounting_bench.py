"""Time of ε after 100,000 identical DP-SGD steps: privgrad's ledger vs Opacus's accountants.

Writes its table between markers in benchmarks/RESULTS.md (the rest of the file is left
as it is). Run: .venv/bin/python benchmarks/accounting_bench.py
"""

import platform
import time

import torch

from privgrad.accounting import PrivacyLedger
from sections import publish

SIGMA, Q, STEPS, DELTA = 1.1, 256 / 60000, 100_000, 1e-5
BEGIN, END = "<!-- accounting-bench:begin -->", "<!-- accounting-bench:end -->"


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main():
    rows = []
    for acc in ("pld", "rdp"):
        ledger = PrivacyLedger()
        _, t_record = timed(lambda: [ledger.record(SIGMA, Q) for _ in range(STEPS)])  # noqa: B023
        eps, t_first = timed(lambda: ledger.epsilon(DELTA, acc))  # noqa: B023
        _, t_again = timed(lambda: ledger.epsilon(DELTA, acc))  # noqa: B023
        ledger.record(SIGMA, Q)
        _, t_next = timed(lambda: ledger.epsilon(DELTA, acc))  # noqa: B023
        rows.append((f"privgrad PrivacyLedger ({acc})", eps, t_record, t_first, t_again, t_next))
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant

        for name, cls in (("Opacus RDPAccountant", RDPAccountant),
                          ("Opacus PRVAccountant", PRVAccountant)):
            acct = cls()
            _, t_record = timed(lambda: [acct.step(noise_multiplier=SIGMA, sample_rate=Q)  # noqa: B023
                                         for _ in range(STEPS)])
            eps, t_first = timed(lambda: acct.get_epsilon(DELTA))  # noqa: B023
            _, t_again = timed(lambda: acct.get_epsilon(DELTA))  # noqa: B023
            acct.step(noise_multiplier=SIGMA, sample_rate=Q)
            _, t_next = timed(lambda: acct.get_epsilon(DELTA))  # noqa: B023
            rows.append((name, eps, t_record, t_first, t_again, t_next))
    except ImportError:
        pass
    lines = [
        "## Accounting: ε after 100,000 identical steps",
        "",
        f"σ = {SIGMA}, q = 256/60000, δ = {DELTA}; measured in one run on "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}. "
        "`record` is the time of 100,000 per-step calls; `first ε` the first query; "
        "`again` the same query with nothing new; `after +1 step` a query after one more step.",
        "",
        "| accountant | ε | record 100k steps (s) | first ε (s) | again (s) | after +1 step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, eps, a, b, c, d in rows:
        lines.append(f"| {name} | {eps:.4f} | {a:.3f} | {b:.3f} | {c:.6f} | {d:.3f} |")
    publish(BEGIN, END, lines)


if __name__ == "__main__":
    main()
