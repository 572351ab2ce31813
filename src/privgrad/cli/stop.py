"""Ctrl-C (SIGINT), SIGTERM or a step limit as a request to stop after a step and checkpoint."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Within ``with StopFlag() as stop:``, the first signal sets ``stop.requested``.

    A second signal stops at once (``KeyboardInterrupt``), except in a process started by
    torch's elastic launcher (``--nproc``): a terminal's Ctrl-C reaches the worker and the
    launcher, which forwards it again, so repeats are ignored there (the launcher kills
    the workers itself if they do not finish within its shutdown timeout). Outside the
    main thread no handler can be installed and the flag stays ``False``.

    Args:
        after_steps: Also stop once the run has taken this many steps in all
            (``--stop-after-steps``: a job of bounded length, or a test of ``--resume``).
    """

    def __init__(self, after_steps: int | None = None) -> None:
        self.requested = False
        self.after_steps = after_steps
        self._previous: dict[int, Any] = {}

    def due(self, steps: int) -> bool:
        """Whether to stop after step ``steps``: a signal came, or the step limit is reached."""
        return self.requested or (self.after_steps is not None and steps >= self.after_steps)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        for s in SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        # a stopping elastic worker keeps ignoring the launcher's repeated signals until it
        # has exited (a KeyboardInterrupt during its shutdown can hang the process)
        keep_ignoring = self.requested and "TORCHELASTIC_RUN_ID" in os.environ
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_IGN if keep_ignoring else previous)
