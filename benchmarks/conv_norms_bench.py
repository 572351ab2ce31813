"""Per-sample norm of one convolution layer: each exact formula against the weight gradient.

For 3×3 convolutions (padding 1) from small to ResNet-late-stage shapes, at B = 32, times
the ordinary (non-private) weight gradient and each formula privgrad has for the per-sample
squared norms of the weight gradient: the ghost norm on the unfolded input, the ghost norm
from the channel Gram matrix of the padded input ("gram"), and the materialised per-sample
gradient (im2col and a batched matmul on the CPU; the grouped-convolution kernel, with the
batch folded into the groups, is timed beside it). Then the formula the cost model picks
(`per_sample.policy`: fewest multiply-adds) and its time against the fastest formula.
A book-kept layer pays its norm on top of one weight gradient (its clipped sum).

Writes its table between markers in benchmarks/RESULTS.md (the rest of the file is left
as it is). Run: .venv/bin/python benchmarks/conv_norms_bench.py
"""

import platform
import statistics
import time

import torch
from torch import nn

from privgrad.per_sample import chunks, policy
from privgrad.per_sample.rules import conv
from sections import publish

B = 32
LAYERS = [  # (C_in, C_out, image side, stride)
    (64, 64, 8, 1), (64, 128, 4, 1),  # the benchmark CNN's conv2 and conv3
    (128, 128, 16, 1), (256, 256, 8, 1), (512, 512, 4, 1), (512, 512, 7, 1),
    (256, 512, 8, 2),
]
FORMULAS = {"ghost": "ghost (unfolded)", "gram": "gram", "materialized": "materialised (im2col)"}
BEGIN, END = "<!-- conv-norms-bench:begin -->", "<!-- conv-norms-bench:end -->"


def median_ms(fn, seconds: float = 1.0, most: int = 15) -> float:
    """Median time of ``fn`` in ms over up to ``most`` runs or ``seconds``, after a warm-up."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (len(times) < most and time.perf_counter() - start < seconds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def grouped_norms(m: nn.Module, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The materialised norm by the grouped weight-gradient kernel (used off the CPU)."""
    def chunk(s: slice) -> torch.Tensor:
        b = A[s].shape[0]
        return chunks.squared_norms(conv._weight_grad(m, A[s], G[s], folds=b).view(b, -1))

    return chunks.per_sample_chunked(chunk, A.shape[0], m.weight.numel(), A.device)


def main():
    torch.manual_seed(0)
    rows = []
    for cin, cout, side, stride in LAYERS:
        m = nn.Conv2d(cin, cout, 3, padding=1, stride=stride, bias=False)
        A = torch.randn(B, cin, side, side)
        with torch.no_grad():
            G = torch.randn_like(m(A))
        formulas = conv.norm_formulas(m, A, G)["weight"]
        wgrad = median_ms(lambda: conv._weight_grad(m, A, G, 1))  # noqa: B023
        times = {n: median_ms(lambda f=f: policy.run(f, B, A.device))  # noqa: B023
                 for n, f in formulas.items()}
        grouped = median_ms(lambda: grouped_norms(m, A, G))  # noqa: B023
        pick = policy.choose(formulas)
        rows.append((f"{cin}→{cout}, {side}×{side}, stride {stride}", wgrad, times, grouped,
                     pick))
        print(rows[-1], flush=True)
    cells = " | ".join(f"{label} ms" for label in FORMULAS.values())
    lines = [
        "## Per-sample norms of one convolution layer",
        "",
        f"3×3 convolution, padding 1, B = {B}, float32; measured in one run on "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (`benchmarks/conv_norms_bench.py`). Median ms of "
        "the weight gradient (what non-private training computes for the layer) and of each "
        "formula for the per-sample squared norms; `grouped` = the materialised norm by the "
        "grouped weight-gradient kernel (privgrad's choice off the CPU); `policy picks` = the "
        "formula with the fewest multiply-adds (`per_sample.policy`), and its time as a "
        "ratio to the fastest formula and to the weight gradient. A book-kept layer pays its "
        "norm plus one weight gradient (the clipped sum).",
        "",
        f"| layer | weight gradient ms | {cells} | grouped ms | policy picks | "
        "pick / fastest | pick / weight gradient |",
        "|---|---|" + "---|" * len(FORMULAS) + "---|---|---|---|",
    ]
    for name, wgrad, times, grouped, pick in rows:
        shown = " | ".join(f"{times[n]:.2f}" for n in FORMULAS)
        lines.append(f"| {name} | {wgrad:.2f} | {shown} | {grouped:.2f} | {pick} | "
                     f"{times[pick] / min(times.values()):.2f}× | {times[pick] / wgrad:.2f}× |")
    publish(BEGIN, END, lines)


if __name__ == "__main__":
    main()
