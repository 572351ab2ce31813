"""Run records of ``privgrad train``: periodic checkpoints, exact resume after a stop or a kill,
a run identity that refuses another run's files, and no ``--out`` reused by accident.

The oracle of every resume is the same command run without interruption (same ``--seed``):
model, optimizer, engine (privacy ledger, noise generator), samplers, history and the bytes
of ``metrics.jsonl`` must be identical. ``--model mlp --mode ghost`` keeps the formulas fixed
(no timed choice between them), so a run in a subprocess and one in this process agree to
the bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from privgrad.cli import build_parser, checkpoint, main

FAST = ["--seed", "0", "--batch-size", "480", "--epochs", "2", "--model", "mlp",
        "--mode", "ghost"]  # 3 steps per epoch, 6 in all
ONE_STEP = ["--stop-after-steps", "1"]


def _state(out: Path) -> dict:
    return checkpoint.load(out / checkpoint.CHECKPOINT)


def _equal(a: object, b: object) -> bool:
    """Deep equality of checkpoint states (tensors compared exactly, dtype included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _assert_same_run(through: Path, resumed: Path) -> None:
    """``resumed`` ended exactly as the uninterrupted ``through`` (its identity aside)."""
    a, b = _state(through), _state(resumed)
    assert a["engine"]["steps"] == b["engine"]["steps"] > 0
    for part in ("model", "optimizer", "engine", "sampler", "config"):
        assert _equal(a[part], b[part]), part
    for part in ("epochs", "histograms"):
        assert a["history"][part] == b["history"][part], part
    assert (resumed / "metrics.jsonl").read_bytes() == (through / "metrics.jsonl").read_bytes()
    assert b["run"]["metrics"] == a["run"]["metrics"]  # same lines, bytes and digest


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("privgrad train: error: privgrad: ") and "\n" not in err, err
    assert "Traceback" not in err and "KeyError" not in err
    return err


def test_stopped_mid_epoch_then_resumed_equals_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # stopping at the last step (6) keeps the final state without rendering the report
    args = [*FAST, "--clipping", "adaptive", "--max-physical-batch-size", "200"]
    through, out = tmp_path / "through", tmp_path / "resumed"
    assert main(["train", *args, "--out", str(through), "--stop-after-steps", "6"]) == 130
    assert main(["train", *args, "--out", str(out), "--stop-after-steps", "4"]) == 130
    stopped = _state(out)
    assert stopped["engine"]["steps"] == 4 and stopped["sampler"][0]["position"] == 1  # mid-epoch
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert stopped["run"]["identity"]["run_id"] == run_id
    assert stopped["run"]["metrics"]["lines"] == 4 == len(
        (out / "metrics.jsonl").read_bytes().splitlines())
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--stop-after-steps", "6"]) == 130
    assert (f"resuming run {run_id} from its checkpoint at step 4/6 (after 1 of the 3 steps "
            "of epoch 2).") in capsys.readouterr().err
    _assert_same_run(through, out)
    assert _state(out)["run"]["identity"]["run_id"] == run_id  # one run, from start to end


def test_killed_mid_epoch_resumes_exactly_from_the_periodic_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real SIGKILL (no handler runs): the run loses the steps since its last checkpoint."""
    args = [*FAST, "--batch-size", "200", "--epochs", "1", "--checkpoint-every-steps", "2",
            "--stop-after-steps", "7"]  # one epoch of 7 steps; stopped at its end: no report
    through, out = tmp_path / "through", tmp_path / "killed"
    cmd = [sys.executable, "-m", "privgrad.cli", "train", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and (
            not metrics.exists() or metrics.read_bytes().count(b"\n") < 3):
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    written = metrics.read_bytes()
    killed = _state(out)
    steps = killed["engine"]["steps"]
    assert steps in (2, 4, 6)  # the last periodic checkpoint before the kill: mid-epoch
    assert killed["sampler"][0]["position"] == steps  # and the sampler with it
    assert main(["train", *args, "--out", str(through)]) == 130
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--stop-after-steps", "7"]) == 130
    notice = capsys.readouterr().err
    assert f"from its checkpoint at step {steps}/7 (after {steps} of the 7 steps" in notice
    _assert_same_run(through, out)
    # the lines of the steps the kill undid are kept aside, and were the same steps' lines
    lines = written.splitlines(keepends=True)
    rolled = out / checkpoint.ROLLED_BACK.format(step=steps)
    assert (f"{len(lines) - steps} metric line(s) written after it" in notice) == rolled.exists()
    if len(lines) > steps:
        assert rolled.read_bytes() == b"".join(lines[steps:])
        whole = [ln for ln in lines[steps:] if ln.endswith(b"\n")]
        assert whole == (through / "metrics.jsonl").read_bytes().splitlines(True)[
            steps:steps + len(whole)]


def test_a_foreign_checkpoint_or_metrics_file_is_refused_and_nothing_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert main(["train", *FAST, "--out", str(mine), "--stop-after-steps", "4"]) == 130
    assert main(["train", *FAST, "--seed", "1", "--out", str(other),
                 "--stop-after-steps", "2"]) == 130
    ids = [json.loads((d / "run.json").read_text())["run_id"] for d in (mine, other)]
    record = {p.name: p.read_bytes() for p in mine.iterdir()}
    own_checkpoint, own_metrics = record["checkpoint.pt"], record["metrics.jsonl"]
    capsys.readouterr()

    shutil.copy(other / "checkpoint.pt", mine / "checkpoint.pt")  # another run's ledger
    assert main(["train", "--resume", str(mine)]) == 2
    err = _one_line_error(capsys)
    assert "another run's checkpoint" in err and ids[0] in err and ids[1] in err
    assert str(mine / "checkpoint.pt") in err and "Fix:" in err
    assert (mine / "metrics.jsonl").read_bytes() == own_metrics  # not truncated to step 2
    (mine / "checkpoint.pt").write_bytes(own_checkpoint)

    foreign = {"another run's": (other / "metrics.jsonl").read_bytes(),
               "not metrics": b'{"foo": 1}\n' * 5,
               "truncated": own_metrics[:-30],
               "edited": own_metrics.replace(b'"step": 2', b'"step": 7')}
    for why, data in foreign.items():
        (mine / "metrics.jsonl").write_bytes(data)
        assert main(["train", "--resume", str(mine)]) == 2, why
        err = _one_line_error(capsys)
        assert f"{mine / 'metrics.jsonl'} does not begin with the 4 line(s)" in err, why
        assert ids[0] in err and "Fix:" in err
        assert {p.name: p.read_bytes() for p in mine.iterdir()} == {
            **record, "metrics.jsonl": data}, why  # nothing written, nothing moved
    (mine / "metrics.jsonl").write_bytes(own_metrics)
    assert main(["train", "--resume", str(mine), "--stop-after-steps", "6"]) == 130  # its own
    (mine / "metrics.jsonl").write_bytes(b'{"foo": 1}\n' * 6)
    capsys.readouterr()
    assert main(["train", "--resume", str(mine)]) == 2  # all steps done: only the report left
    assert "does not begin with the 6 line(s)" in _one_line_error(capsys)
    assert not (mine / "report.html").exists() and not (mine / "summary.json").exists()


def test_an_out_holding_any_record_file_is_not_reused_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    donor = tmp_path / "donor"
    assert main(["train", *FAST, "--out", str(donor), *ONE_STEP]) == 130
    (donor / "summary.json").write_text("{}\n")  # stand-ins: written when a run finishes
    (donor / "report.html").write_text("<html></html>\n")
    (donor / checkpoint.ROLLED_BACK.format(step=0)).write_text("{}\n")
    record = {p.name: p.read_bytes() for p in donor.iterdir()}
    assert len(record) == len(checkpoint.RECORD) + 1
    capsys.readouterr()
    for name, data in record.items():
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).write_bytes(data)
        for argv in (["train", *FAST, "--out", str(out)],  # a new run, and a resumed one
                     ["train", "--resume", str(donor), "--out", str(out)]):
            assert main(argv) == 2, (name, argv)
            err = _one_line_error(capsys)
            assert f"{out} already holds a run" in err and name in err and "--overwrite" in err
            assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == data
    out = tmp_path / "full"
    shutil.copytree(donor, out)
    assert main(["train", *FAST, "--out", str(out), "--overwrite", *ONE_STEP]) == 130
    (previous,) = (out / checkpoint.PREVIOUS).iterdir()
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == record  # kept, not deleted
    assert previous.name.endswith(json.loads(record["run.json"])["run_id"][:8])
    assert "moved the earlier record (run.json, " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [checkpoint.PREVIOUS, "run.json", "metrics.jsonl", "checkpoint.pt"])
    assert _state(out)["run"]["identity"]["run_id"] != json.loads(record["run.json"])["run_id"]


def test_a_run_killed_before_its_first_checkpoint_is_not_restarted_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out), "--stop-after-steps", "2"]) == 130
    (out / "checkpoint.pt").unlink()  # what a kill before the first checkpoint leaves
    record = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(record) == ["metrics.jsonl", "run.json"]
    capsys.readouterr()
    assert main(["train", *FAST, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "already holds a run" in err and "--resume" not in err and "--overwrite" in err
    assert main(["train", "--resume", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"{out} holds a run's record (run.json, metrics.jsonl) but no checkpoint.pt" in err
    assert f"--out {out} --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == record  # metrics not erased
    assert main(["train", *FAST, "--out", str(out), "--overwrite", *ONE_STEP]) == 130
    (previous,) = (out / checkpoint.PREVIOUS).iterdir()
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == record


def test_checkpoint_schedule_and_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = [100.0]
    every_minute = checkpoint.Schedule(clock=lambda: now[0])  # the CLI's default
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert train.get_default("checkpoint_every_seconds") == every_minute.every_seconds == 60.0
    now[0] = 159.9
    assert not every_minute.due(1)
    now[0] = 160.0
    assert every_minute.due(2)
    every_minute.saved()
    assert not every_minute.due(3)
    by_count = checkpoint.Schedule(every_steps=3, every_seconds=None)
    assert [s for s in range(1, 10) if by_count.due(s)] == [3, 6, 9]
    for option, value, match in [("--checkpoint-every-steps", "0", "must be a number of steps"),
                                 ("--checkpoint-every-seconds", "0", "must be > 0"),
                                 ("--checkpoint-every-seconds", "nan", "must be > 0"),
                                 ("--stop-after-steps", "-1", "must be a number of steps")]:
        assert main(["train", *FAST, option, value, "--out", str(tmp_path / "o")]) == 2
        assert f"{option} {match}" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
