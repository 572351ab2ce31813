"""The ``privgrad`` command: ε and σ on the command line, with clear input errors."""

import re
import subprocess
import sys

import pytest

import privgrad as pg
from privgrad.cli import main


def test_epsilon_matches_library(capsys):
    assert main(["epsilon", "--sample-rate", "0.004", "--noise-multiplier", "1.1",
                 "--epochs", "10", "--delta", "1e-5"]) == 0
    got = float(capsys.readouterr().out)
    want = pg.accounting.epsilon(1.1, 0.004, epochs=10, delta=1e-5)
    assert got == pytest.approx(want, rel=1e-5)


def test_calibrate_round_trip(capsys):
    assert main(["calibrate", "--epsilon", "2.0", "--delta", "1e-5", "--sample-rate", "0.01",
                 "--steps", "1000", "--accountant", "rdp"]) == 0
    sigma = float(capsys.readouterr().out)
    eps = pg.accounting.epsilon(sigma, 0.01, 1000, delta=1e-5, accountant="rdp")
    assert 0.99 * 2.0 <= eps <= 2.0 + 1e-6


@pytest.mark.parametrize("argv,match", [
    (["epsilon", "--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "5",
      "--delta", "1e-5"], "--sample-rate must be in \\(0, 1\\]"),
    (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "0", "--steps", "5",
      "--delta", "1e-5"], "--noise-multiplier must be > 0"),
    (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "5",
      "--delta", "1"], "--delta must be in \\(0, 1\\)"),
    (["calibrate", "--epsilon", "-1", "--sample-rate", "0.1", "--steps", "5",
      "--delta", "1e-5"], "--epsilon must be > 0"),
])
def test_bad_input(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert re.search(match, err)


def test_installed_console_script():
    out = subprocess.run([sys.executable, "-m", "privgrad.cli", "epsilon", "--sample-rate",
                          "0.04", "--noise-multiplier", "1.5", "--steps", "2250", "--delta",
                          "1e-5", "--accountant", "rdp"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 6.5 < float(out.stdout) < 7.4
