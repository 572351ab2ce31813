"""The privacy statement: what a DP-SGD run proved, read from its ledger.

``build_statement`` turns an engine's ledger and configuration into a ``PrivacyStatement``,
a frozen value for users and auditors: the mechanism, the privacy unit and adjacency, the
sampling, σ, the clipping rule's sensitivity, the number of steps, the accountant, ε at
several δ, and what the guarantee treats as public. ``DPEngine.privacy_statement`` calls
it; ``privgrad train`` writes it into ``summary.json`` and at the top of ``report.html``.

Formal guarantees:
    The statement adds no analysis of its own: every ε is the ledger's, i.e.
    dp_accounting's accountant on exactly the recorded events, under add-or-remove-one
    adjacency. Per-step values (q, σ, the sensitivity S) are read from the ledger's
    entries, so a schedule that changed them between steps is stated as the ranges it
    took. The guarantee covers what is computed from the private gradients alone (the
    trained model), and only if what is listed as public is public.

Edge cases:

=========================  ============================================================
input                      statement
=========================  ============================================================
no step yet                ``steps = 0``, every ε 0, ranges ``None``
σ = 0 in some step         ε = inf (stated as ``inf``)
C = 1e300                  ``1e+300`` (numbers are formatted with ``.6g``, never rounded
                           into ``inf``)
steps without sample_rate  ``StatementError``: their privacy cost is unknown
=========================  ============================================================
"""

from __future__ import annotations

import html
import importlib.metadata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting

from privgrad.accounting import (
    AccountantLike,
    PLDConfig,
    PrivacyLedger,
    RDPConfig,
    resolve_accountant,
    simplify_event,
)
from privgrad.accounting.validation import check_delta
from privgrad.clipping import Adaptive, Automatic, Flat, PerLayer
from privgrad.errors import PrivgradError

__all__ = ["DEFAULT_DELTAS", "PrivacyStatement", "Run", "StatementError", "build_statement",
           "render_html", "render_text"]

DEFAULT_DELTAS = (1e-5, 1e-6, 1e-7)
MAX_SCHEDULE = 20  # runs listed in to_dict(); the ranges always cover every step

_UNIT = "one example (one record of the training data)"
_ADJACENCY = ("add or remove one example: neighbouring datasets differ by the presence of "
              "one example")
_NOT_COVERED = (
    "Covered: what is computed from the private (noised) gradients alone, i.e. the trained "
    "model. NOT covered: anything computed from individual examples (per-sample norms, clip "
    "factors, losses, per-sample gradients, the step trace, metrics, accuracies)."
)
_KEEP_N_PRIVATE = (
    "When q or expected_batch_size is computed from the private dataset size N (q = batch "
    "size / N, as PoissonLoader(expected_batch_size=...) does), N itself is released: "
    "normalising by q·N with a private N is the leak reported against Opacus (issues #571 "
    "and #819). To keep N private, fix q and expected_batch_size as constants before seeing "
    "the data: PoissonLoader(dataset, sample_rate=q) and DPEngine(..., sample_rate=q, "
    "expected_batch_size=E) with E chosen from public knowledge."
)


_PUBLIC_SETTINGS = (
    "the mechanism's settings (σ, the clipping rule and its thresholds, q, "
    "expected_batch_size, the number of steps): the guarantee assumes none was chosen from "
    "the private data, except what the ledger accounts (Adaptive's noisy count)"
)


class StatementError(PrivgradError, ValueError):
    """No truthful statement can be made (e.g. steps whose privacy cost is unknown)."""


@dataclass(frozen=True)
class Run:
    """One ledger entry as stated: ``steps`` consecutive identical releases.

    Attributes:
        steps: How many consecutive occurrences.
        sample_rate: Poisson ``q`` (``None`` if the event is not Poisson-sampled).
        noise_multiplier: σ (effective σ for several Gaussians on one sample).
        sensitivity: The L2 sensitivity ``S`` its noise ``σS`` was calibrated to, if recorded.
        is_step: A training step (``False``: an extra release such as a noisy evaluation).
        event: dp_accounting's description of an event other than a (Poisson) Gaussian.
    """

    steps: int
    sample_rate: float | None
    noise_multiplier: float | None
    sensitivity: float | None
    is_step: bool = True
    event: str = ""


@dataclass(frozen=True)
class PrivacyStatement:
    """What a run's ledger proves (see the module docstring).

    Attributes:
        mechanism: The released mechanism, in words.
        privacy_unit: What one protected unit is.
        adjacency: The neighbouring relation the ε values hold under.
        sampling: How examples join a step.
        sample_rate: ``(min, max)`` of ``q`` over the steps (``None`` before any step).
        noise_multiplier: ``(min, max)`` of σ over the steps.
        sensitivity: ``(min, max)`` of the sensitivity ``S`` (``C`` for flat clipping).
        clipping: The clipping rule, in words.
        expected_batch_size: The normaliser (a public constant) of the next step.
        steps: Training steps recorded.
        schedule: The ledger's runs, oldest first.
        accountant: The accountant, in words.
        epsilons: ``((δ, ε), ...)`` for every step recorded.
        public: What the guarantee treats as public.
        not_covered: What the guarantee does not cover.
        keep_n_private: How to avoid releasing the dataset size.
    """

    mechanism: str
    privacy_unit: str
    adjacency: str
    sampling: str
    sample_rate: tuple[float, float] | None
    noise_multiplier: tuple[float, float] | None
    sensitivity: tuple[float, float] | None
    clipping: str
    expected_batch_size: float
    steps: int
    schedule: tuple[Run, ...]
    accountant: str
    epsilons: tuple[tuple[float, float], ...]
    public: tuple[str, ...]
    not_covered: str = _NOT_COVERED
    keep_n_private: str = _KEEP_N_PRIVATE

    def epsilon(self, delta: float) -> float:
        """The stated ε at ``delta`` (one of ``epsilons``' δ values)."""
        for d, eps in self.epsilons:
            if d == delta:
                return eps
        raise KeyError(f"δ = {delta:.6g} is not stated; stated: {[d for d, _ in self.epsilons]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (the first ``MAX_SCHEDULE`` runs of the schedule)."""

        def span(r: tuple[float, float] | None) -> dict[str, float] | None:
            return None if r is None else {"min": r[0], "max": r[1]}

        return {
            "mechanism": self.mechanism, "privacy_unit": self.privacy_unit,
            "adjacency": self.adjacency, "sampling": self.sampling,
            "sample_rate": span(self.sample_rate),
            "noise_multiplier": span(self.noise_multiplier),
            "sensitivity": span(self.sensitivity), "clipping": self.clipping,
            "expected_batch_size": self.expected_batch_size, "steps": self.steps,
            "accountant": self.accountant,
            "epsilon": [{"delta": d, "epsilon": e} for d, e in self.epsilons],
            "public": list(self.public), "not_covered": self.not_covered,
            "keep_n_private": self.keep_n_private,
            "schedule_runs": len(self.schedule),
            "schedule": [{"steps": r.steps, "sample_rate": r.sample_rate,
                          "noise_multiplier": r.noise_multiplier, "sensitivity": r.sensitivity,
                          "is_step": r.is_step} | ({"event": r.event} if r.event else {})
                         for r in self.schedule[:MAX_SCHEDULE]],
        }

    def to_text(self) -> str:
        """The statement as plain text, one fact per line."""
        return render_text(self.to_dict())

    def to_html(self) -> str:
        """The statement as an HTML ``<section>`` (escaped; no scripts, no external links)."""
        return render_html(self.to_dict())


def build_statement(
    ledger: PrivacyLedger,
    *,
    clipping: object,
    sensitivity: float,
    expected_batch_size: float,
    deltas: Iterable[float] | float = DEFAULT_DELTAS,
    public: Iterable[str] | str = (),
    accountant: AccountantLike = "pld",
    dataset_size: int | None = None,
    unaccounted_steps: int = 0,
) -> PrivacyStatement:
    """Builds the privacy statement of a ledger (a pure function of its arguments).

    Args:
        ledger: The record of what was released (``engine.ledger``).
        clipping: The clipping rule (``engine.clipping``), described in words.
        sensitivity: The rule's current sensitivity (``engine.max_grad_norm``), stated when
            the ledger's entries carry none.
        expected_batch_size: The normaliser (``engine.expected_batch_size``).
        deltas: δ values at which ε is stated.
        public: What else the run treats as public (class count, split, feature schema...).
        accountant: ``"pld"``, ``"rdp"`` or a config object.
        dataset_size: ``N``, when ``q`` or ``expected_batch_size`` was computed from it:
            ``N`` is then released and listed as public.
        unaccounted_steps: Steps taken without a sample rate (their cost is unknown).

    Returns:
        The statement.

    Raises:
        StatementError: If steps were taken without a sample rate, or an argument is invalid.
        PrivacyParameterError: If a δ is not in (0, 1).
    """
    if unaccounted_steps:
        raise StatementError(
            f"privgrad: {unaccounted_steps} step(s) ran without a sample_rate, so their "
            "privacy cost is unknown and no statement can be made. Fix: DPEngine(..., "
            "sample_rate=q) with Poisson sampling (privgrad.data) from the first step."
        )
    deltas = (deltas,) if isinstance(deltas, int | float) else tuple(deltas)
    public = (public,) if isinstance(public, str) else tuple(public)
    if not deltas:
        raise StatementError("privgrad: deltas is empty. Fix: deltas=(1e-5, 1e-6, 1e-7).")
    if not all(isinstance(p, str) for p in public):
        raise StatementError(f"privgrad: public={public!r} must be strings. Fix: "
                             "public=('number of classes K = 10',).")
    if dataset_size is not None and (isinstance(dataset_size, bool)
                                     or not isinstance(dataset_size, int) or dataset_size < 1):
        raise StatementError(f"privgrad: dataset_size={dataset_size!r} must be an int >= 1 "
                             "(the N that q or expected_batch_size was computed from).")
    config = resolve_accountant(accountant)
    runs = tuple(_run(e.event, e.count, e.is_step, e.sensitivity) for e in ledger.entries)
    steps = [r for r in runs if r.is_step]
    recorded = [r.sensitivity for r in steps if r.sensitivity is not None]
    items = [_PUBLIC_SETTINGS]
    if dataset_size is not None:
        items.append(f"the dataset size N = {dataset_size}: q or expected_batch_size was "
                     "computed from it, so N is released (see below how to keep it private)")
    return PrivacyStatement(
        mechanism=_mechanism(clipping),
        privacy_unit=_UNIT,
        adjacency=_ADJACENCY,
        sampling=("Poisson: every example joins each logical step independently with "
                  "probability q"),
        sample_rate=_span([r.sample_rate for r in steps]),
        noise_multiplier=_span([r.noise_multiplier for r in steps]),
        sensitivity=_span(recorded or ([float(sensitivity)] if steps else [])),
        clipping=_clipping(clipping),
        expected_batch_size=float(expected_batch_size),
        steps=ledger.steps,
        schedule=runs,
        accountant=_accountant(config),
        epsilons=tuple((check_delta(d), ledger.epsilon(d, config)) for d in deltas),
        public=tuple(items) + public,
    )



def _run(event: dp_accounting.DpEvent, count: int, is_step: bool,
         sensitivity: float | None) -> Run:
    simple = simplify_event(event)
    if isinstance(simple, dp_accounting.PoissonSampledDpEvent) and isinstance(
            simple.event, dp_accounting.GaussianDpEvent):
        return Run(count, float(simple.sampling_probability),
                   float(simple.event.noise_multiplier), sensitivity, is_step)
    if isinstance(simple, dp_accounting.GaussianDpEvent):  # every example, every time
        return Run(count, 1.0, float(simple.noise_multiplier), sensitivity, is_step)
    return Run(count, None, None, sensitivity, is_step, repr(event))


def _span(values: Sequence[float | None]) -> tuple[float, float] | None:
    known = [v for v in values if v is not None]
    return (min(known), max(known)) if known else None


def _mechanism(rule: object) -> str:
    text = ("DP-SGD: the Poisson-subsampled Gaussian mechanism, once per logical step: "
            "(sum of the sampled examples' clipped gradients + N(0, σ²S²·I)) / "
            "expected_batch_size, the noise added once per step, S the clipping rule's L2 "
            "sensitivity, expected_batch_size a public constant")
    if isinstance(rule, Adaptive):
        text += (f"; with a noisy count of unclipped examples (σ_count = "
                 f"{_g(rule.count_noise_multiplier)}) on the same Poisson sample, accounted "
                 "with the gradient as one Gaussian: the σ stated is that effective σ")
    return text


def _clipping(rule: object) -> str:
    if isinstance(rule, Adaptive):
        return (f"adaptive (Andrew et al. 2021): C follows the {_g(rule.target_quantile)}-"
                f"quantile of the norms from C = {_g(rule.initial_max_norm)}; S = C of each step")
    if isinstance(rule, PerLayer):
        return "per-layer: each group's gradient clipped to its C_g; S = sqrt(Σ_g C_g²)"
    if isinstance(rule, Automatic):
        return f"automatic: g·C/(‖g‖ + {_g(rule.stability)}); S = C"
    if isinstance(rule, Flat):
        return "flat: each example's whole gradient clipped to L2 norm ≤ C; S = C"
    return f"{type(rule).__name__}; S as the rule states it"


def _accountant(config: PLDConfig | RDPConfig) -> str:
    version = importlib.metadata.version("dp-accounting")
    if isinstance(config, RDPConfig):
        return (f"rdp: dp_accounting {version} RdpAccountant (an upper bound, converted to "
                f"(ε, δ) at the best of {len(config.orders)} Rényi orders)")
    grid = ("chosen by privgrad.accounting.suggest_pld_interval"
            if config.value_discretization_interval is None
            else f"{_g(config.value_discretization_interval)}")
    return (f"pld: dp_accounting {version} PLDAccountant (a pessimistic estimate: the "
            f"privacy loss is discretised upwards, on a grid {grid})")


def _g(x: float | None) -> str:
    """A number for people: 6 significant digits, never rounded into ``inf``."""
    return "n/a" if x is None else f"{x:.6g}"


def _range(span: Mapping[str, float] | None) -> str:
    if span is None:
        return "n/a (no step yet)"
    lo, hi = span["min"], span["max"]
    return _g(lo) if lo == hi else f"from {_g(lo)} to {_g(hi)} (changed between steps)"


def _facts(d: Mapping[str, Any]) -> list[tuple[str, str]]:
    eps = "; ".join(f"ε = {_g(e['epsilon'])} at δ = {_g(e['delta'])}" for e in d["epsilon"])
    return [
        ("Mechanism", d["mechanism"]),
        ("Privacy unit", d["privacy_unit"]),
        ("Adjacency", d["adjacency"]),
        ("Sampling", f"{d['sampling']}; q = {_range(d['sample_rate'])}"),
        ("Noise multiplier σ", _range(d["noise_multiplier"])),
        ("Clipping", d["clipping"]),
        ("Sensitivity S", _range(d["sensitivity"])),
        ("Normaliser", f"expected_batch_size = {_g(d['expected_batch_size'])}"),
        ("Steps", str(d["steps"])),
        *([("Schedule", _schedule(d))] if d["schedule_runs"] > 1 else []),
        ("Accountant", d["accountant"]),
        ("Privacy spent", eps + (" (for every step recorded)" if eps else "")),
    ]


def _schedule(d: Mapping[str, Any]) -> str:
    """The ledger's runs, oldest first: ``steps × (q, σ, S)``."""
    runs = [f"{r['steps']} × " + (r["event"] if "event" in r else
                                  f"(q {_g(r['sample_rate'])}, σ {_g(r['noise_multiplier'])}, "
                                  f"S {_g(r['sensitivity'])})")
            + ("" if r["is_step"] else " (not a step)") for r in d["schedule"]]
    more = d["schedule_runs"] - len(runs)
    return "; ".join(runs) + (f"; and {more} more runs" if more else "")


def render_text(d: Mapping[str, Any]) -> str:
    """Plain text of a statement's ``to_dict()`` form."""
    lines = ["Privacy statement"] + [f"{k}: {v}" for k, v in _facts(d)]
    lines += ["Treated as public:"] + [f"  - {p}" for p in d["public"]]
    lines += [d["not_covered"], d["keep_n_private"]]
    return "\n".join(lines) + "\n"


def render_html(d: Mapping[str, Any]) -> str:
    """An HTML ``<section>`` of a statement's ``to_dict()`` form (every value escaped)."""
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _facts(d))
    public = "".join(f"<li>{e(p)}</li>" for p in d["public"])
    return (f'<section class="statement"><h2>Privacy statement</h2><table>{rows}</table>'
            f"<p><b>Treated as public:</b></p><ul>{public}</ul>"
            f"<p>{e(d['not_covered'])}</p><p>{e(d['keep_n_private'])}</p></section>")

