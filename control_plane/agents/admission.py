"""How many agents may be between connecting and their welcome at once.

After a control-plane restart every agent of a fleet dials in at the same moment. Each
handshake costs a token look-up and a few writes; let thousands in at once and the database
pool runs dry and the loop falls behind everyone's heartbeats. So at most ``limit`` handshakes
run together, and an agent over the limit is closed at once with ``BUSY`` and told when to
come back: later the more agents were turned away in the last second, so that a herd spreads
itself out (each agent adds its own jitter on top).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# However large the herd, nobody is told to wait longer than this.
MAX_RETRY_AFTER_S = 30.0


class Admission:
    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.in_progress = 0
        self._clock = clock
        self._window_start = clock()
        self._refused_in_window = 0

    def enter(self) -> bool:
        """A handshake may start now (then :meth:`leave` when it ends), or not."""
        if self.in_progress < self.limit:
            self.in_progress += 1
            return True
        now = self._clock()
        if now - self._window_start >= 1.0:
            self._window_start, self._refused_in_window = now, 0
        self._refused_in_window += 1
        return False

    def leave(self) -> None:
        self.in_progress -= 1

    def retry_after_s(self) -> float:
        """For an agent just turned away: a second, plus a second per ``limit`` agents turned
        away before it this second (they come back in that many waves)."""
        return min(MAX_RETRY_AFTER_S, 1.0 + self._refused_in_window / max(self.limit, 1))
