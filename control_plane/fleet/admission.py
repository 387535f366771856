"""How many agents may be between connecting and their welcome at once.

After a control-plane restart every agent of a fleet dials in at the same moment. Each
handshake costs a token look-up and a few writes; let thousands in at once and the database
pool runs dry and the loop falls behind everyone's heartbeats. So at most ``limit`` handshakes
run together and the next ``queue_limit`` agents wait their turn, first come first served,
with their socket open (waiting costs nothing but the socket). An agent beyond those is
closed at once with ``BUSY`` and told when to come back: about when the agents ahead of it
will have had their handshakes, at the pace handshakes have lately been taking, so that a
herd comes back spread over the time it needs (each agent adds its own jitter on top).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

# However large the herd, nobody is told to wait longer than this, or less than this.
MAX_RETRY_AFTER_S = 30.0
MIN_RETRY_AFTER_S = 0.5
# A handshake's duration, until some were timed.
_FIRST_GUESS_S = 0.05

Turn = asyncio.Future[None]  # done once the handshake may run


class Admission:
    def __init__(
        self, limit: int, queue_limit: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        # Waiting agents must get their welcome within their own timeout (15 s by default).
        self.queue_limit = 16 * limit if queue_limit is None else queue_limit
        self.in_progress = 0
        self._queue: deque[Turn] = deque()
        self._clock = clock
        self._window_start = clock()
        self._refused_in_window = 0
        self._handshake_s = _FIRST_GUESS_S  # a moving average of recent handshakes

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def arrive(self) -> Turn | None:
        """A place for a new handshake: at once (the turn is done) or in the queue; ``None``
        when the queue is full as well. Taken at once, so that who came first goes first;
        every turn taken is given back with :meth:`depart`."""
        turn: Turn = asyncio.get_running_loop().create_future()
        if self.in_progress < self.limit and not self._queue:
            self.in_progress += 1
            turn.set_result(None)
            return turn
        if len(self._queue) < self.queue_limit:
            self._queue.append(turn)
            return turn
        now = self._clock()
        if now - self._window_start >= 1.0:
            self._window_start, self._refused_in_window = now, 0
        self._refused_in_window += 1
        return None

    def depart(self, turn: Turn, took_s: float) -> None:
        """The handshake of ``turn`` ended after ``took_s`` (or its agent left while waiting)."""
        if turn.done() and not turn.cancelled():
            self.in_progress -= 1
            self._handshake_s += 0.1 * (took_s - self._handshake_s)
        else:
            turn.cancel()
            self._queue.remove(turn)
        while self._queue and self.in_progress < self.limit:
            self.in_progress += 1
            self._queue.popleft().set_result(None)

    def retry_after_s(self) -> float:
        """For an agent just turned away: when those waiting and those turned away before it
        this second will have had their handshakes, ``limit`` at a time."""
        per_s = self.limit / max(self._handshake_s, 1e-3)
        wait_s = MIN_RETRY_AFTER_S + (len(self._queue) + self._refused_in_window) / per_s
        return min(MAX_RETRY_AFTER_S, wait_s)

    def now(self) -> float:
        return self._clock()
