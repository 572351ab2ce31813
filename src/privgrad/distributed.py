"""torch.distributed integration: clipped sums summed across ranks, noise added once.

``DPEngine`` built after ``torch.distributed.init_process_group`` (gloo on CPU, NCCL on
GPU; world size > 1) runs data-parallel: every rank computes the per-sample norms, clip
factors and clipped sum of its own samples; the clipped sums are summed across ranks in
bucketed all-reduces (a few large calls, not one per parameter); then every rank adds the
SAME Gaussian noise (std ``σ·C``, once in total) and writes the same ``p.grad``, so the
replicas never drift.

Why the same noise on every rank, rather than ``σC/√world`` on each: the sum of the
per-rank shares has the right total variance, but each rank could subtract its own share
and see the sum with less noise than accounted; with one draw shared by all ranks, every
rank's trace holds the exact global ``clipped_sum`` and ``noise``, ``p.grad`` is bitwise
identical everywhere, and no all-reduce of noise is needed. The draw is shared by
broadcasting a fresh 63-bit seed from rank 0 each step (``seed=None``: OS entropy on rank
0) or by the common integer seed. All ranks are trusted parts of one curator: they see
raw data anyway; the noise protects what is released (the model).

``expected_batch_size`` and ``sample_rate`` are global (``q·N`` for the whole dataset);
``privgrad.data.PoissonLoader(..., shard=(rank, world))`` samples each rank's shard with
the same ``q``, so the union of the ranks' batches is a Poisson sample of the dataset and
the ledger (identical on every rank) is right. A ``DistributedDataParallel`` model is
unwrapped: privgrad all-reduces the clipped sums itself, so DDP's own gradient
synchronisation is switched off for it (as inside ``no_sync()``), never run as wasted
work; DDP still broadcasts the initial parameters from rank 0 when it is built.

The ranks must hold the same privacy-relevant settings: σ, ``sample_rate``,
``expected_batch_size``, the clipping rule with its groups, thresholds and current
``C`` (``Adaptive``'s parameters too), the trainable parameters, and at construction the
seed. They are compared exactly, as the step uses them, when the engine is built and at
every step (they may change between steps, on every rank alike), in the one small
all-reduce that also agrees on failures and the step count; if any differs no rank steps
and every rank raises ``SettingsMismatchError`` naming it with each rank's value
(``privgrad.agreement``). ``mode`` is performance-only and may differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from privgrad.agreement import SettingsMismatchError  # noqa: F401 (public here too)
from privgrad.noise import fresh_seed

BUCKET_BYTES = 25 * 2**20  # the size DDP uses by default


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return world()[1] > 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``, with DDP's gradient sync turned off.

    Args:
        model: Any module, possibly DDP-wrapped.

    Returns:
        The module whose parameters privgrad handles (``model.module`` for DDP).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = False  # what no_sync() sets, for good
        return model.module
    return model


def all_reduce_sum(
    tensors: Mapping[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES
) -> dict[str, torch.Tensor]:
    """Sums tensors across ranks, packed into flat buckets of at most ``bucket_bytes``.

    Args:
        tensors: ``{name: tensor}``, the same names, shapes and dtypes on every rank.
        bucket_bytes: Bucket capacity (a tensor larger than it gets a bucket of its own).

    Returns:
        ``{name: sum over ranks}`` (new tensors).
    """
    out: dict[str, torch.Tensor] = {}
    for names in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[n].reshape(-1) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for n in names:
            size = tensors[n].numel()
            out[n] = flat[offset:offset + size].view_as(tensors[n])
            offset += size
    return {n: out[n] for n in tensors}


def _buckets(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Names grouped into buckets of one dtype and device, in order."""
    buckets: list[list[str]] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[str], int]] = {}
    for n, t in tensors.items():
        key = (t.dtype, t.device)
        names, used = open_.get(key, ([], 0))
        size = t.numel() * t.element_size()
        if names and used + size > bucket_bytes:
            buckets.append(names)
            names, used = [], 0
        open_[key] = (names + [n], used + size)
    buckets.extend(names for names, _ in open_.values() if names)
    return buckets


def shared_seed(device: torch.device) -> int:
    """A fresh 63-bit seed from rank 0's OS entropy, the same on every rank.

    Args:
        device: Where the broadcast tensor lives (a CUDA device for NCCL).

    Returns:
        The seed.
    """
    seed = fresh_seed()
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def sum_scalar(value: float, device: torch.device) -> float:
    """Sums one number across ranks (in float64).

    Args:
        value: This rank's value.
        device: Where the reduction happens (a CUDA device for NCCL).

    Returns:
        The sum over ranks.
    """
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())
