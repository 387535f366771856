"""Python's garbage collector, kept from stopping the loop when a large fleet is connected.

A full collection walks every container object alive. With 10,000 runners connected that
is millions of them (each connection's websocket, buffers, capacity), and each full
collection took 1.0-1.75 s, during which nothing was dispatched, welcomed or read; they came
every few seconds while agents connected and every 5-15 s after, collecting next to
nothing. So what survives a full collection is frozen (``gc.freeze``: left out of later
collections; objects are still freed when their last reference goes) and later full
collections walk only what is newer. Cyclic garbage among frozen objects would never be
found, so once an hour everything is unfrozen and the next full collection walks it all.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

UNFREEZE_EVERY_S = 3600.0


class Collector:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._unfrozen_at = clock()

    def install(self) -> None:
        if self.after_collection not in gc.callbacks:
            gc.callbacks.append(self.after_collection)

    def remove(self) -> None:
        if self.after_collection in gc.callbacks:
            gc.callbacks.remove(self.after_collection)
        gc.unfreeze()

    def after_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self._clock()
        if now - self._unfrozen_at >= UNFREEZE_EVERY_S:
            gc.unfreeze()  # the next full collection walks everything again
            self._unfrozen_at = now
        else:
            gc.freeze()
