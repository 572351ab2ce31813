"""The README shows what runs: its quickstart is the example file, and the example runs."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_is_the_example():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```python\n(.*?)```", readme, re.S).group(1)
    assert block == (ROOT / "examples" / "quickstart.py").read_text()
    head = readme.splitlines()[:6]
    assert any("make demo" in line for line in head) and any("make test" in line for line in head)


def test_quickstart_runs_and_learns(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = re.findall(r"norm before clipping ([\d.]+), clip factor ([\d.]+), "
                      r"norm after clipping ([\d.]+)", out)
    assert len(rows) == 3
    for before, factor, after in rows:
        assert float(after) <= 1.0 + 1e-3
        assert abs(float(before) * float(factor) - float(after)) < 2e-3 + 1e-3 * float(before)
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", out).group(1))
    assert accuracy > 80.0


def test_readme_accounting_snippets_run(capsys):
    import shlex

    import privgrad as pg
    from privgrad.cli import main

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Privacy accounting", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {"pg": pg}
    exec(block, scope)
    assert 0.99 * 3.0 <= scope["eps"] <= 3.0
    lines = [line.strip() for line in section.splitlines()]
    commands = [line for line in lines if line.startswith("privgrad ")]
    assert len(commands) == 2
    for cmd in commands:
        assert main(shlex.split(cmd)[1:]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 2 and float(out[0]) > 0 and float(out[1]) > 0


def test_readme_train_options_exist():
    from privgrad.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Training from the command line", 1)[1].split("\n## ", 1)[0]
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    known = {s for a in train._actions for s in a.option_strings}
    mentioned = set(re.findall(r"--[a-z][a-z-]+", section))
    assert len(mentioned) >= 15 and mentioned <= known, mentioned - known
    assert "make demo" in section and (ROOT / "Makefile").read_text().count("privgrad train") == 1


def test_the_hf_lora_example_runs_and_spends_its_budget(tmp_path, capsys, monkeypatch):
    import sys

    import pytest

    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hf_lora.py", "--steps", "4", "--pretrain-steps", "5",
                                      "--out", str(tmp_path / "out")])
    runpy.run_path(str(ROOT / "examples" / "hf_lora.py"), run_name="__main__")
    out = capsys.readouterr().out
    eps = float(re.search(r"ε = ([\d.]+) at δ = 1e-5 after 4 steps", out).group(1))
    assert 7.9 <= eps <= 8.0
    assert re.search(r"held-out private loss per byte: [\d.]+ before, [\d.]+ after", out)
    assert (tmp_path / "out" / "privacy.json").is_file()
