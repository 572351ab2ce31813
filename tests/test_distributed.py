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
    # one agreement at construction, ONE per step (failures, step counts and settings
    # together, a few dozen float64s), then the 8 parameter tensors in one all-reduce
    assert len(sizes) == 3 and max(sizes[:2]) < 100 and sizes[2] == ranks[0]["parameters"]
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
    assert "failed on another rank" in a["step"]
    assert "step 1" in b["step"] and "Fix:" in b["step"]  # its own error, or the other's
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


REFUSED = {  # construction case: what the error must say (setting, rank 0's, rank 1's value)
    "C": ("max_grad_norm (the rule's sensitivity): 1.0 on rank 0; 2.0 on rank 1",),
    "sigma": ("noise_multiplier: 1.0 on rank 0; 1.1 on rank 1",),
    "q": ("sample_rate: 0.01 on rank 0; 0.02 on rank 1",),
    "q None": ("sample_rate: 0.01 on rank 0; None on rank 1",),
    "expected_batch_size": ("expected_batch_size: 16.0 on rank 0; 17.0 on rank 1",),
    "PerLayer thresholds": ("clipping groups and thresholds: 4 groups, C_g from 0.5 to 3.4",),
    "rule": ("clipping rule: Flat on rank 0; Automatic on rank 1",),
    "Adaptive count noise": ("count_noise_multiplier=2.0", "count_noise_multiplier=3.0"),
}


def test_ranks_with_different_privacy_settings_are_refused_at_construction(ranks):
    for r in range(2):
        got = ranks[r]["construction"]
        assert got["same"] == "accepted" and got["mode only"] == "accepted"
        for case, wanted in REFUSED.items():
            kind, message = got[case]
            assert kind == "SettingsMismatchError", (case, got[case])
            assert issubclass(pg.distributed.SettingsMismatchError, pg.PrivgradError)
            for text in wanted:
                assert text in message, (case, message)
            assert "sensitivity 2 while rank 0 reports" in message and "Fix:" in message
            assert "different noise seeds" not in message  # only what differs is named
    # equal sensitivity, other per-group thresholds: named by the groups, not the sensitivity
    assert "sensitivity):" not in ranks[0]["construction"]["PerLayer thresholds"][1]


def test_a_per_step_change_on_one_rank_refuses_the_step_on_every_rank(ranks):
    expected = {"sigma": "noise_multiplier: 1.0 on rank 0; 1.3 on rank 1",
                "q": "sample_rate: 0.01 on rank 0; 0.02 on rank 1",
                "expected_batch_size": "expected_batch_size: 16.0 on rank 0; 17.0 on rank 1",
                "C": "max_grad_norm (the rule's sensitivity): 1.0 on rank 0; 2.0 on rank 1",
                "PerLayer thresholds": "clipping groups and thresholds: 4 groups",
                "Adaptive current C": "max_grad_norm (the rule's sensitivity): ",
                "trainable parameters": "trainable parameters: 8 (names digest "}
    skipped = []
    for case, text in expected.items():
        a, b = ranks[0]["step_changes"][case], ranks[1]["step_changes"][case]
        if isinstance(a, tuple):  # ("skipped", why)
            assert b == a
            skipped.append(f"{case}: {a[1]}")
            continue
        for got in (a, b):
            kind, message = got["refused"]
            assert kind == "SettingsMismatchError", (case, got["refused"])
            assert text in message and "at step 2" in message and "Fix:" in message, message
            assert "the ledger is unchanged" in message
            assert got["ledger_unchanged"] and got["steps"] == (1, 1) and got["grads_none"]
            batch, own, steps, recorded = got["after"]
            # once rank 1 undoes its change, the next step is taken with this step's
            # samples only (the refused step's batches were discarded, not merged)
            assert batch == own == 8 and steps == 2 and recorded
        if case == "Adaptive current C":
            c = a["C"]
            assert f"{c!r} on rank 0; {2 * c!r} on rank 1" in a["refused"][1]
    if skipped:
        pytest.skip("not in this version: " + "; ".join(skipped))


def _norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).pow(2).sum()) for n in a))


@pytest.mark.parametrize("mode", w.MODES)
def test_sensitivity_of_the_distributed_clipped_sum(ranks, mode):
    """Removing (replacing) one of rank 1's samples moves the global clipped sum by at most
    S (2S) for the S every rank reports, with flat and PerLayer clipping: exactly S (2S),
    since all gradients are aligned and the sample removed sits at 1.001·C. Ranks that
    would clip to different thresholds (C = 1.5 and 3) take no step at all: had they
    stepped, removing that sample (unclipped under C = 3) would move the sum by 1.001·1.5."""
    for name, s in (("flat", 1.5), ("per-layer", 2.0), ("mismatched C", 1.5)):
        got = [ranks[r]["sensitivity"][(name, mode)] for r in range(2)]
        if all("refused" in g for g in got):
            assert name == "mismatched C"
            assert all("1.5 on rank 0; 3.0 on rank 1" in g["refused"] for g in got)
            continue
        for r in range(2):  # s: what rank 0 reports
            assert got[r]["S"] == pytest.approx(s, rel=1e-15), (name, got[r]["S"])
            for kind, bound in (("removed", s), ("replaced", 2 * s)):
                delta = _norm(got[r]["full"], got[r][kind])
                assert bound * (1 - 1e-9) <= delta <= bound * (1 + 1e-6), (name, kind, delta)
            for kind in ("full", "removed", "replaced"):  # the global sum, on every rank
                assert _norm(got[0][kind], got[1][kind]) == 0
        zero = {n: 0 * t for n, t in got[0]["full"].items()}
        # 8 samples over both ranks, each clipped to the same vector of norm S
        assert _norm(got[0]["full"], zero) == pytest.approx(8 * s, rel=1e-12)
