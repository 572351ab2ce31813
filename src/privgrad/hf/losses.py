"""One loss per example for the Hugging Face tasks, whatever the example's length.

DP-SGD clips each example's gradient, so the loss must be a vector with one entry per
example: a sequence's loss is the mean over its own labelled tokens (labels ``-100`` —
padding, prompt tokens — are ignored), never a mean over the batch's tokens, which would
weight an example by its length and tie each example's loss to the others'. With a single
example, each value equals the model's own ``labels=`` loss (tests check it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("auto", "causal_lm", "token", "classification", "regression", "multi_label")
"""``causal_lm``: next-token prediction (labels shifted by one inside, as HF does);
``token``: one label per position (masked LM, token classification, seq2seq decoder);
``classification``: one class per example; ``regression``: one float (``num_labels = 1``)
or a vector per example, squared error; ``multi_label``: float 0/1 targets, binary
cross-entropy averaged over the labels."""

IGNORE = -100


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """``(B,)`` losses of a batch for ``task`` (one of ``TASKS`` other than ``"auto"``).

    Args:
        logits: ``(B, T, V)`` for ``causal_lm`` and ``token``, ``(B, K)`` otherwise.
        labels: ``(B, T)`` ids with ``-100`` ignored; ``(B,)`` classes; ``(B,)`` or
            ``(B, K)`` float targets.
        task: The task.

    Returns:
        ``(B,)`` float32 (or wider) losses. An example without a labelled token has loss 0
        (its gradient is 0: it still counts as a member of the batch, as it must).
    """
    if task in ("causal_lm", "token"):
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        tokens = F.cross_entropy(wide.transpose(1, 2), labels, ignore_index=IGNORE,
                                 reduction="none")
        count = (labels != IGNORE).sum(1)
        return tokens.sum(1) / count.clamp(min=1).to(tokens.dtype)
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if task == "classification":
        return F.cross_entropy(wide, labels, reduction="none")
    if task == "regression":
        target = labels.to(wide.dtype).reshape(wide.shape[0], -1)
        return (wide.reshape(wide.shape[0], -1) - target).square().mean(1)
    if task == "multi_label":
        return F.binary_cross_entropy_with_logits(
            wide, labels.to(wide.dtype), reduction="none").mean(1)
    raise ValueError(f"privgrad.hf: task={task!r} is not one of {TASKS[1:]}.")


def infer_task(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> str:
    """The task of ``task="auto"``, from the shapes (as HF's models decide their loss).

    Args:
        logits: The model's logits.
        labels: The batch's labels.
        causal: Whether the model is a causal language model (labels are shifted).

    Raises:
        ValueError: If the shapes fit no task; the message says which to set.
    """
    if logits.dim() == 3 and labels.dim() == 2 and not labels.is_floating_point():
        return "causal_lm" if causal else "token"
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        return "classification"
    if logits.dim() == 2 and labels.is_floating_point():
        if labels.dim() == 1 or logits.shape[1] == 1:
            return "regression"
        return "multi_label" if ((labels == 0) | (labels == 1)).all() else "regression"
    raise ValueError(
        f"privgrad.hf: cannot tell the task from logits of shape {tuple(logits.shape)} and "
        f"labels of shape {tuple(labels.shape)} ({labels.dtype}). Fix: "
        f"PrivacyArguments(task=...) with one of {TASKS[1:]}."
    )
