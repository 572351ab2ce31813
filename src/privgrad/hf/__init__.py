"""DP fine-tuning of Hugging Face models: ``DPTrainer`` and ``PrivacyArguments``.

Needs the ``[hf]`` extra (``pip install "privgrad[hf]"``)::

    from privgrad.hf import DPTrainer, PrivacyArguments
    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                        data_collator=collator,
                        privacy_args=PrivacyArguments(target_epsilon=8.0, delta=1e-5))
    trainer.train()
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "privgrad.hf needs Hugging Face transformers. Fix: pip install \"privgrad[hf]\"."
    ) from e

from privgrad.hf.arguments import PrivacyArguments
from privgrad.hf.losses import TASKS, per_example_losses
from privgrad.hf.trainer import BudgetSpentError, DPTrainer, steps_within

__all__ = ["TASKS", "BudgetSpentError", "DPTrainer", "PrivacyArguments", "per_example_losses",
           "steps_within"]
