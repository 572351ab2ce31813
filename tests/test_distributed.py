"""Two gloo processes on CPU: the distributed step equals one process on the union batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_worker as w
import privgrad as pg


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(w.worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2,
                       join=True, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def single_process(mode: str, name: str) -> dict:
    net = w.model()
    engine = pg.DPEngine(net, 0.0, clipping=w.rule(name), expected_batch_size=w.GLOBAL_B,
                         mode=mode, seed=3, sample_rate=0.5)
    out = w.run_steps(net, engine, None)
    out["ledger"] = engine.ledger.state_dict()
    return out


def close(a: dict, b: dict) -> None:
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", w.MODES)
@pytest.mark.parametrize("name", w.RULES)
def test_two_ranks_equal_one_process_on_the_union(ranks, mode, name):
    want = single_process(mode, name)
    for r in range(2):
        got = ranks[r]["scenarios"][(mode, name)]
        for step in range(w.STEPS):
            close(got["grads"][step], want["grads"][step])
            assert got["C"][step] == pytest.approx(want["C"][step], rel=1e-12)
            # a rank's trace holds its own samples
            torch.testing.assert_close(got["norms"][step], want["norms"][step][r::2])
        assert got["ledger"] == want["ledger"]
    if name == "adaptive":  # the threshold moved, driven by the count over both ranks
        assert len({round(c, 12) for c in want["C"]}) == w.STEPS
    clipped = [(n > c).float().mean() for n, c in zip(want["norms"], want["C"], strict=True)]
    assert 0 < min(clipped) and max(clipped) < 1  # some samples clipped, some not


def test_ddp_wrapped_model_is_unwrapped_and_not_reduced_twice(ranks):
    assert all(ranks[r]["ddp_sync_off"] for r in range(2))  # DDP's own all-reduce is off
    want = single_process("auto", "flat")
    for r in range(2):
        for step in range(w.STEPS):
            close(ranks[r]["ddp"]["grads"][step], want["grads"][step])


def test_empty_batch_on_one_rank(ranks):
    net = w.model()
    engine = pg.DPEngine(net, 0.0, clipping=w.rule("flat"), expected_batch_size=w.GLOBAL_B,
                         seed=3)
    x, y = w.data(0)
    engine.backward(F.cross_entropy(net(x), y, reduction="none"))
    want = {n: p.grad for n, p in net.named_parameters()}
    for r in range(2):
        close(ranks[r]["empty"], want)


def test_clipped_sums_travel_in_buckets(ranks):
    sizes = ranks[0]["all_reduce_sizes"]  # engine construction and one step
    big = [n for n in sizes if n > 4]  # the rest: seed and step agreement (2-4 integers)
    assert big == [ranks[0]["parameters"]]  # 8 parameter tensors, one all-reduce
    got = ranks[0]["buckets"]
    assert torch.equal(got["a"], torch.full((5,), 3.0))
    assert torch.equal(got["b"], torch.full((3, 7), 2.0, dtype=torch.float64))
    assert torch.equal(got["c"], torch.full((40,), 2.0))


def test_noise_is_added_once_and_identical_on_every_rank(ranks):
    a, b = ranks[0]["noisy"], ranks[1]["noisy"]
    for step in range(2):
        assert torch.equal(a[step]["grad"], b[step]["grad"])
        assert torch.equal(a[step]["noise"], b[step]["noise"])
        assert torch.equal(a[step]["clipped_sum"], b[step]["clipped_sum"])
        noise = a[step]["grad"] * 8.0 - a[step]["clipped_sum"]
        torch.testing.assert_close(noise, a[step]["noise"])
        assert abs(float(noise.std()) / (1.5 * 0.7) - 1) < 0.03  # σC once, not √2·σC
    assert not torch.equal(a[0]["noise"], a[1]["noise"])  # a fresh shared seed each step
    assert math.isclose(float((a[0]["grad"] - a[0]["clipped_sum"] / 8).std()),
                        1.5 * 0.7 / 8, rel_tol=0.03)


def test_a_failure_on_one_rank_stops_the_step_everywhere(ranks):
    a, b = ranks[0]["agreement"], ranks[1]["agreement"]
    assert "different noise seeds" in a["seeds"] and "different noise seeds" in b["seeds"]
    assert b["accumulate"] == "raised" and "accumulate" not in a
    assert "failed on another rank" in a["step"] and "failed on another rank" in b["step"]
    for r in (a, b):
        assert all(g is None for g in r["grad_after_failure"]) and r["steps_after_failure"] == 0
    net = w.model()  # the next step is the ordinary one over both ranks' samples
    engine = pg.DPEngine(net, 0.0, clipping=w.rule("flat"), expected_batch_size=w.GLOBAL_B,
                         seed=3)
    x, y = w.data(1)
    engine.backward(F.cross_entropy(net(x), y, reduction="none"))
    want = {n: p.grad for n, p in net.named_parameters()}
    close(a["next"], want)
    close(b["next"], want)
