"""Token ids shared by every sample of a batch, given to an embedding once for all.

Position ids are commonly passed to a position embedding as ``(1, T)`` (Hugging Face's
GPT-2, BERT and DistilBERT build them that way, or slice a registered ``(1, max)``
buffer) or as ``(T,)`` (nanoGPT's ``wpe(torch.arange(T))``), and the ``(1, T, d)`` or
``(T, d)`` output is added to the ``(B, T, d)`` token embeddings by broadcasting. The
gradient of such an output is already summed over the batch, so no per-sample gradient of
the embedding can be recovered from it. Given as ``(B, T)`` instead — the same ids for every
sample — the embedding's output is ``(B, T, d)``, every broadcasting consumer computes the
same values, and each sample's gradient reaches the embedding on its own row: exact.
"""

from __future__ import annotations

import torch


def shared_ids(ids: object, batch_size: int | None) -> torch.Tensor | None:
    """``ids`` expanded to the batch when they are shared by all samples, else ``None``.

    Shared: integer ids of shape ``(1, ...)`` in a batch of ``B > 1``, or a 1-D ``(T,)``
    with ``T != B`` (a 1-D tensor of length ``B`` is taken as one id per sample, as an
    embedding of class labels has it). Anything else is left as it is; a call whose
    first dimension is not ``B`` is then refused when the batch is checked.

    Args:
        ids: An embedding's input.
        batch_size: ``B`` of the forward it is called in (the leading dimension of the
            model's first tensor input), ``None`` if unknown.

    Returns:
        ``(B, ...)`` ids (a contiguous copy), or ``None`` to leave ``ids`` as they are.
    """
    if (batch_size is None or batch_size <= 1 or not isinstance(ids, torch.Tensor)
            or ids.is_floating_point() or ids.is_complex() or ids.dim() == 0):
        return None
    if ids.dim() >= 2 and ids.shape[0] == 1:
        return ids.expand(batch_size, *ids.shape[1:]).contiguous()
    if ids.dim() == 1 and ids.shape[0] != batch_size:
        return ids.unsqueeze(0).expand(batch_size, -1).contiguous()
    return None


def leading_batch(args: tuple, kwargs: dict) -> int | None:
    """``B``: the leading dimension of a forward's first tensor input with one, else ``None``."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    return None
