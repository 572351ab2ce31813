"""Poisson sampling: batch sizes are Binomial(N, q), membership is independent, resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import Dataset, TensorDataset

from privgrad.data import PoissonLoader, PoissonSampler, ShuffledSampler


def test_batch_sizes_follow_binomial() -> None:
    N, q, steps = 400, 0.05, 4000
    sampler = PoissonSampler(N, q, steps_per_epoch=steps, seed=0)
    sizes = np.array([len(idx) for idx in sampler])
    assert len(sizes) == steps
    # moments: mean within 4 standard errors, variance within 10%
    assert abs(sizes.mean() - N * q) < 4 * np.sqrt(N * q * (1 - q) / steps)
    assert sizes.var() == pytest.approx(N * q * (1 - q), rel=0.1)
    # chi-square goodness of fit on bins with expected count >= 5
    lo, hi = 8, 32
    observed = [np.sum(sizes <= lo)] + [np.sum(sizes == k) for k in range(lo + 1, hi)]
    observed.append(np.sum(sizes >= hi))
    pmf = stats.binom(N, q)
    expected = [pmf.cdf(lo)] + [pmf.pmf(k) for k in range(lo + 1, hi)] + [pmf.sf(hi - 1)]
    result = stats.chisquare(observed, np.array(expected) * steps)
    assert result.pvalue > 1e-3


def test_every_record_joins_with_probability_q_independently() -> None:
    N, q, steps = 50, 0.2, 5000
    counts = torch.zeros(N)
    pair = 0
    for idx in PoissonSampler(N, q, steps_per_epoch=steps, seed=1):
        counts[idx] += 1
        pair += int(0 in idx.tolist() and 1 in idx.tolist())
    assert (counts / steps - q).abs().max() < 4.5 * np.sqrt(q * (1 - q) / steps)
    assert pair / steps == pytest.approx(q * q, abs=4 * np.sqrt(q * q / steps))


def test_one_epoch_is_one_over_q_steps_and_empty_batches_occur() -> None:
    data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    loader = PoissonLoader(data, 0.1, seed=3)
    assert len(loader) == 10 and loader.expected_batch_size == pytest.approx(1.0)
    batches = [b for _ in range(20) for b in loader]
    assert len(batches) == 200
    empty = [b for b in batches if len(b) == 0]
    assert 40 < len(empty) < 100  # P(empty) = 0.9**10 ≈ 0.35
    assert all(list(b) == [] for b in empty)


def test_physical_batches_partition_the_logical_batch() -> None:
    x = torch.randn(300, 3)
    y = torch.arange(300)
    loader = PoissonLoader(TensorDataset(x, y), expected_batch_size=100,
                           max_physical_batch_size=32, seed=0)
    for batch in loader:
        chunks = list(batch)
        assert all(len(c[1]) <= 32 for c in chunks)
        assert sum(len(c[1]) for c in chunks) == len(batch)
        ys = torch.cat([c[1] for c in chunks])
        assert torch.equal(ys, batch.indices)
        assert torch.equal(torch.cat([c[0] for c in chunks]), x[batch.indices])


class _ListDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_generic_dataset_is_collated_like_tensor_dataset() -> None:
    x, y = torch.randn(60, 4), torch.arange(60)
    fast = PoissonLoader(TensorDataset(x, y), 0.3, max_physical_batch_size=7, seed=5)
    slow = PoissonLoader(_ListDataset(x, y), 0.3, max_physical_batch_size=7, seed=5)
    for a, b in zip(fast, slow, strict=True):
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resume_mid_epoch_draws_the_same_batches() -> None:
    through = PoissonSampler(100, 0.1, seed=7)
    reference = [idx for _ in range(2) for idx in through]
    first = PoissonSampler(100, 0.1, seed=7)
    head = list(first)
    it = iter(first)
    head += [next(it) for _ in range(3)]  # interrupted after 3 steps of the second epoch
    state = first.state_dict()
    resumed = PoissonSampler(100, 0.1, seed=999)
    resumed.load_state_dict(state)
    got = head + list(resumed)
    assert len(got) == 20
    assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


def test_unseeded_samplers_differ() -> None:
    a = [len(i) for i in PoissonSampler(1000, 0.5, steps_per_epoch=5)]
    b = [len(i) for i in PoissonSampler(1000, 0.5, steps_per_epoch=5)]
    assert a != b


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({}, "exactly one"),
        ({"sample_rate": 0.1, "expected_batch_size": 2}, "exactly one"),
        ({"expected_batch_size": 500}, "expected_batch_size"),
        ({"sample_rate": 0.1, "max_physical_batch_size": 0}, "max_physical_batch_size"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    data = TensorDataset(torch.zeros(100, 1))
    with pytest.raises(ValueError, match=match):
        PoissonLoader(data, **kwargs)


def test_resume_on_other_data_is_refused() -> None:
    state = PoissonSampler(100, 0.1, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        PoissonSampler(99, 0.1, seed=0).load_state_dict(state)


def test_shards_form_one_poisson_sample_of_the_whole_dataset() -> None:
    """Union over 3 ranks: disjoint shards, every record at rate q, Binomial(N, q) sizes."""
    N, q, steps, world = 90, 0.2, 3000, 3
    samplers = [PoissonSampler(N, q, steps_per_epoch=steps, seed=4, shard=(r, world))
                for r in range(world)]
    assert all(s.expected_batch_size == pytest.approx(q * N) for s in samplers)
    counts, sizes, both = torch.zeros(N), [], 0
    for batches in zip(*samplers, strict=True):
        assert all(int(i) % world == r for r, b in enumerate(batches) for i in b)
        union = torch.cat(batches)
        counts[union] += 1
        sizes.append(len(union))
        both += int(0 in union.tolist() and 1 in union.tolist())  # records of ranks 0 and 1
    assert (counts / steps - q).abs().max() < 4.5 * np.sqrt(q * (1 - q) / steps)
    assert np.var(sizes) == pytest.approx(N * q * (1 - q), rel=0.12)
    # seeded ranks draw independently (one seed for all would tie record 0 to record 1)
    assert both / steps == pytest.approx(q * q, abs=4 * np.sqrt(q * q / steps))


def test_bad_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="shard"):
        PoissonSampler(10, 0.5, shard=(2, 2))
    state = PoissonSampler(10, 0.5, seed=0, shard=(0, 2)).state_dict()
    with pytest.raises(ValueError, match="number of processes"):
        PoissonSampler(10, 0.5, seed=0, shard=(0, 1)).load_state_dict(state)


def test_resume_right_after_the_last_batch_of_an_epoch() -> None:
    through = PoissonSampler(100, 0.25, seed=2)
    reference = [idx for _ in range(2) for idx in through]
    first = PoissonSampler(100, 0.25, seed=2)
    it = iter(first)
    head = [next(it) for _ in range(4)]  # the epoch's last batch; the loop stops before
    resumed = PoissonSampler(100, 0.25, seed=0)  # the generator notices the end
    resumed.load_state_dict(first.state_dict())
    got = head + list(resumed)
    assert len(got) == 8 and all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


def test_tiny_rates_are_not_rounded_up() -> None:
    """float32 uniforms (multiples of 2^-24) would include each record w.p. >= 6e-8."""
    sampler = PoissonSampler(2**23, 1e-12, steps_per_epoch=8, seed=0)
    assert sum(len(idx) for idx in sampler) == 0  # float32: ~4 expected, P(0) ≈ 2%


def test_derived_seeds_separate_purposes_and_ranks() -> None:
    from privgrad.data import derived_seed

    seeds = {derived_seed(0, "sampler", r) for r in range(4)} | {derived_seed(0, "clients"), 0}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


def test_shuffled_sampler_is_one_pass_of_fixed_size_batches():
    """The non-Poisson alternative: every record exactly once per pass, batches of B."""
    s = ShuffledSampler(10, 4, seed=0)
    batches = list(s)
    assert len(s) == len(batches) == 3 and [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [b.tolist() for b in ShuffledSampler(10, 4, seed=0)] == [b.tolist() for b in batches]
    assert torch.cat(batches).tolist() != list(range(10))  # shuffled (seed 0)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledSampler(10, 0)
