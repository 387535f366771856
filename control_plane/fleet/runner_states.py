"""Connected runners' live capacity, written to the store in batches.

Capacity lives in memory (``AgentConnection``) and is what scheduling, the API and the
dashboard read while a runner is connected; the store keeps a copy for when it is not. Each
runner's heartbeat written on its own was a transaction per runner every 30 s, a quarter of
the control plane's work with thousands of runners connected. Here a heartbeat only marks
the runner, and every ``every_s`` one statement per ``BATCH`` runners writes what changed.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from control_plane.db.store import Store
from control_plane.fleet.registry import AgentConnection

log = logging.getLogger(__name__)
# Runners per statement: a batch keeps the SQLite thread from other work for a few ms at most.
BATCH = 500


class RunnerStates:
    def __init__(self, store: Store, every_s: float) -> None:
        self._store = store
        self._every_s = every_s
        self._changed: dict[str, AgentConnection] = {}

    def changed(self, conn: AgentConnection) -> None:
        """The runner reported capacity: it goes to the store with the next batch."""
        self._changed[conn.runner_id] = conn

    def forget(self, conn: AgentConnection) -> None:
        """The runner left (its state is written as it goes)."""
        if self._changed.get(conn.runner_id) is conn:
            del self._changed[conn.runner_id]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)  # a periodic write, not a wait for an event
            try:
                await self.write()
            except Exception:  # a loop boundary: the next round writes them again
                log.exception("writing runners' capacity failed")

    async def write(self) -> None:
        """Write every changed runner's capacity now."""
        changed, self._changed = self._changed, {}
        conns = list(changed.values())
        for start in range(0, len(conns), BATCH):
            rows = [
                (c.runner_id, c.capacity.model_dump(), datetime.fromtimestamp(c.last_seen_at, UTC))
                for c in conns[start : start + BATCH]
            ]
            await self._store.save_capacities(rows)
