"""The ``privgrad`` command: ε and σ on the command line, with clear input errors."""

import re
import signal
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

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


class _Deadline:
    """Fails a call that does not return within ``seconds`` (SIGALRM; the main thread)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def _fire(self, *_: object) -> None:
        raise TimeoutError(f"no answer within {self.seconds} s")

    def __enter__(self) -> None:
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


TRILLION = ["--sample-rate", "0.01", "--steps", "1000000000000", "--delta", "1e-5"]


@pytest.mark.parametrize("command", [["epsilon", "--noise-multiplier", "1"],
                                     ["calibrate", "--epsilon", "3"]])
def test_a_trillion_steps_is_refused_with_pld_and_answered_by_rdp(command, capsys):
    with _Deadline(30):
        assert main([*command, *TRILLION]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--steps 1000000000000: the PLD accountant is limited to 1,000,000 steps" in err
    assert "Fix: --accountant rdp" in err
    with _Deadline(30):
        assert main([*command, *TRILLION, "--accountant", "rdp"]) == 0
    got = float(capsys.readouterr().out)
    if command[0] == "epsilon":  # the closed form, composed by dp_accounting directly
        rdp = rdp_privacy_accountant.RdpAccountant(orders=list(pg.accounting.DEFAULT_RDP_ORDERS))
        step = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))
        want = rdp.compose(step, 10**12).get_epsilon(1e-5)
        assert got == pytest.approx(want, rel=1e-5)
    else:
        eps = pg.accounting.epsilon(got, 0.01, 10**12, delta=1e-5, accountant="rdp")
        assert 0.99 * 3 <= eps <= 3 * (1 + 1e-5)  # σ printed to 6 digits


def test_epochs_count_toward_the_pld_limit(capsys):
    argv = ["epsilon", "--noise-multiplier", "1", "--sample-rate", "1e-4", "--epochs", "200",
            "--delta", "1e-5"]
    assert main(argv) == 2
    assert "--epochs 200 at --sample-rate 0.0001 (2000000 steps)" in capsys.readouterr().err
