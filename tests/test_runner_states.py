"""Connected runners' capacity reaches the store in batches, for while they are away."""

from __future__ import annotations

from typing import Any

from control_plane.fleet.registry import AgentConnection
from control_plane.fleet.runner_states import BATCH
from protocol.capacity import Capacity, HostInfo
from tests.conftest import AgentFactory, ControlPlane, poll_until


async def test_a_connected_runners_heartbeat_is_kept_for_when_it_is_away(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim, heartbeat_s=0.05)
    fleet, store = cp.services.fleet, cp.services.store

    async def connected() -> bool:
        # Registered first, then the hello's state written (after the lease, on PostgreSQL).
        stored = await store.get_runner(None, runner["id"])
        return cp.services.registry.get(runner["id"]) is not None and stored.last_seen_at is not None

    await poll_until(connected)
    at_hello = (await store.get_runner(None, runner["id"])).last_seen_at
    conn = cp.services.registry.get(runner["id"])
    assert conn is not None and at_hello is not None

    async def heartbeat_stored() -> bool:
        # A frame is heard before its report is handled: a write right after the first
        # may find nothing new yet, so each look writes what is pending (as the periodic
        # round does every 30 s) and reads it back.
        await fleet.runner_states.write()
        stored = await store.get_runner(None, runner["id"])
        return stored.last_seen_at is not None and stored.last_seen_at > at_hello

    await poll_until(heartbeat_stored)
    stored = await store.get_runner(None, runner["id"])
    assert stored.capacity is not None  # a newer heartbeat may have replaced the live one since
    assert stored.capacity["host"]["cpu_count"] == conn.capacity.host.cpu_count


async def test_a_large_fleets_capacity_goes_in_batches_and_all_of_it_arrives(cp: ControlPlane) -> None:
    store = cp.services.store
    account = await store.get_or_create_account("alice")
    count = 2 * BATCH + 7
    conns: list[AgentConnection] = []
    for n in range(count):
        _, runner = await store.create_runner(account.id, f"r{n}", [])
        conn = AgentConnection(
            runner_id=runner.id,
            account_id=account.id,
            name=runner.name,
            tags=[],
            status="active",
            ws=None,  # type: ignore[arg-type]
            capacity=Capacity(slots=1 + n % 3, host=HostInfo(cpu_count=n)),
        )
        conns.append(conn)
        cp.services.fleet.runner_states.changed(conn)
    await cp.services.fleet.runner_states.write()
    stored: dict[str, Any] = {}
    for conn in conns:
        stored[conn.runner_id] = (await store.get_runner(None, conn.runner_id)).capacity
    assert all(stored[c.runner_id]["host"]["cpu_count"] == c.capacity.host.cpu_count for c in conns)
    assert all(stored[c.runner_id]["slots"] == c.capacity.slots for c in conns)
