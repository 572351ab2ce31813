"""Poisson sampling into logical batches, split into physical batches that fit in memory.

The accountant (``privgrad.accounting``) assumes Poisson sampling: at every step each of
the ``N`` records joins the logical batch independently with probability ``q``. Batch
sizes are therefore ``Binomial(N, q)`` — they vary, and empty batches occur (the engine
then releases pure noise). One epoch is ``round(1/q)`` logical steps. A logical batch is
handed out as physical batches of at most ``max_physical_batch_size`` samples, to be fed
to ``DPEngine.accumulate`` one at a time before one ``DPEngine.step``::

    loader = PoissonLoader(dataset, expected_batch_size=256, max_physical_batch_size=64)
    engine = DPEngine(model, σ, C, expected_batch_size=loader.expected_batch_size,
                      sample_rate=loader.sample_rate)
    for batch in loader:                 # one logical step
        optimizer.zero_grad()
        for x, y in batch:               # its physical batches (none if it is empty)
            engine.accumulate(loss_fn(model(x), y))
        engine.step()
        optimizer.step()

``ShuffledSampler`` (a shuffled pass in fixed-size batches, what ``DataLoader(shuffle=True)``
does) stays available for debugging and comparisons, but its privacy is NOT what the
accountant reports: sampling without replacement in fixed-size batches is a different
mechanism, and ε computed for Poisson sampling does not bound it.

Formal guarantees:
    With ``seed=None`` the membership draws come from a generator seeded from OS entropy;
    an integer seed makes the batches reproducible and predictable (NOT secure).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from privgrad.accounting.validation import check_sample_rate
from privgrad.noise import seeded_generator


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for one purpose (e.g. ``"sampler", rank``) derived from a user seed.

    Streams derived for different purposes are unrelated, so one ``--seed`` can drive the
    sampling of every rank and the noise without reusing a random stream.
    """
    text = repr((int(seed), *purpose)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return (0, 1)
    rank, size = (int(v) for v in shard)
    if not 0 <= rank < size:
        raise ValueError(
            f"privgrad.data: shard={shard} is not (rank, world_size) with 0 <= rank < "
            "world_size. Fix: shard=privgrad.distributed.world()."
        )
    return rank, size


def _rate(num_samples: int, sample_rate: float | None, expected_batch_size: float | None) -> float:
    if (sample_rate is None) == (expected_batch_size is None):
        raise ValueError(
            "privgrad.data: pass exactly one of sample_rate (q) and expected_batch_size "
            f"(q·N), got sample_rate={sample_rate}, expected_batch_size={expected_batch_size}. "
            "Fix: PoissonLoader(dataset, expected_batch_size=256)."
        )
    if num_samples <= 0:
        raise ValueError(
            f"privgrad.data: the dataset has {num_samples} samples; Poisson sampling needs "
            "at least one. Fix: check the dataset you pass."
        )
    if expected_batch_size is not None:
        ebs = float(expected_batch_size)
        if not 0 < ebs <= num_samples:
            raise ValueError(
                f"privgrad.data: expected_batch_size={expected_batch_size} must be in "
                f"(0, {num_samples}] (the dataset size). Fix: a smaller expected_batch_size."
            )
        sample_rate = ebs / num_samples
    return check_sample_rate(sample_rate)


class PoissonSampler:
    """Index sets of logical batches: each record joins with probability ``q``, independently.

    Iterating yields ``steps_per_epoch`` index tensors (``int64``, sorted, shape ``(b,)``
    with ``b ~ Binomial(N, q)``, possibly ``0``). The sampler remembers where it is: a
    checkpointed ``state_dict()`` taken between steps resumes mid-epoch with the same
    batches an uninterrupted run would draw.

    Args:
        num_samples: ``N``, the dataset size.
        sample_rate: ``q`` in (0, 1]. Exactly one of ``sample_rate``, ``expected_batch_size``.
        expected_batch_size: ``q·N``.
        steps_per_epoch: Logical steps per pass; default ``round(1/q)`` (one epoch).
        seed: ``None`` for OS entropy (secure); an int for reproducible batches (NOT secure).
        shard: ``(rank, world_size)`` under ``torch.distributed``: this rank samples only
            records ``rank, rank + world_size, ...`` with the same ``q`` (and its own
            generator), so the union over ranks is a Poisson sample of all ``N`` records.
            ``num_samples``, ``expected_batch_size`` and ``len`` stay global.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float | None = None,
        *,
        expected_batch_size: float | None = None,
        steps_per_epoch: int | None = None,
        seed: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.num_samples = int(num_samples)
        self.shard = _check_shard(shard)
        self.sample_rate = _rate(self.num_samples, sample_rate, expected_batch_size)
        steps = max(1, round(1 / self.sample_rate)) if steps_per_epoch is None else steps_per_epoch
        if int(steps) < 1:
            raise ValueError(
                f"privgrad.data: steps_per_epoch={steps_per_epoch} must be >= 1. "
                "Fix: leave it None for one epoch of round(1/q) steps."
            )
        self.steps_per_epoch = int(steps)
        self.position = 0  # logical batches drawn in the current epoch
        rank, size = self.shard
        self._members = torch.arange(rank, self.num_samples, size)
        # ranks must draw independently (one seed would tie record i of each shard together),
        # and apart from the engine's noise even when both are given the same seed
        self._gen = seeded_generator(None if seed is None else derived_seed(seed, "sampler", rank))

    @property
    def expected_batch_size(self) -> float:
        """``q·N``: the normaliser of the private gradient."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.position >= self.steps_per_epoch:  # stopped right after an epoch's last batch
            self.position = 0
        while self.position < self.steps_per_epoch:
            # float64 uniforms: float32 ones are multiples of 2^-24, which would raise the
            # real inclusion rate above q for small q
            u = torch.rand(len(self._members), generator=self._gen, dtype=torch.float64)
            mask = u < self.sample_rate
            self.position += 1
            yield self._members[mask]
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch and the generator state (take it between steps)."""
        return {
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "shard": list(self.shard),
            "steps_per_epoch": self.steps_per_epoch,
            "position": self.position,
            "generator": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``; the dataset size and rate must match."""
        mine = {"num_samples": self.num_samples, "sample_rate": self.sample_rate,
                "shard": list(self.shard)}
        for key, value in mine.items():
            theirs = list(state[key]) if key == "shard" else state[key]
            if theirs != value:
                raise ValueError(
                    f"privgrad.data: the checkpointed sampler has {key}={theirs}, this one "
                    f"{value}. Resuming on other data, another rate or another rank layout "
                    "would break the privacy accounting. Fix: resume with the same dataset, "
                    "batch size and number of processes."
                )
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.position = int(state["position"])
        self._gen.set_state(state["generator"])


class ShuffledSampler:
    """Fixed-size batches of a shuffled pass (``DataLoader(shuffle=True)`` semantics).

    NOT what the accountant assumes: ε reported by ``privgrad.accounting`` is for Poisson
    sampling and does not bound this sampler. For debugging and comparisons only.

    Args:
        num_samples: ``N``.
        batch_size: Samples per batch (the last batch may be smaller).
        seed: ``None`` for OS entropy; an int for reproducible batches.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"privgrad.data: batch_size={batch_size} must be >= 1.")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self._gen = seeded_generator(seed)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.num_samples, generator=self._gen)
        yield from order.split(self.batch_size)


@dataclass(frozen=True)
class LogicalBatch:
    """One logical batch: iterate it for its physical batches (none when it is empty).

    Attributes:
        indices: Dataset indices of its samples, shape ``(b,)``.
        dataset: Where the samples come from.
        max_physical_batch_size: Samples per physical batch at most (``None``: one).
    """

    indices: torch.Tensor
    dataset: Dataset
    max_physical_batch_size: int | None

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __iter__(self) -> Iterator[Any]:
        if len(self) == 0:
            return
        size = self.max_physical_batch_size or len(self)
        for chunk in self.indices.split(size):
            yield _gather(self.dataset, chunk)


def _gather(dataset: Dataset, indices: torch.Tensor) -> Any:
    if isinstance(dataset, TensorDataset):
        return tuple(t[indices] for t in dataset.tensors)
    return default_collate([dataset[i] for i in indices.tolist()])


class PoissonLoader:
    """Poisson-sampled logical batches of a dataset, each split into physical batches.

    Args:
        dataset: A map-style dataset (a ``TensorDataset`` is indexed without copying per
            item).
        sample_rate: ``q``; exactly one of ``sample_rate`` and ``expected_batch_size``.
        expected_batch_size: ``q·N``; pass the same to ``DPEngine``.
        max_physical_batch_size: Bound on the samples per forward/backward (memory);
            ``None`` runs each logical batch at once.
        steps_per_epoch: Logical steps per pass; default ``round(1/q)``.
        seed: ``None`` for OS entropy (secure); an int for reproducible batches (NOT secure).
        shard: ``(rank, world_size)`` to sample only this rank's share of the records
            (see ``PoissonSampler``); ``expected_batch_size`` stays global.
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float | None = None,
        *,
        expected_batch_size: float | None = None,
        max_physical_batch_size: int | None = None,
        steps_per_epoch: int | None = None,
        seed: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(
                f"privgrad.data: max_physical_batch_size={max_physical_batch_size} must be "
                ">= 1 (or None for whole logical batches)."
            )
        self.dataset = dataset
        self.max_physical_batch_size = max_physical_batch_size
        self.sampler = PoissonSampler(
            len(dataset),  # type: ignore[arg-type]
            sample_rate,
            expected_batch_size=expected_batch_size,
            steps_per_epoch=steps_per_epoch,
            seed=seed,
            shard=shard,
        )

    @property
    def sample_rate(self) -> float:
        """``q``: pass it to ``DPEngine(sample_rate=...)`` for the accounting."""
        return self.sampler.sample_rate

    @property
    def expected_batch_size(self) -> float:
        """``q·N``: pass it to ``DPEngine(expected_batch_size=...)``."""
        return self.sampler.expected_batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[LogicalBatch]:
        for indices in self.sampler:
            yield LogicalBatch(indices, self.dataset, self.max_physical_batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (position in the epoch, generator)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``."""
        self.sampler.load_state_dict(state)

