"""A one-line progress bar on stderr (redrawn in place on a terminal, per epoch otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows ``[#####.....] step/total`` followed by the latest figures.

    Args:
        total: Number of steps of the whole run.
        stream: Where to draw; ``None`` for stderr.
        width: Characters of the bar.
        enabled: ``False`` draws nothing (ranks other than 0).
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24,
                 enabled: bool = True) -> None:
        self.total, self.width, self.enabled = max(total, 1), width, enabled
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._last = 0.0

    def update(self, step: int, text: str, force: bool = False) -> None:
        """Redraws the bar at ``step`` (at most 10 times a second unless ``force``)."""
        now = time.monotonic()
        if not self.enabled or (not self.live and not force):
            return
        if not force and now - self._last < 0.1 and step < self.total:
            return
        self._last = now
        done = round(self.width * min(step, self.total) / self.total)
        line = f"[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {text}"
        self.stream.write(("\r" + line + "\x1b[K") if self.live else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line."""
        if self.enabled and self.live:
            self.stream.write("\n")
            self.stream.flush()
