"""Ctrl-C (SIGINT) or SIGTERM as a request to stop after the current step and checkpoint."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Within ``with StopFlag() as stop:``, the first signal sets ``stop.requested``.

    A second signal stops at once (``KeyboardInterrupt``). Outside the main thread no
    handler can be installed and the flag stays ``False``.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        for s in SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
