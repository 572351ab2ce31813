"""Self-contained HTML report for a differentially private training run.

The report is a single HTML file with every figure rendered by matplotlib (Agg backend,
no pyplot global state) and embedded as a base64 PNG data URI, so it opens offline.
Nothing in it except the final model is covered by the differential-privacy guarantee;
its top is the run's privacy statement (``privgrad.statement``), saying what is.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from privgrad.cli.checkpoint import atomic_write
from privgrad.statement import render_html

_QUANTILES = ("q05", "q25", "q50", "q75", "q95")
_WARNING = (
    "Warning: everything in this report except the final model is computed from individual "
    "training samples (per-sample gradient norms, clip fractions, losses, accuracies) and is "
    "NOT covered by the differential-privacy guarantee. Do not publish this report if the "
    "training data is sensitive."
)
_CSS = (
    "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    ".warning{background:#fff3cd;border:2px solid #d39e00;padding:1em;font-weight:bold}"
    ".note{color:#666;font-style:italic}img{max-width:100%}"
    ".statement{border:2px solid #2a7a4a;padding:0 1em 1em;margin-bottom:1em}"
)


def _new_figure(width: float, height: float) -> Figure:
    """Creates a figure attached to an Agg canvas.

    Args:
        width: Width in inches.
        height: Height in inches.

    Returns:
        A figure ready to draw on, independent of pyplot state.
    """
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_img(fig: Figure, alt: str) -> str:
    """Renders a figure to an ``<img>`` tag with an embedded PNG data URI.

    Args:
        fig: The figure to render.
        alt: Alternative text for the image.

    Returns:
        The HTML ``<img>`` element.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _note(ax: Axes, text: str) -> None:
    """Writes a centred note on an axes (used for empty or partial data)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def _use_log(values: Sequence[float]) -> bool:
    """Returns whether the positive finite values span more than two decades."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    return bool(pos) and max(pos) / min(pos) > 100.0


def _bins(values: Sequence[float], clip: float, log: bool) -> list[float]:
    """30 bins spanning the values and the threshold, shared by a row's two panels."""
    vals = [float(v) for v in values if math.isfinite(v)] + [clip]
    if log:
        lo = min([v for v in vals if v > 0] or [clip])
        hi = max(max(vals), clip) * 1.0001
        return [lo * (hi / lo) ** (i / 30) for i in range(31)]
    hi = max(vals) * 1.0001 or 1.0
    return [hi * i / 30 for i in range(31)]


def _hist_panel(ax: Axes, values: Sequence[float], clip: float, bins: Sequence[float],
                log: bool, title: str) -> None:
    """Draws one histogram of per-sample norms with the clipping threshold marked.

    Args:
        ax: Target axes.
        values: Per-sample gradient norms.
        clip: Clipping threshold drawn as a vertical line.
        bins: Bin edges (the same for the before and after panels of a snapshot).
        log: Whether to use a logarithmic x axis.
        title: Panel title.
    """
    ax.set_title(title, fontsize=9)
    vals = [float(v) for v in values if math.isfinite(v)]
    if not vals:
        _note(ax, "no samples")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if log:
        vals = [min(max(v, bins[0]), bins[-1]) for v in vals]
        ax.set_xscale("log")
    ax.hist(vals, bins=list(bins), color="tab:blue", alpha=0.8)
    ax.axvline(clip, color="tab:red", linestyle="--", label=f"C = {clip:.6g}")
    ax.legend(fontsize=8)
    ax.set_xlabel("per-sample gradient norm", fontsize=8)


def _histograms_figure(histograms: Sequence[Mapping[str, Any]]) -> Figure:
    """Builds one row of pre/post-clipping histograms per snapshot, on shared bins."""
    fig = _new_figure(9, 2.4 * len(histograms))
    axes = fig.subplots(len(histograms), 2, squeeze=False)
    for row, snap in zip(axes, histograms, strict=True):
        pre, post = list(snap.get("pre", [])), list(snap.get("post", []))
        clip, step = float(snap["max_grad_norm"]), snap["step"]
        log = _use_log(pre + post + [clip])
        bins = _bins(pre + post, clip, log)
        _hist_panel(row[0], pre, clip, bins, log, f"step {step}: before clipping (n={len(pre)})")
        _hist_panel(row[1], post, clip, bins, log, f"step {step}: after clipping (n={len(post)})")
    return fig


def _line_figure(xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str) -> Figure:
    """Builds a simple line plot."""
    fig = _new_figure(8, 3)
    ax = fig.subplots()
    if xs:
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
    else:
        _note(ax, "no data")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig


def _quantile_figure(metrics: Sequence[Mapping[str, Any]]) -> Figure:
    """Builds the pre-clip norm quantile bands with the per-step clip threshold."""
    fig = _new_figure(8, 3.5)
    ax = fig.subplots()
    rows = [m for m in metrics if all(k in m.get("norms_pre", {}) for k in _QUANTILES)]
    if not rows:
        _note(ax, "no data")
        return fig
    steps = [m["step"] for m in rows]
    q = {k: [float(m["norms_pre"][k]) for m in rows] for k in _QUANTILES}
    ax.fill_between(steps, q["q05"], q["q95"], alpha=0.2, color="tab:blue", label="q05–q95")
    ax.fill_between(steps, q["q25"], q["q75"], alpha=0.4, color="tab:blue", label="q25–q75")
    ax.plot(steps, q["q50"], color="tab:blue", label="median")
    ax.plot(steps, [float(m["max_grad_norm"]) for m in rows], color="tab:red",
            linestyle="--", label="clip threshold C")
    if _use_log(q["q05"] + q["q95"]):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("per-sample gradient norm (pre-clip)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _accuracy_figure(epochs: Sequence[Mapping[str, Any]]) -> Figure:
    """Builds train and test accuracy per epoch."""
    fig = _new_figure(8, 3)
    ax = fig.subplots()
    if not epochs:
        _note(ax, "no data")
        return fig
    xs = [e["epoch"] for e in epochs]
    ax.plot(xs, [e["train_accuracy"] for e in epochs], marker="o", label="train")
    ax.plot(xs, [e["test_accuracy"] for e in epochs], marker="s", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _fmt(value: Any) -> str:
    """Formats a summary value for display, escaped for HTML."""
    # floats to 6 significant digits: 1e300 stays 1e+300 (never inf, never 300 digits)
    return html.escape(f"{value:.6g}" if isinstance(value, float) else str(value))


def _summary_table(summary: Mapping[str, Any]) -> str:
    """Renders the run summary as an HTML table."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items()
    )
    return f"<table>{rows}</table>"


def _body(metrics: Sequence[Mapping[str, Any]], histograms: Sequence[Mapping[str, Any]],
          epochs: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """Assembles the HTML body: the privacy statement, the warning, the summary, the figures."""
    statement = summary.get("privacy_statement")
    facts = {k: v for k, v in summary.items() if k != "privacy_statement"}
    parts = [render_html(statement)] if statement is not None else [
        '<p class="note">This run has no privacy statement.</p>']
    parts += [f'<p class="warning">{html.escape(_WARNING)}</p>', "<h2>Summary</h2>",
              _summary_table(facts), "<h2>Per-sample gradient norms</h2>"]
    if histograms:
        parts.append(_to_img(_histograms_figure(histograms), "gradient norm histograms"))
    else:
        parts.append('<p class="note">No histogram snapshots were recorded.</p>')
    steps = [m["step"] for m in metrics]
    parts += ["<h2>Fraction of samples clipped</h2>", _to_img(_line_figure(
        steps, [m["fraction_clipped"] for m in metrics], "step", "fraction clipped"),
        "fraction clipped")]
    finite = [(m["step"], float(m["epsilon"])) for m in metrics
              if math.isfinite(float(m["epsilon"]))]
    parts += ["<h2>Privacy spent (ε)</h2>", _to_img(_line_figure(
        [s for s, _ in finite], [e for _, e in finite], "step", "ε"), "epsilon")]
    if len(finite) < len(metrics):
        parts.append(f'<p class="note">{len(metrics) - len(finite)} step(s) with infinite ε '
                     "are not plotted.</p>")
    parts += ["<h2>Gradient norm quantiles (pre-clip)</h2>",
              _to_img(_quantile_figure(metrics), "norm quantiles"),
              "<h2>Accuracy</h2>", _to_img(_accuracy_figure(epochs), "accuracy")]
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike,
    *,
    metrics: Sequence[Mapping[str, Any]],
    histograms: Sequence[Mapping[str, Any]],
    epochs: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
) -> None:
    """Writes a self-contained HTML training report, atomically.

    Args:
        path: Destination HTML file.
        metrics: One mapping per logical step (step, epoch, loss, epsilon, fraction_clipped,
            batch_size, max_grad_norm, norms_pre, norms_post).
        histograms: Snapshots with ``step``, ``pre``, ``post`` and ``max_grad_norm``.
        epochs: One mapping per epoch (epoch, train_accuracy, test_accuracy, epsilon).
        summary: Flat mapping of run facts shown in a table; its ``privacy_statement``
            (``PrivacyStatement.to_dict()``) is shown first, at the top of the report.
    """
    title = "privgrad training report"
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
           f"<style>{_CSS}</style></head><body><h1>{title}</h1>\n"
           f"{_body(metrics, histograms, epochs, summary)}\n</body></html>\n")
    atomic_write(Path(path), doc.encode("utf-8"))
