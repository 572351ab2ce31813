"""``DPEngine``: the thin stateful shell around privgrad's pure per-sample core.

The engine holds the configuration, the noise source and the step count; it records
layer inputs through ``per_sample.capture``, calls the core, writes ``p.grad`` and returns
a ``StepTrace``. The model is never wrapped: its class, forward and ``state_dict`` keys are
unchanged (only forward hooks are added; ``engine.close()`` removes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from privgrad import agreement, distributed, guards, validate
from privgrad.accounting import PrivacyLedger
from privgrad.accounting.validation import check_sample_rate
from privgrad.clipping import (
    Adaptive,
    Automatic,
    ClipPlan,
    ClipRule,
    Flat,
    PerLayer,
    adaptive_next,
    released_noise_multipliers,
)
from privgrad.errors import GradientStateError, PrivgradError
from privgrad.noise import NoiseSource
from privgrad.per_sample.capture import Capture, GradAccumulationGuard
from privgrad.per_sample.layer_io import (
    check_batch_sizes,
    functional_snapshot,
    materialize,
    output_grads,
    versions,
)
from privgrad.per_sample.layout import Verified
from privgrad.per_sample.units import plan_units
from privgrad.statement import DEFAULT_DELTAS, PrivacyStatement, build_statement
from privgrad.step.clip_batch import (
    KEEPABLE,
    BatchResult,
    clip_batch,
    self_check_rtol,
    self_check_samples,
    self_check_weights,
)
from privgrad.step.release import release
from privgrad.trace import KEEP_OPTIONS, Segment, StepTrace

MODES = ("auto", "ghost", "materialize", "vmap")


class DPEngine:
    """Differentially private gradients for any ``nn.Module``, with every stage visible.

    ``backward(losses)`` writes ``p.grad = (sum_i f_i g_i + N(0, σ²S²)) / expected_batch_size``
    for every trainable parameter, where ``g_i`` is sample ``i``'s gradient, ``f_i`` its
    clip factor and ``S`` the sensitivity of the clipping rule (``max_grad_norm`` for flat
    clipping), then any ``torch.optim`` optimizer can step.

    Formal guarantees:
        Each call of ``backward`` is one Gaussian mechanism with L2 sensitivity ``S`` on the
        clipped sum and noise std ``σS`` (add/remove-one-sample adjacency). With Poisson
        sampling at rate ``q`` the step is a Poisson-subsampled Gaussian mechanism with
        noise multiplier ``σ``. Only ``p.grad`` (``trace.private_grad``) is private; every
        other field of the returned trace is NOT.

    Distributed: built after ``torch.distributed.init_process_group`` (world size > 1),
    each rank clips its own samples, the clipped sums are all-reduced in buckets, every
    rank adds the same noise once and writes the same ``p.grad`` (see
    ``privgrad.distributed``). A rank's trace holds its own samples' norms and factors, and
    the global ``clipped_sum`` and ``noise``. Every rank must call ``step`` (or
    ``backward``) for every logical step, with an empty batch if it has no samples.

    Args:
        model: Any ``nn.Module``; never wrapped. Build the engine before the forward pass.
            A ``DistributedDataParallel`` model is unwrapped and its own gradient
            all-reduce switched off (privgrad sums the clipped gradients itself).
        noise_multiplier: ``σ >= 0`` (0 is non-private).
        max_grad_norm: ``C`` for flat clipping; leave ``None`` when ``clipping`` is given.
        expected_batch_size: The normaliser of the private gradient (``q·N`` under Poisson
            sampling), a privacy-relevant constant, never the realised batch size.
        clipping: A rule from ``privgrad.clipping`` (``PerLayer``, ``Automatic``, ...).
        mode: ``"auto"`` (book-keeping; per layer the exact norm formula with the fewest
            FLOPs, ``per_sample.policy``; a layer whose per-sample gradients are small,
            ``per_sample.ghost.DENSE_ELEMENTS`` and per sample at most twice its input and
            output gradient, is materialised instead) | ``"ghost"`` (book-keeping of every
            layer with a rule, small ones too) | ``"materialize"`` (every
            per-sample gradient) | ``"vmap"`` (torch.func for every layer): performance
            only, the result is the same in every mode up to floating-point rounding, and
            bit for bit the same in every run for a given mode (no timing decides).
        seed: ``None`` for noise from OS entropy; an int for reproducible noise that is NOT
            secure.
        sample_rate: ``q``, the probability that a sample joins a logical batch (Poisson
            sampling: ``expected_batch_size / len(dataset)``). Needed for ``epsilon``.
            ``noise_multiplier`` and ``sample_rate`` may be changed between steps; each
            step is recorded in ``engine.ledger`` with the values it used.
        self_check: Verify, on the first step with at least 2 samples in a physical batch,
            that the per-sample gradients, weighted unequally as clip factors weight
            them, add up to autograd's gradient of the same weighted losses, that sample
            0's is autograd's gradient of ``losses[0]``, that the norms the factors come
            from are those of samples 0's and ``B-1``'s gradients, and that no loss depends
            on another sample's model input (``∂losses[i]/∂x[j] = 0`` for ``i != j``,
            through the model's floating inputs and the outputs of layers fed token ids:
            catches batch statistics or mixup inside the forward and in-batch losses).
            Costs five extra vector-Jacobian products, once. Mixing the samples outside
            the model (in your code before ``model(x)``) cannot be seen and is your
            responsibility; so is all of it with ``self_check=False``.
        keep_clipped_sum: ``True``: every trace holds its step's clipped sum (one
            parameter-sized tensor beside ``p.grad``). ``False`` (memory-bound steps): the
            noise is added into the clipped sum's own tensors, and ``trace.clipped_sum``
            and ``trace.private_grad`` raise "not kept" (``p.grad`` is the private
            gradient); ``keep="clipped_sum"`` holds it for one step.

    Edge cases:
        ==========================  ==================================================
        σ = 0, C = ∞                p.grad = sum of per-sample grads / expected_batch_size
        C = 0                       clipped sum is 0; p.grad is pure noise
        σ > 0, C = ∞                rejected (infinite noise)
        empty batch (B = 0)         p.grad is pure noise / expected_batch_size
        NaN/Inf in a sample         NonFiniteGradientError naming the sample; no step
        zero-norm sample            factor 1
        ==========================  ==================================================
    """

    def __init__(
        self,
        model: nn.Module,
        noise_multiplier: float,
        max_grad_norm: float | None = None,
        expected_batch_size: float | None = None,
        clipping: ClipRule | None = None,
        mode: str = "auto",
        seed: int | None = None,
        sample_rate: float | None = None,
        self_check: bool = True,
        keep_clipped_sum: bool = True,
    ) -> None:
        model = distributed.unwrap(model)
        validate.check(model)
        self.model = model
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        if mode not in MODES:
            raise ValueError(f"privgrad: mode={mode!r} is not one of {MODES}.")
        self.mode = mode
        self._rule = _clip_rule(max_grad_norm, clipping)
        self.distributed = distributed.is_distributed()
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        entropy = (lambda: distributed.shared_seed(self._device)) if self.distributed else None
        self.noise = NoiseSource(seed, entropy)
        self._failed = False  # a physical batch of this step raised (distributed agreement)
        self.self_check = self_check
        self.keep_clipped_sum = keep_clipped_sum
        self._hold = False  # keep="clipped_sum" was asked in this logical step
        self.sample_rate = sample_rate
        self.ledger = PrivacyLedger()
        self.steps = 0
        self._unaccounted = 0  # steps taken without a sample_rate
        self._verified = False  # the first step with B >= 2 is checked against autograd
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._params:
            raise ValueError(
                f"privgrad: {type(model).__name__} has no parameter with requires_grad=True, "
                "so a DPEngine on it would have nothing to train (parameters frozen when the "
                "engine is created are never trained by it). Fix: unfreeze the parameters to "
                "train (p.requires_grad_(True)) before creating the DPEngine."
            )
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.plan: ClipPlan = self.clipping.bind(list(self._params))
        _check_finite_noise(self.noise_multiplier, self.plan.sensitivity, self._params)
        if self.distributed:  # seed, σ, q, normaliser, rule and thresholds: equal on all ranks
            agreement.agree_at_construction(self, seed, self._params, self._device)
        self._capture = Capture(plan_units(model, use_rules=mode != "vmap"), root=model,
                                marking=self_check)
        self._grad_guard = GradAccumulationGuard(self._params, guards.grad_accumulated)
        self._layouts = Verified()  # batch axes checked once per layout (per_sample.layout)
        self._grads = guards.GradLedger()
        self._pending: list[tuple[Segment, BatchResult]] = []  # physical batches of this step

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the clipped sum: ``σ · sensitivity``."""
        return 0.0 if self.noise_multiplier == 0 else self.noise_multiplier * self.plan.sensitivity

    @property
    def noise_multiplier(self) -> float:
        """``σ`` of the next step; may be set between steps (each step records its own)."""
        return self._sigma

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        sigma = _check_sigma(value)
        plan = getattr(self, "plan", None)  # unset while __init__ runs: checked there
        if plan is not None:
            _check_finite_noise(sigma, plan.sensitivity, self._params)
        self._sigma = sigma

    @property
    def sample_rate(self) -> float | None:
        """``q`` of the next step (``None``: its privacy cost is unknown, see ``epsilon``)."""
        return self._sample_rate

    @sample_rate.setter
    def sample_rate(self, value: float | None) -> None:
        self._sample_rate = None if value is None else check_sample_rate(value)

    @property
    def expected_batch_size(self) -> float:
        """The normaliser of the next step's private gradient (a public constant)."""
        return self._ebs

    @expected_batch_size.setter
    def expected_batch_size(self, value: float) -> None:
        self._ebs = _check_ebs(value)

    @property
    def max_grad_norm(self) -> float:
        """The current clipping threshold ``C`` (the rule's sensitivity ``S`` in general).

        May be set between logical steps (a clipping schedule, or an adaptive algorithm
        living outside the engine): the next step clips to it, its noise is ``σ·C``, its
        trace reports it and the ledger records it with the step. Setting it while a
        logical step is being accumulated is refused (its batches were clipped to the old
        threshold). Under ``PerLayer`` (a threshold per group) set ``engine.clipping``.

        A threshold chosen from private data (say, this batch's median norm) is itself a
        release of that data and must be accounted like any other: ``Adaptive`` does it
        with a noisy count that the ledger records; a threshold from a public schedule,
        or from already-released private gradients, costs nothing more.
        """
        return self.plan.sensitivity

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self._rebind(*self._with_threshold(value))

    def _with_threshold(self, value: float) -> tuple[ClipRule, ClipPlan]:
        """The rule and plan of this engine's clipping with its one threshold set to ``value``."""
        rule = self.clipping
        if isinstance(rule, Adaptive):  # the rule keeps its schedule; the plan has C
            return rule, rule.bind(list(self._params), value)
        if isinstance(rule, PerLayer):
            raise ValueError(
                "privgrad: this engine clips with PerLayer thresholds, one per group, and its "
                "max_grad_norm is their total sensitivity sqrt(sum C_g²), so one number does "
                "not say which thresholds to change. Fix: engine.clipping = "
                "pg.clipping.PerLayer({...new thresholds...}) (or PerLayer(c) for c per group)."
            )
        field_name = {Flat: "max_norm", Automatic: "max_norm"}
        rule = dataclasses.replace(rule, **{field_name[type(rule)]: value})
        return rule, rule.bind(list(self._params))

    @property
    def clipping(self) -> ClipRule:
        """The clipping rule; may be replaced between logical steps (see ``max_grad_norm``)."""
        return self._rule

    @clipping.setter
    def clipping(self, rule: ClipRule) -> None:
        if not isinstance(rule, ClipRule):
            raise TypeError(
                f"privgrad: clipping={rule!r} is not a privgrad clipping rule. Fix: "
                "pg.clipping.Flat(1.0), PerLayer({...}), Automatic(1.0) or Adaptive(...)."
            )
        self._rebind(rule, rule.bind(list(self._params)))

    def _rebind(self, rule: ClipRule, plan: ClipPlan) -> None:
        """Installs a new rule and plan between steps, after checking the noise stays finite."""
        if self._pending or self._failed:
            raise GradientStateError(
                f"privgrad: the clipping threshold cannot change in the middle of a logical "
                f"step: {len(self._pending)} physical batch(es) were already clipped to "
                f"C = {self.max_grad_norm:.6g} and the noise of this step must match them. "
                "Fix: change it after engine.step() (or engine.discard()), before the next "
                "logical step's first accumulate()."
            )
        _check_finite_noise(self.noise_multiplier, plan.sensitivity, self._params)
        self._rule, self.plan = rule, plan

    def backward(self, losses: torch.Tensor, keep: Iterable[str] | str = ()) -> StepTrace:
        """Computes the private gradient of one step and writes it to ``p.grad``.

        Equivalent to ``accumulate(losses, keep, retain=True)`` followed by ``step()``: if
        physical batches were accumulated before, they belong to this step too.

        Args:
            losses: Per-sample losses, shape ``(B,)`` (``reduction="none"``).
            keep: What the trace holds: per-sample gradients ``"pre_clip"``,
                ``"post_clip"``, and ``"clipped_sum"`` (held anyway unless the engine was
                built with ``keep_clipped_sum=False``). Per-sample gradients not kept can
                still be asked for later, as long as what the model ran on is unchanged.

        Returns:
            The step's ``StepTrace`` (NOT PRIVATE except ``private_grad``).
        """
        try:
            self.accumulate(losses, keep, retain=True)
        except Exception:
            self.discard()  # the failed batch was the whole logical step
            raise
        return self.step()

    def accumulate(
        self, losses: torch.Tensor, keep: Iterable[str] | str = (), retain: bool = False
    ) -> int:
        """Adds one physical batch to the current logical step (no noise, no ``p.grad``).

        The per-sample gradients are clipped and summed now, so the batch's activations
        can be freed before the next physical batch; ``step()`` then adds the noise once
        and records one privacy event for the whole logical step.

        Args:
            losses: Per-sample losses of this physical batch, shape ``(b,)``.
            keep: What to hold for the step's trace (as in ``backward``).
            retain: Also hold the batch's recorded layer inputs and output gradients, so
                the trace can materialise any of its samples later (costs memory until
                the trace is dropped).

        Returns:
            The number of samples accumulated so far in this logical step.

        Raises:
            GradientStateError: If an earlier physical batch of this logical step failed:
                a logical step with a failed batch is never released. Call ``discard()``
                (or ``step()``, which then raises) to end it first.

        A physical batch that raises (a non-finite sample, a model check) fails its whole
        logical step: every batch accumulated in it is discarded at once, nothing is
        released, the ledger is untouched, and further ``accumulate`` calls are refused
        until ``discard()`` or ``step()`` ends the step, so that the rest of a broken
        Poisson batch is never merged into the next step.
        """
        if self._failed:
            raise GradientStateError(
                "privgrad: a physical batch of this logical step already failed, so the step "
                "was discarded and can no longer be released; accumulating more batches "
                "would merge the rest of that Poisson batch into the next step. Fix: call "
                "engine.discard() (or engine.step(), which raises) to end the failed step, "
                "then accumulate the next logical batch."
            )
        try:
            return self._accumulate(losses, keep, retain)
        except Exception as e:
            discarded = len(self._pending) + 1
            self._pending, self._hold = [], False
            self._capture.take()  # the failed batch's recorded calls and marks go with it
            self._capture.take_marked()
            self._failed = True  # under torch.distributed every rank then refuses this step
            if isinstance(e, PrivgradError):
                raise type(e)(
                    f"{e} This logical step's {discarded} physical batch(es) accumulated so "
                    "far, this one included, were discarded and nothing was released. Fix: "
                    "after engine.accumulate, skip the rest of this logical batch and call "
                    "engine.discard() before the next one (engine.backward does it itself)."
                ) from e
            raise

    def _accumulate(
        self, losses: torch.Tensor, keep: Iterable[str] | str, retain: bool
    ) -> int:
        guards.check_forward_writes(self._capture.take_writes())
        self._capture.watch_passes()  # a hook may write the model during our backward passes
        keep = _check_keep(keep)
        self._hold = self._hold or "clipped_sum" in keep
        losses = guards.check_losses(losses)
        trainable = {n: p for n, p in self._params.items() if p.requires_grad}
        guards.check_any_trainable(trainable)
        if not self._pending:
            self._grads.check(trainable)
        elif set(trainable) != set(self._pending[0][1].layer_sq):
            raise GradientStateError(
                "privgrad: the set of trainable parameters changed between physical batches "
                "of one logical step. Fix: freeze or unfreeze parameters between steps only."
            )
        calls, marked = self._capture.take(), self._capture.take_marked()
        B = losses.shape[0]
        ios = []
        reference = reference_one = None
        checked = B
        mixing: list[guards.Mixing] = []
        if B > 0:
            if not losses.requires_grad:
                raise guards.not_connected(losses)
            if self.self_check and not self._verified:
                checked = self_check_samples(calls, trainable, B)  # all, or a few in 16 bits
                w = self_check_weights(B, checked, losses.device)[:checked].to(losses.dtype)
                reference = _autograd((w * losses[:checked]).sum(), trainable)
                reference_one = _autograd(losses[0], trainable) if B > 1 else None
                mixing = guards.sample_mixing(losses, marked)
            ios = output_grads(losses, calls, self._layouts)
            if not ios:
                raise guards.not_connected(losses)
            check_batch_sizes(ios, B)
        result = clip_batch(ios, self._names, trainable, self.plan, B, self.mode, keep, reference,
                            checked)
        if reference_one is not None:  # samples 0 and B-1: their gradients and their norms
            ends = torch.tensor([0, B - 1], device=losses.device)
            two = materialize(ios, self._names, B, ends)
            rtol = self_check_rtol(ios, trainable)
            guards.check_sample(reference_one, {n: two[n][:1] for n in trainable}, 0, rtol)
            guards.check_norms(result.layer_sq, {n: two[n] for n in trainable}, [0, B - 1], rtol)
            guards.check_no_mixing(mixing, rtol)
            self._verified = True
        guards.check_forward_writes(self._capture.take_pass_writes(), during="backward")
        self._capture.marking = self.self_check and not self._verified
        offset = sum(seg.size for seg, _ in self._pending)
        lazy = retain and len(result.kept) < len(KEEPABLE)
        segment = Segment(offset, B, ios if retain else None, result.kept,
                          functional_snapshot(ios) if lazy else {},
                          versions(ios) if retain else ())
        self._pending.append((segment, result))
        return offset + B

    def discard(self) -> None:
        """Ends the current logical step without releasing anything.

        Drops the physical batches accumulated since the last step and clears a failed
        batch's state; no noise is drawn, ``p.grad`` is untouched and nothing is recorded.
        Under ``torch.distributed`` it is collective: it takes the place of this rank's
        ``step()`` call, and every rank's ``step()`` for this logical step then refuses
        to release it.

        A discarded step releases nothing, but the decision to discard may depend on
        private data (a sample with a non-finite gradient): repair such samples before
        training rather than skipping the steps they break.
        """
        if self.distributed:
            self._failed = True
            with contextlib.suppress(GradientStateError):
                self.step()
            return
        self._pending, self._failed, self._hold = [], False, False

    def step(self) -> StepTrace:
        """Ends the logical step: adds the noise once and writes ``p.grad``.

        ``p.grad = (sum of the clipped sums of the accumulated physical batches + noise) /
        expected_batch_size``, one privacy event is recorded (before ``p.grad`` is
        written), and under ``Adaptive`` clipping the threshold is updated from a noisy
        count of unclipped samples. With nothing accumulated (an empty Poisson batch) the
        gradient is pure noise.

        Returns:
            The ``StepTrace`` of all samples of the logical step (NOT PRIVATE except
            ``private_grad``).
        """
        pending, self._pending = self._pending, []
        hold, self._hold = self.keep_clipped_sum or self._hold, False
        failed, self._failed = self._failed, False
        trainable = {n: p for n, p in self._params.items() if p.requires_grad}
        problem: Exception | None = None
        try:
            self._check_step(pending, trainable)
        except GradientStateError as e:
            problem = e
        if failed:
            problem = problem or GradientStateError(
                f"privgrad: step {self.steps + 1} is not taken: one of its physical batches "
                "failed in accumulate() (see that error), so its batches were discarded and "
                "p.grad is not written; the ledger is unchanged. Fix: repair or drop the "
                "failing samples; the next accumulate() starts a new logical step."
            )
        if self.distributed:  # one collective: failures, step counts, privacy settings
            disagreement = agreement.agree_at_step(
                self, failed or problem is not None, trainable, self._device)
            problem = problem or disagreement
        if problem is not None:
            raise problem
        if not pending:
            empty = clip_batch([], self._names, trainable, self.plan, 0, self.mode)
            pending = [(Segment(0, 0, [], {}, {}), empty)]
        results = [r for _, r in pending]
        released = release(results, trainable, self.noise, self.noise_std,
                           self.expected_batch_size, self.distributed, hold)
        norms = torch.cat([r.total_sq for r in results]).sqrt()
        factors = {g: torch.cat([r.factors[g] for r in results]) for g in results[0].factors}
        max_norm, noise_std = self.max_grad_norm, self.noise_std
        self._record_step(norms)  # before p.grad is written: a step is never taken unrecorded
        for n, p in trainable.items():
            p.grad = released.private[n].to(p.dtype)  # the one rounding of a 16-bit p.grad
            self._grads.record(n, p.grad)
        return StepTrace(
            norms=norms,
            layer_norms={n: torch.cat([r.layer_sq[n] for r in results]).sqrt() for n in trainable},
            clip_factors=factors[next(iter(factors))] if self.plan.is_flat else factors,
            param_clip_factors={n: factors[self.plan.group_of[n]] for n in trainable},
            noise_std=noise_std,
            expected_batch_size=self.expected_batch_size,
            batch_size=len(norms),
            max_grad_norm=max_norm,
            _segments=tuple(seg for seg, _ in pending),
            _noise_draw=released.noise,
            _clipped_sum=released.clipped_sum,
            _names=self._names,
            _shapes={n: p.shape for n, p in trainable.items()},
            _dtypes={n: p.dtype for n, p in trainable.items()},
        )

    def _check_step(self, pending: list, trainable: dict[str, nn.Parameter]) -> None:
        """Raises ``GradientStateError`` if this step must not be taken on this rank."""
        guards.check_any_trainable(trainable)
        if pending and set(trainable) != set(pending[0][1].layer_sq):
            raise GradientStateError(
                "privgrad: the set of trainable parameters changed between accumulate() and "
                "step(); the accumulated physical batches were clipped with the old set, so "
                "they are discarded and no step is taken. Fix: freeze or unfreeze parameters "
                "between logical steps only, then accumulate again."
            )
        if not pending:
            self._grads.check(trainable)

    def _record_step(self, norms: torch.Tensor) -> None:
        rule = self.clipping
        if self.sample_rate is None:
            self._unaccounted += 1
        else:
            self.ledger.record_sampled(
                self.sample_rate, released_noise_multipliers(rule, self.noise_multiplier),
                sensitivity=self.plan.sensitivity)
        self.steps += 1
        if isinstance(rule, Adaptive):
            unclipped = float((norms <= self.max_grad_norm).sum())
            if self.distributed:  # the count over every rank's samples, then one release
                unclipped = distributed.sum_scalar(unclipped, self._device)
            count_noise = self.noise.scalar(rule.count_noise_multiplier)
            new = adaptive_next(rule, self.max_grad_norm, unclipped, count_noise,
                                self.expected_batch_size)
            self.plan = rule.bind(list(self._params), new)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """Privacy spent so far: ε at ``delta`` for every step recorded in the ledger.

        Args:
            delta: Target δ in (0, 1), typically below 1 / len(dataset).
            accountant: ``"pld"`` (tight, default) or ``"rdp"`` (looser upper bound).

        Returns:
            ε; ``inf`` if any step ran with ``noise_multiplier=0``.

        Raises:
            ValueError: If steps were taken without a ``sample_rate``.
        """
        unaccounted = self._unaccounted
        if unaccounted:
            raise ValueError(
                f"privgrad: {unaccounted} step(s) ran without a sample_rate, so their privacy "
                "cost is unknown. Fix: DPEngine(..., sample_rate=expected_batch_size / "
                "len(dataset)) with Poisson sampling (privgrad.data)."
            )
        return self.ledger.epsilon(delta, accountant)

    def privacy_statement(
        self,
        deltas: Iterable[float] | float = DEFAULT_DELTAS,
        public: Iterable[str] | str = (),
        accountant: str = "pld",
        dataset_size: int | None = None,
    ) -> PrivacyStatement:
        """What this engine's ledger proves, for users and auditors (``privgrad.statement``).

        Args:
            deltas: δ values at which ε is stated.
            public: What else the run treats as public (class count, split, feature schema).
            accountant: ``"pld"`` (default) or ``"rdp"``.
            dataset_size: ``N`` when ``sample_rate`` or ``expected_batch_size`` was computed
                from it: ``N`` is then released, and the statement lists it as public.

        Returns:
            A frozen ``PrivacyStatement`` (``to_dict()``, ``to_text()``, ``to_html()``).

        Raises:
            StatementError: If steps were taken without a ``sample_rate``.
        """
        return build_statement(
            self.ledger, clipping=self.clipping, sensitivity=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, deltas=deltas, public=public,
            accountant=accountant, dataset_size=dataset_size,
            unaccounted_steps=self._unaccounted)

    def state_dict(self) -> dict:
        """The engine's state: steps, privacy ledger, noise generator, clip threshold."""
        return {
            "steps": self.steps,
            "unaccounted": self._unaccounted,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "ledger": self.ledger.state_dict(),
            "noise": self.noise.state_dict(),
            "max_grad_norm": self.max_grad_norm,
            "max_norms": dict(self.plan.max_norms),  # {group: C_g}, PerLayer's thresholds
            "expected_batch_size": self.expected_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``: a restored engine reports the same ε.

        Every value is checked before any is restored, so a bad state leaves the engine
        as it was. The threshold is restored when the rule has one (``Flat``,
        ``Automatic``, ``Adaptive``, ``PerLayer`` with one float), e.g. after a schedule
        changed it.
        """
        sigma = _check_sigma(state["noise_multiplier"])
        q = state["sample_rate"]
        q = None if q is None else check_sample_rate(q)
        ebs = _check_ebs(state.get("expected_batch_size", self.expected_batch_size))
        rule, plan = self.clipping, self.plan
        threshold, thresholds = state.get("max_grad_norm"), state.get("max_norms")
        if isinstance(rule, PerLayer):  # the groups' own thresholds, not their total
            if thresholds is not None:
                rule = PerLayer(dict(thresholds))
                plan = rule.bind(list(self._params))
        elif threshold is not None:
            rule, plan = self._with_threshold(threshold)
        _check_finite_noise(sigma, plan.sensitivity, self._params)
        ledger = PrivacyLedger.from_state_dict(state["ledger"])
        self.noise.load_state_dict(state["noise"])
        self.steps = int(state["steps"])
        self._unaccounted = int(state.get("unaccounted", 0))
        self._sigma, self._sample_rate, self._ebs = sigma, q, ebs
        self._rule, self.plan = rule, plan
        self.ledger.load_state_dict(ledger.state_dict())

    def close(self) -> None:
        """Removes privgrad's hooks from the model."""
        self._capture.close()
        self._grad_guard.close()

    def __enter__(self) -> DPEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _autograd(loss: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return dict(zip(params, grads, strict=True))


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(
            f"privgrad: noise_multiplier must be a finite number >= 0, got {sigma}. Fix: pick "
            "one for your budget with pg.accounting.calibrate_noise(...), or 0 for non-private."
        )
    return sigma


def _check_ebs(ebs: float | None) -> float:
    if ebs is None or not float(ebs) > 0 or not math.isfinite(float(ebs)):
        raise ValueError(
            f"privgrad: expected_batch_size must be a positive number, got {ebs}. It is the "
            "fixed normaliser of the private gradient (sample rate × dataset size under "
            "Poisson sampling). Fix: DPEngine(model, ..., expected_batch_size=256)."
        )
    return float(ebs)


NOISE_HEADROOM = 64.0
"""How many standard deviations of noise must fit in the noise's dtype (a standard normal
exceeds 64 with probability below 1e-800)."""


def _check_finite_noise(
    sigma: float, sensitivity: float, params: Mapping[str, nn.Parameter] | None = None
) -> None:
    """Refuses a noise std ``σ·S`` that is infinite or would overflow the noise's dtype.

    The noise of a float64 parameter is float64; of any other, float32 (``release``).
    """
    if sigma > 0 and math.isinf(sensitivity):
        raise ValueError(
            "privgrad: max_grad_norm=inf with noise_multiplier > 0 would add infinite "
            "noise. Fix: a finite max_grad_norm, or noise_multiplier=0 for non-private runs."
        )
    if sigma == 0 or not params:
        return
    wide = all(p.dtype == torch.float64 for p in params.values())
    limit = torch.finfo(torch.float64 if wide else torch.float32).max / NOISE_HEADROOM
    if sigma * sensitivity > limit:
        raise ValueError(
            f"privgrad: the noise std σ·S = {sigma:.6g} × {sensitivity:.6g} = "
            f"{sigma * sensitivity:.6g} does not fit in {'float64' if wide else 'float32'} "
            f"(the noise's dtype; limit {limit:.3g}), so p.grad would be ±inf. Fix: a "
            "clipping threshold on the scale of the gradient norms (e.g. 1.0), or "
            "noise_multiplier=0 for a non-private run."
        )


def _clip_rule(max_grad_norm: float | None, clipping: ClipRule | None) -> ClipRule:
    if clipping is not None and max_grad_norm is not None:
        raise ValueError(
            "privgrad: pass either max_grad_norm (flat clipping) or clipping=..., not both: "
            "the clipping rule carries its own thresholds. Fix: drop max_grad_norm."
        )
    if clipping is not None:
        return clipping
    if max_grad_norm is None:
        raise ValueError(
            "privgrad: no clipping threshold. Fix: DPEngine(model, ..., max_grad_norm=1.0) "
            "or clipping=pg.clipping.PerLayer({...})."
        )
    return Flat(max_grad_norm)


def _check_keep(keep: Iterable[str] | str) -> tuple[str, ...]:
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    bad = [k for k in keep if k not in KEEP_OPTIONS]
    if bad:
        raise ValueError(f"privgrad: keep={bad} not understood; choose from {KEEP_OPTIONS}.")
    return keep
