"""Client-level DP: update clipping, DP-FedAvg aggregation, its ledger and adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import privgrad as pg
from privgrad.federated import DPFedAvg, clip_update, update_norm


def updates(k: int, scale: float = 3.0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 5, generator=g, dtype=torch.float64) * scale,
             "b": torch.randn(5, generator=g, dtype=torch.float64) * scale} for _ in range(k)]


def test_clip_update_uses_the_whole_update_norm():
    u = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # norm 5 over both
    clipped, f = clip_update(u, 1.0)
    assert f == pytest.approx(0.2) and update_norm(clipped) == pytest.approx(1.0)
    assert clip_update(u, 10.0)[1] == 1.0 and clip_update({"a": torch.zeros(3)}, 1.0)[1] == 1.0


def test_one_client_moves_the_pre_noise_sum_by_at_most_c():
    agg = DPFedAvg(0.0, max_norm=0.5, num_clients=20, clients_per_round=5, seed=0)
    us = updates(6)
    with_all = agg.aggregate(us).clipped_sum
    for drop in range(6):
        without = agg.aggregate(us[:drop] + us[drop + 1:]).clipped_sum
        diff = math.sqrt(sum(float((with_all[n] - without[n]).square().sum()) for n in with_all))
        assert diff <= 0.5 * (1 + 1e-12)
        assert diff == pytest.approx(0.5, rel=1e-9)  # every update is clipped to exactly C
    r = agg.aggregate(us)
    want = {n: sum(u[n] * min(1.0, 0.5 / update_norm(u)) for u in us) / 5 for n in us[0]}
    for n in want:
        torch.testing.assert_close(r.update[n], want[n])


def test_noise_std_is_sigma_c_over_expected_clients():
    agg = DPFedAvg(1.3, max_norm=0.7, num_clients=100, clients_per_round=10)
    big = [{"w": torch.randn(400, 300, dtype=torch.float64)} for _ in range(3)]
    r = agg.aggregate(big)
    noise = r.update["w"] - r.clipped_sum["w"] / 10
    assert abs(float(noise.std()) / (1.3 * 0.7 / 10) - 1) < 0.03
    torch.testing.assert_close(noise * 10, r.noise["w"])
    assert torch.equal(r.update["w"], (r.clipped_sum["w"] + r.noise["w"]) / 10)  # bit for bit


def test_empty_round_is_pure_noise_and_is_recorded():
    agg = DPFedAvg(1.0, max_norm=1.0, num_clients=10, clients_per_round=2, seed=3)
    r = agg.aggregate([], like={"w": torch.zeros(200, 600)})
    assert r.clients == 0 and abs(float(r.update["w"].std()) / 0.5 - 1) < 0.03
    assert agg.rounds == 1 and agg.epsilon(1e-5) > 0
    with pytest.raises(ValueError, match="like="):
        agg.aggregate([])


def test_ledger_accounts_rounds_with_the_same_accountant():
    agg = DPFedAvg(1.1, max_norm=1.0, num_clients=1000, clients_per_round=50, seed=0)
    for _ in range(30):
        agg.aggregate(updates(2))
    assert agg.epsilon(1e-5) == pytest.approx(pg.accounting.epsilon(1.1, 0.05, 30, delta=1e-5))
    ada = DPFedAvg(1.1, num_clients=1000, clients_per_round=50, seed=0,
                   adaptive=pg.clipping.Adaptive(count_noise_multiplier=2.5))
    for _ in range(30):
        ada.aggregate(updates(2))
    eff = (1.1**-2 + 2.5**-2) ** -0.5
    assert ada.epsilon(1e-5) > agg.epsilon(1e-5)
    assert ada.epsilon(1e-5) == pytest.approx(pg.accounting.epsilon(eff, 0.05, 30, delta=1e-5))


def test_poisson_client_sampling():
    agg = DPFedAvg(1.0, max_norm=1.0, num_clients=200, clients_per_round=20, seed=5)
    rounds = [agg.sample() for _ in range(3000)]
    sizes = np.array([len(r) for r in rounds])
    assert abs(sizes.mean() - 20) < 4 * math.sqrt(18 / 3000)
    assert sizes.var() == pytest.approx(200 * 0.1 * 0.9, rel=0.1)
    counts = np.bincount(np.concatenate(rounds), minlength=200) / 3000
    assert np.abs(counts - 0.1).max() < 4.5 * math.sqrt(0.09 / 3000)


@pytest.mark.parametrize(("target", "start"), [(0.5, 1.0), (0.5, 0.01), (0.5, 100.0),
                                               (0.8, 1.0)])
def test_adaptive_client_clip_norm_converges_to_the_target_quantile(target, start):
    """Update norms ~ LogNormal(0, 0.5): the q-quantile is exp(0.5·Φ⁻¹(q))."""
    ada = DPFedAvg(0.0, num_clients=1000, clients_per_round=200, seed=1,
                   adaptive=pg.clipping.Adaptive(target_quantile=target, initial_max_norm=start,
                                                 learning_rate=0.2,
                                                 count_noise_multiplier=10.0))
    g = torch.Generator().manual_seed(2)
    history = []
    for _ in range(250):
        k = len(ada.sample())
        norms = torch.exp(0.5 * torch.randn(k, generator=g, dtype=torch.float64))
        ada.aggregate([{"u": torch.tensor([float(n)])} for n in norms], like={"u": torch.zeros(1)})
        history.append(ada.max_norm)
    want = math.exp(0.5 * float(torch.distributions.Normal(0, 1).icdf(torch.tensor(target))))
    settled = float(np.mean(history[-50:]))
    assert settled == pytest.approx(want, rel=0.08)
    assert min(history[-50:]) > 0.5 * want  # no collapse toward 0


def test_state_dict_round_trip_and_errors():
    a = DPFedAvg(1.0, num_clients=50, clients_per_round=10, seed=4,
                 adaptive=pg.clipping.Adaptive(count_noise_multiplier=2.0))
    for _ in range(3):
        a.aggregate(updates(3))
    b = DPFedAvg(1.0, num_clients=50, clients_per_round=10, seed=99,
                 adaptive=pg.clipping.Adaptive(count_noise_multiplier=2.0))
    b.load_state_dict(a.state_dict())
    assert b.max_norm == a.max_norm and b.epsilon(1e-5) == a.epsilon(1e-5)
    assert b.sample() == a.sample()
    ra, rb = a.aggregate(updates(2)), b.aggregate(updates(2))
    assert torch.equal(ra.update["w"], rb.update["w"]) and a.max_norm == b.max_norm
    with pytest.raises(ValueError, match="exactly one"):
        DPFedAvg(1.0, num_clients=5, clients_per_round=2)
    with pytest.raises(ValueError, match="clients_per_round"):
        DPFedAvg(1.0, max_norm=1.0, num_clients=5, clients_per_round=6)
    bad = updates(2)
    bad[1]["w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="update 1 has a NaN"):
        a.aggregate(bad)
    with pytest.raises(ValueError, match="not floating point"):
        a.aggregate([{"w": torch.zeros(2), "steps": torch.tensor([3])}])
    with pytest.raises(ValueError, match="update 1 does not have"):
        a.aggregate([updates(1)[0], {"w": torch.zeros(2)}])


def aligned_huge(k: int, dtype: torch.dtype, sign: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """``k`` updates along one direction with norms 30 to 60 (every one clipped)."""
    base = torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base /= base.norm()
    scale = 30 * (1 + torch.arange(k, dtype=torch.float64) / k)
    return [{"w": (sign * s * base).to(dtype)} for s in scale]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_one_client_moves_the_clipped_sum_by_at_most_c_in_every_dtype(dtype):
    # Oracle: the sensitivity itself, measured in float64. Summed in 16 bits (35dd941) one
    # client moved the sum by 1.4·C (float16, K = 2048) or by 0 (bfloat16 saturates).
    C, K = 1.0, 2048
    us = aligned_huge(K, dtype)
    opposite = aligned_huge(K, dtype, sign=-1.0)

    def clipped(ups):
        r = DPFedAvg(0.0, max_norm=C, num_clients=10 * K, clients_per_round=K,
                     seed=0).aggregate(ups)
        assert r.update["w"].dtype == dtype
        return r.clipped_sum["w"].double()

    full = clipped(us)
    for j in (0, 1, K // 2, K - 1):
        removed = float((full - clipped(us[:j] + us[j + 1:])).norm())
        assert removed <= C * (1 + 1e-3)
        assert removed >= C * (1 - 1e-3)  # an update far above C adds exactly C
        replaced = float((full - clipped(us[:j] + [opposite[j]] + us[j + 1:])).norm())
        assert 2 * C * (1 - 1e-2) <= replaced <= 2 * C * (1 + 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_updates_are_clipped_summed_and_noised_in_float32(dtype):
    us = aligned_huge(8, dtype)
    clipped, f = clip_update(us[0], 1.0)
    assert clipped["w"].dtype == torch.float32 and f == pytest.approx(1 / update_norm(us[0]))
    assert update_norm(clipped) <= 1 + 1e-6  # 16 bits would allow C·(1 + 2^-8)
    r = DPFedAvg(0.5, max_norm=1.0, num_clients=80, clients_per_round=8, seed=0).aggregate(us)
    assert r.clipped_sum["w"].dtype == r.noise["w"].dtype == torch.float32
    want = sum(u["w"].double() / update_norm(u) for u in us)
    torch.testing.assert_close(r.clipped_sum["w"].double(), want, rtol=1e-6, atol=1e-6)
    # one rounding into the update's dtype, after the noise and the division
    assert torch.equal(r.update["w"], ((r.clipped_sum["w"] + r.noise["w"]) / 8).to(dtype))
