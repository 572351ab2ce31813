"""``DPTrainer``: Hugging Face's ``Trainer`` with DP-SGD, accounted, on a privgrad engine.

What changes against HF's ``Trainer`` (everything else — optimiser, scheduler, logging,
callbacks, evaluation, saving — is HF's):

* **Sampling.** One optimiser step is one logical step of a Poisson sample of the train
  set: each example joins independently with probability ``q = L / N``, where the
  expected logical batch ``L`` is ``per_device_train_batch_size ×
  gradient_accumulation_steps``. An epoch is ``round(1/q)`` steps. The logical batch (of
  random size, possibly empty) is cut into physical batches of at most
  ``per_device_train_batch_size`` examples, each fed to ``engine.accumulate``; HF's own
  gradient accumulation is set to 1 (one HF step = one logical step).
* **Losses.** One loss per example (``privgrad.hf.losses``): a sequence's loss is the
  mean over its labelled tokens, ``-100`` ignored; labels are not passed to the model
  (except encoder-decoder models, which build their decoder inputs from them).
* **Clipping.** HF's ``max_grad_norm`` is switched off: it would clip the already private
  gradient. ``C`` is ``PrivacyArguments.max_grad_norm``.
* **Privacy.** ε (at ``delta``) is logged at every logging step; with a target ε training
  stops before the step that would exceed it; ``privacy.json`` (the engine's privacy
  statement) and ``privgrad_state.pt`` (ledger, noise and sampler state) are saved with
  the model and in every checkpoint, and ``train(resume_from_checkpoint=...)`` restores
  them (a checkpoint without them is refused: its ledger would be lost).

Formal guarantee: the released model is (ε, δ)-DP, ε as logged and stated, under
add-or-remove-one-example adjacency, for DP-SGD with Poisson sampling at rate ``q`` and
the engine's noise; ``N`` (through ``q``) and the configuration are treated as public.
Single process only (``world_size == 1``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader

import privgrad as pg
from privgrad.data import PoissonSampler, derived_seed
from privgrad.errors import PrivgradError
from privgrad.hf.arguments import PrivacyArguments
from privgrad.hf.losses import infer_task, per_example_losses
from privgrad.statement import PrivacyStatement

STATEMENT_FILE = "privacy.json"
STATE_FILE = "privgrad_state.pt"
logger = transformers.utils.logging.get_logger(__name__)


class BudgetSpentError(PrivgradError):
    """Another step would exceed the target ε."""


class _IndexLists:
    """A ``PoissonSampler`` as a ``DataLoader`` batch sampler (lists of ints)."""

    def __init__(self, sampler: PoissonSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.sampler:
            yield indices.tolist()


class _EmptyAware:
    """The data collator, with ``{}`` for an empty Poisson batch (no collator takes ``[]``)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, examples: list) -> dict:
        return self.collate(examples) if examples else {}


class _PrivacyBudget(transformers.TrainerCallback):
    """Stops training when the next step would exceed the target ε."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        allowed = self.trainer.allowed_steps
        if allowed is not None and self.trainer.engine.steps >= allowed:
            control.should_training_stop = True
        return control


def steps_within(sigma: float, sample_rate: float, target_epsilon: float, delta: float,
                 accountant: str, start: int = 1) -> int:
    """The most steps at ``(σ, q)`` whose ε at ``delta`` is at most ``target_epsilon``.

    Doubling from ``start``, then bisection; ε is non-decreasing in the steps. Capped at
    ``2^40`` steps (returned if even that many stay within the target).
    """

    def within(steps: int) -> bool:
        return pg.accounting.epsilon(sigma, sample_rate, steps, delta=delta,
                                     accountant=accountant) <= target_epsilon

    if not within(1):
        return 0
    lo, hi = 1, max(2, int(start))
    while within(hi):
        if hi >= 1 << 40:
            return hi
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # within(lo), not within(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)  # PEFT
    return get() if callable(get) else model


def _is_causal_lm(model: torch.nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(_base_model(model)).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _batch_len(inputs: Mapping[str, Any]) -> int:
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("privgrad.hf: a training batch holds no tensor with a batch dimension.")


def _slice(inputs: Mapping[str, Any], n: int, s: slice) -> dict[str, Any]:
    return {k: v[s] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in inputs.items()}


class DPTrainer(transformers.Trainer):
    """HF ``Trainer`` that trains with DP-SGD (see the module docstring).

    Args:
        *args: As for ``transformers.Trainer`` (``model``, ``args``, ``train_dataset``,
            ``data_collator``, ...).
        privacy_args: The privacy settings.
        **kwargs: As for ``transformers.Trainer``.

    Attributes:
        engine: The ``privgrad.DPEngine`` (its ``ledger``, ``epsilon``, traces).
        sample_rate: ``q``.
        logical_batch_size: ``L``, the expected logical batch.
        allowed_steps: The last step a target ε allows (``None`` without a target).
    """

    def __init__(self, *args: Any, privacy_args: PrivacyArguments, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        a, p = self.args, privacy_args
        if a.world_size > 1 or a.n_gpu > 1:
            raise ValueError(
                f"privgrad.hf: DPTrainer runs in one process on one device (world_size="
                f"{a.world_size}, n_gpu={a.n_gpu}). Fix: run one process with "
                "CUDA_VISIBLE_DEVICES set to one GPU.")
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError(
                "privgrad.hf: DPTrainer needs a train_dataset with a length (Poisson sampling "
                "draws each example with probability q = L / N). Fix: pass a map-style dataset.")
        self.privacy_args = p
        self.dataset_size = len(self.train_dataset)
        self.physical_batch_size = a.per_device_train_batch_size
        self.logical_batch_size = a.per_device_train_batch_size * a.gradient_accumulation_steps
        if not 0 < self.logical_batch_size <= self.dataset_size:
            raise ValueError(
                f"privgrad.hf: the logical batch per_device_train_batch_size × "
                f"gradient_accumulation_steps = {self.logical_batch_size} must be in (0, N = "
                f"{self.dataset_size}]. Fix: smaller batch settings.")
        if p.delta >= 1 / self.dataset_size:
            smaller = 10 ** math.floor(math.log10(0.1 / self.dataset_size))
            raise ValueError(
                f"privgrad.hf: delta={p.delta:g} is not below 1/N = {1 / self.dataset_size:g}; "
                "a δ that large permits releasing one example outright. Fix: "
                f"PrivacyArguments(delta={smaller:g}).")
        a.gradient_accumulation_steps = 1  # one HF step = one logical step
        if a.max_grad_norm:
            logger.info("privgrad.hf: TrainingArguments.max_grad_norm=%s is switched off (it "
                        "would clip the private gradient); C is PrivacyArguments."
                        "max_grad_norm.", a.max_grad_norm)
            a.max_grad_norm = 0.0
        self.sample_rate = self.logical_batch_size / self.dataset_size
        steps_per_epoch = max(1, round(1 / self.sample_rate))
        planned = a.max_steps if a.max_steps > 0 else math.ceil(
            a.num_train_epochs * steps_per_epoch)
        sigma = p.noise_multiplier
        if sigma is None:
            sigma = pg.accounting.calibrate_noise(p.target_epsilon, p.delta, self.sample_rate,
                                                  steps=planned, accountant=p.accountant)
            self.allowed_steps: int | None = planned
        elif p.target_epsilon is not None:
            self.allowed_steps = steps_within(sigma, self.sample_rate, p.target_epsilon,
                                              p.delta, p.accountant, start=planned)
        else:
            self.allowed_steps = None
        self._steps_per_epoch = steps_per_epoch
        self.engine = pg.DPEngine(
            self.model, sigma, max_grad_norm=None if p.clipping is not None else p.max_grad_norm,
            expected_batch_size=float(self.logical_batch_size), clipping=p.clipping,
            mode=p.mode, seed=None if p.seed is None else derived_seed(p.seed, "noise"),
            sample_rate=self.sample_rate, self_check=p.self_check)
        self._causal = _is_causal_lm(self.model)
        self._encoder_decoder = bool(getattr(_base_model(self.model).config,
                                             "is_encoder_decoder", False))
        self._sampler: PoissonSampler | None = None
        self._sampler_state: dict | None = None
        self.add_callback(_PrivacyBudget(self))

    # --- data -----------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """Logical Poisson batches (one per optimiser step), collated; ``{}`` when empty."""
        dataset, collate = self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        seed = self.privacy_args.seed
        self._sampler = PoissonSampler(self.dataset_size, self.sample_rate,
                                       steps_per_epoch=self._steps_per_epoch, seed=seed)
        if self._sampler_state is not None:
            self._sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return DataLoader(dataset, batch_sampler=_IndexLists(self._sampler),
                          collate_fn=_EmptyAware(collate),
                          num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory)

    # --- one logical step -------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      *args: Any, **kwargs: Any) -> torch.Tensor:
        """Clips and sums each physical batch, then releases one private step.

        Returns:
            The mean per-example loss of the logical batch (for HF's logs; NOT PRIVATE:
            it is computed from the examples).
        """
        if self.allowed_steps is not None and self.engine.steps >= self.allowed_steps:
            raise BudgetSpentError(
                f"privgrad.hf: step {self.engine.steps + 1} would exceed target_epsilon="
                f"{self.privacy_args.target_epsilon} at delta={self.privacy_args.delta} "
                f"({self.allowed_steps} steps are allowed). Nothing was released. Fix: stop "
                "here, or start a new run with a larger budget or more noise.")
        model.train()
        total = torch.zeros((), device=self.args.device, dtype=torch.float64)
        n = _batch_len(inputs) if inputs else 0
        try:
            for start in range(0, n, self.physical_batch_size):
                chunk = self._prepare_inputs(
                    _slice(inputs, n, slice(start, start + self.physical_batch_size)))
                losses = self._losses(model, chunk)
                self.engine.accumulate(losses)
                total += losses.detach().sum().double()
        except Exception:
            self.engine.discard()
            raise
        self.engine.step()
        return (total / max(n, 1)).float()

    def _losses(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        labels = inputs["labels"] if self._encoder_decoder else inputs.pop("labels", None)
        if labels is None:
            raise ValueError(
                "privgrad.hf: a training batch has no 'labels'. Fix: a data collator that "
                "sets them (DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal "
                "LM), or a dataset with a 'labels' column.")
        with self.compute_loss_context_manager():
            logits = model(**inputs).logits
        task = self.privacy_args.task
        if task == "auto":
            task = infer_task(logits, labels, self._causal)
        return per_example_losses(logits, labels, task)

    # --- logs, statement, checkpoints -------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """HF's logs, with ``epsilon`` (at ``delta``) once a step was released."""
        if self.engine.steps:
            logs = {**logs, "epsilon": self.engine.epsilon(self.privacy_args.delta,
                                                           self.privacy_args.accountant)}
        super().log(logs, *args, **kwargs)

    def privacy_statement(self) -> PrivacyStatement:
        """The engine's privacy statement, ``N`` stated as public."""
        p = self.privacy_args
        deltas = tuple(sorted({p.delta, *p.deltas}, reverse=True))
        return self.engine.privacy_statement(
            deltas=deltas, accountant=p.accountant, dataset_size=self.dataset_size,
            public=("the model architecture, tokenizer and training configuration",))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """HF's ``save_model``, then ``privacy.json`` and ``privgrad_state.pt`` beside it."""
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        out = output_dir or self.args.output_dir
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, STATEMENT_FILE), "w") as f:
            json.dump(self.privacy_statement().to_dict(), f, indent=2)
        state = {"engine": self.engine.state_dict(),
                 "sampler": None if self._sampler is None else self._sampler.state_dict()}
        torch.save(state, os.path.join(out, STATE_FILE))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """HF's ``train``; a resumed run restores the ledger, noise and sampler first."""
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                path = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
            state_file = os.path.join(str(path), STATE_FILE)
            if not os.path.isfile(state_file):
                raise FileNotFoundError(
                    f"privgrad.hf: checkpoint {path} has no {STATE_FILE}, so the privacy "
                    "ledger of the steps it trained would be lost. Fix: resume from a "
                    "checkpoint written by DPTrainer, or start a new run.")
            state = torch.load(state_file, weights_only=False)
            self.engine.load_state_dict(state["engine"])
            self._sampler_state = state["sampler"]
            self.args.ignore_data_skip = True  # the sampler resumes at its own position
        return super().train(resume_from_checkpoint, *args, **kwargs)
