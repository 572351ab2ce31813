"""``privgrad train``: outputs, privacy bookkeeping, interrupt/resume, and input errors."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import privgrad as pg
from privgrad.cli import checkpoint, loop, main
from privgrad.errors import CheckpointError
from test_report import _check_png

FAST = ["--seed", "0", "--batch-size", "480", "--epochs", "2"]  # 3 steps per epoch


def _run(tmp_path: Path, *args: str, name: str = "run") -> tuple[Path, dict]:
    out = tmp_path / name
    assert main(["train", *FAST, *args, "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_outputs_and_privacy_bookkeeping(tmp_path: Path) -> None:
    out, summary = _run(tmp_path)
    q = 480 / 1437
    assert summary["sample_rate"] == pytest.approx(q)
    assert summary["steps"] == 2 * round(1 / q) == 6
    # σ is calibrated: the ledger's ε is the budget, and ε of (σ, q, steps) is the same
    want = pg.accounting.epsilon(summary["noise_multiplier"], q, 6, delta=1e-5)
    assert summary["epsilon"] == pytest.approx(want, rel=1e-6)
    assert 0.99 * 3.0 <= summary["epsilon"] <= 3.0
    assert 0.3 < summary["test_accuracy"] <= 1.0  # far above chance (0.1) after 6 steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["epsilon"] == pytest.approx(summary["epsilon"])
    assert all(rows[i]["epsilon"] < rows[i + 1]["epsilon"] for i in range(5))
    for r in rows:
        assert 0.0 <= r["fraction_clipped"] <= 1.0
        assert r["norms_post"]["q95"] <= 1.0 + 1e-6  # C = 1
        assert r["norms_pre"]["q05"] <= r["norms_pre"]["q50"] <= r["norms_pre"]["q95"]
    html = (out / "report.html").read_text()
    payloads = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(payloads) >= 5
    for payload in payloads:
        _check_png(base64.b64decode(payload, validate=True))
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["engine"]["steps"] == 6 and len(state["history"]["epochs"]) == 2


def test_clipping_rules_run_and_adaptive_spends_its_count(tmp_path: Path) -> None:
    _, flat = _run(tmp_path, name="flat")
    _, adaptive = _run(tmp_path, "--clipping", "adaptive", name="adaptive")
    # same budget: the gradient gets less noise than the effective σ, the count the rest
    assert adaptive["epsilon"] == pytest.approx(flat["epsilon"], rel=1e-2)
    sigma, sigma_b = adaptive["noise_multiplier"], 10.0
    assert (sigma**-2 + sigma_b**-2) ** -0.5 == pytest.approx(flat["noise_multiplier"], rel=1e-9)
    assert adaptive["max_grad_norm"] != 1.0
    for rule in ("per-layer", "automatic"):
        _, s = _run(tmp_path, "--clipping", rule, "--mode", "materialize", name=rule)
        assert s["clipping"] == rule and s["epsilon"] <= 3.0


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    real = loop.logical_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled between steps
        return out

    monkeypatch.setattr(loop, "logical_step", step)


@pytest.mark.parametrize("stop_at", [4, 3])  # mid-way through epoch 2; end of epoch 1
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int
) -> None:
    through, summary = _run(tmp_path, "--clipping", "adaptive", name="through")
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _interrupt_after(m, stop_at)
        assert main(["train", *FAST, "--clipping", "adaptive", "--out", str(out)]) == 130
    assert checkpoint.load(out / "checkpoint.pt")["engine"]["steps"] == stop_at
    assert not (out / "summary.json").exists()
    assert main(["train", "--resume", str(out)]) == 0
    a, b = checkpoint.load(through / "checkpoint.pt"), checkpoint.load(out / "checkpoint.pt")
    assert a["engine"]["ledger"] == b["engine"]["ledger"]
    assert a["engine"]["max_grad_norm"] == b["engine"]["max_grad_norm"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["epsilon"] == summary["epsilon"]
    assert resumed["test_accuracy"] == summary["test_accuracy"]
    assert (out / "metrics.jsonl").read_text() == (through / "metrics.jsonl").read_text()
    assert b["history"]["epochs"] == a["history"]["epochs"]


def test_corrupted_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path, capsys) -> None:
    out, _ = _run(tmp_path)
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    ledger = checkpoint.load(path)["engine"]["ledger"]
    mid = len(data) // 2
    damaged = [data[:mid], data[:10], b"",
               data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],  # one flipped bit
               data[:mid] + bytes([data[mid] ^ 0x80]) + data[mid + 1:]]
    for bad in damaged:
        path.write_bytes(bad)
        assert main(["train", "--resume", str(out)]) == 2
        assert "truncated or corrupted" in capsys.readouterr().err
        assert path.read_bytes() == bad  # nothing was overwritten by a fresh run
    path.write_bytes(data)
    assert checkpoint.load(path)["engine"]["ledger"] == ledger
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nowhere" / "checkpoint.pt")


def test_user_data_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    X = rng.normal(size=(300, 5)) + y[:, None]  # separable enough
    np.savez(tmp_path / "d.npz", X=X, y=y)
    learn = ["--batch-size", "100", "--epochs", "8", "--lr", "0.5", "--num-classes", "3"]
    _, s = _run(tmp_path, "--data", str(tmp_path / "d.npz"), *learn, name="npz")
    assert s["model"] == "mlp" and s["train_samples"] == 240 and s["test_accuracy"] > 0.5
    table = np.column_stack([X[:, :2], y, X[:, 2:]])
    np.savetxt(tmp_path / "d.csv", table, delimiter=",", header="a,b,label,c,d,e", comments="")
    _, s = _run(tmp_path, "--data", str(tmp_path / "d.csv"), *learn, name="csv")
    assert s["train_samples"] == 240 and s["test_accuracy"] > 0.5


@pytest.mark.parametrize("args,match", [
    (["--epsilon", "0"], "--epsilon must be > 0"),
    (["--epsilon", "-1"], "--epsilon must be > 0"),
    (["--delta", "1"], "--delta must be in"),
    (["--data", "missing.npz", "--num-classes", "2"], "no such file"),
    (["--data", "{nolabel}", "--num-classes", "2"], "no label column"),
    (["--data", "{noy}", "--num-classes", "2"], "needs arrays 'X'"),
    (["--model", "cnn", "--data", "{flat}", "--num-classes", "2"], "needs image inputs"),
    (["--batch-size", "5000"], "exceeds the 1437 training samples"),
])
def test_bad_options_are_explained(tmp_path: Path, capsys, args, match) -> None:
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n3,4\n")
    np.savez(tmp_path / "noy.npz", X=np.zeros((4, 2)))
    np.savez(tmp_path / "flat.npz", X=np.zeros((20, 3)), y=np.arange(20) % 2)
    args = [a.format(nolabel=tmp_path / "nolabel.csv", noy=tmp_path / "noy.npz",
                     flat=tmp_path / "flat.npz") for a in args]
    assert main(["train", *args, "--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err


def test_a_fresh_run_never_discards_an_earlier_ledger(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    out, _ = _run(tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", *FAST, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(["train", *FAST, "--out", str(out), "--overwrite"]) == 0
    # nor under torchrun (the guard runs before the process group is joined) ...
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", *FAST, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    # ... nor a resumed run written into another run's directory
    other, _ = _run(tmp_path, name="other")
    assert main(["train", "--resume", str(out), "--out", str(other)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_unknown_clipping_and_resume_with_options_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--clipping", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--epsilon", "8"]) == 2
    assert "drop ['epsilon']" in capsys.readouterr().err


def test_two_processes(tmp_path: Path) -> None:
    """--nproc 2: same budget and ledger, global batches, one writer, resume refuses 1 proc."""
    _, single = _run(tmp_path, name="one")
    out, two = _run(tmp_path, "--nproc", "2", name="two")
    assert two["processes"] == 2
    assert two["epsilon"] == single["epsilon"] and two["steps"] == single["steps"]
    state = checkpoint.load(out / "checkpoint.pt")
    assert len(state["sampler"]) == 2 and [s["shard"] for s in state["sampler"]] == [[0, 2], [1, 2]]
    one = checkpoint.load(tmp_path / "one" / "checkpoint.pt")
    assert state["engine"]["ledger"] == one["engine"]["ledger"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and 300 < sum(r["batch_size"] for r in rows) / 6 < 660  # E = 480
    assert two["test_accuracy"] > 0.3
    assert main(["train", "--resume", str(out)]) == 0  # finished: rewrites the summary only


def test_ctrl_c_on_two_processes_checkpoints_and_resumes(tmp_path: Path) -> None:
    """A terminal's Ctrl-C (SIGINT to the whole process group) under --nproc 2."""
    args = ["--seed", "0", "--batch-size", "480", "--epochs", "20", "--nproc", "2"]
    through, summary = _run(tmp_path, *args[4:], "--epochs", "20", name="through")
    out = tmp_path / "ctrl-c"
    cmd = [sys.executable, "-m", "privgrad.cli", "train", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted after step" in text
    steps = checkpoint.load(out / "checkpoint.pt")["engine"]["steps"]
    assert 5 <= steps < 60 and len(metrics.read_text().splitlines()) == steps
    assert main(["train", "--resume", str(out)]) == 0
    a, b = checkpoint.load(through / "checkpoint.pt"), checkpoint.load(out / "checkpoint.pt")
    assert a["engine"]["ledger"] == b["engine"]["ledger"]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["epsilon"] == summary["epsilon"] and resumed["steps"] == 60


def _write_csv(path: Path, header: str, rows: np.ndarray, bom: bool = False) -> None:
    lines = [",".join(f'"{v:g}"' if j % 2 else f"{v:g}" for j, v in enumerate(r)) for r in rows]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join([header, *lines, ""]).encode())


def test_num_classes_is_public_and_the_statement_says_what_else_is(tmp_path: Path) -> None:
    """The output layer has --num-classes outputs whatever labels the file holds."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)  # classes 0..2 present, K = 5 declared
    X = rng.normal(size=(60, 4)) + y[:, None]
    np.savez(tmp_path / "d.npz", X=X, y=y)
    small = ["--batch-size", "30", "--epochs", "1", "--num-classes", "5"]
    out, s = _run(tmp_path, "--data", str(tmp_path / "d.npz"), *small, name="npz")
    head = checkpoint.load(out / "checkpoint.pt")["model"]["3.weight"]
    assert head.shape == (5, 64)
    # one more record with a label no other record has: same released shape
    table = np.column_stack([np.r_[y, 4], np.r_[X, rng.normal(size=(1, 4))]])
    _write_csv(tmp_path / "d.csv", '"label","a","b","c","d"', table, bom=True)
    out2, _ = _run(tmp_path, "--data", str(tmp_path / "d.csv"), *small, name="csv")
    assert checkpoint.load(out2 / "checkpoint.pt")["model"]["3.weight"].shape == (5, 64)
    statement = s["privacy_statement"]
    eps = {e["delta"]: e["epsilon"] for e in statement["epsilon"]}
    assert list(eps) == [1e-5, 1e-6, 1e-7] and eps[1e-5] == s["epsilon"]
    q, sigma, steps = s["sample_rate"], s["noise_multiplier"], s["steps"]
    assert q == 30 / 48 and statement["sample_rate"] == {"min": q, "max": q}
    assert statement["noise_multiplier"] == {"min": sigma, "max": sigma}
    assert statement["sensitivity"] == {"min": 1.0, "max": 1.0} and statement["steps"] == steps
    assert eps[1e-6] == pytest.approx(pg.accounting.epsilon(sigma, q, steps, delta=1e-6))
    public = " | ".join(statement["public"])
    for fact in ("dataset size N = 48", "K = 5", "split seed 0", "input shape (4,)",
                 "test accuracy measured on the held-out ones is NOT private"):
        assert fact in public, fact
    html = (out / "report.html").read_text()
    assert html.index("Privacy statement") < html.index("NOT covered by the differential")
    assert f"ε = {eps[1e-6]:.6g} at δ = 1e-06" in html


def test_the_split_is_seeded() -> None:
    from privgrad.cli import datasets

    a, b, c = datasets.load(None, 3), datasets.load(None, 3), datasets.load(None, 4)
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.y_test, c.y_test)
    assert a.num_classes == 10 and a.stratified and (a.seed, c.seed) == (3, 4)


@pytest.mark.parametrize("args,match", [
    (["--out", "{file}"], "--out {file} is a file, not a directory. Fix: --out DIR"),
    (["--data", "{x1d}", "--num-classes", "2"], "X has shape (20,)"),
    (["--data", "{x1d}"], "needs --num-classes K"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf. Fix:"),
    (["--data", "{badlabel}", "--num-classes", "2"],
     "row 3 (X[3], y[3]) has label 2, not a class index in 0..1"),
    (["--data", "{halflabel}", "--num-classes", "2"], "line 4 has label 1.5"),
    (["--data", "{badheader}", "--num-classes", "2"], "line 1, the header, is malformed"),
    (["--max-grad-norm", "1e300"],  # stated as itself: never inf, never 300 digits
     ("--max-grad-norm 1e+300 with σ = ", "e+300 does not fit in float32")),
    (["--lr", "1e30", "--epochs", "1", "--mode", "ghost"],  # was blamed on "sample 0"
     ("training diverged", "Fix: a smaller --lr, e.g. --lr 0.06")),
])
def test_cli_errors_are_one_line_with_the_fix(tmp_path: Path, capsys, args, match) -> None:
    files = {"file": tmp_path / "a-file", "x1d": tmp_path / "x1d.npz",
             "badlabel": tmp_path / "bad.npz", "halflabel": tmp_path / "half.csv",
             "badheader": tmp_path / "header.csv"}
    files["file"].write_text("not a directory")
    np.savez(files["x1d"], X=np.arange(20.0), y=np.arange(20) % 2)
    np.savez(files["badlabel"], X=np.zeros((20, 2)), y=np.r_[0, 1, 0, 2, np.arange(16) % 2])
    rows = "".join(f"{i % 2},{i}\n" for i in range(20))
    files["halflabel"].write_text("label,a\n0,1\n1,2\n1.5,3\n" + rows)
    files["badheader"].write_text('"label,a\n' + rows)
    args = [a.format(**files) for a in args]
    out = ["--out", str(tmp_path / "o")] if "--out" not in args else []
    assert main(["train", *FAST, *args, *out]) == 2
    err = capsys.readouterr().err
    for part in (match,) if isinstance(match, str) else match:
        assert part.format(**files) in err
    assert err.count("\n") == 1 and "Traceback" not in err
