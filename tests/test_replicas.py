"""Control planes sharing one PostgreSQL database: work submitted to one runs on an agent
connected to another."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from sqlalchemy import text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import control_plane.fleet.dispatch as dispatch
import control_plane.web.workflows as workflows
from comfyfleet.throwaway_postgres import PgServer
from control_plane.fleet.replica_bus import COMMANDS_CHANNEL, EVENTS_CHANNEL, WAITING_CHANNEL
from protocol.capacity import Capacity
from protocol.closing import Close
from protocol.messages import ComfyUIInfo, HeldJob, Hello, Ready, dump_message
from tests.conftest import AgentFactory, ControlPlane, control_planes, png_bytes, poll_until
from tests.test_dashboard import snapshot
from tests.test_e2e import WORKFLOW, submit
from tests.test_event_log import resumed, whole_stream
from tests.test_faults import SLOW, next_of


async def _agent_on(
    plane: ControlPlane,
    creator: ControlPlane,
    sim: str,
    start_agent: AgentFactory,
    tags: list[str] | None = None,
) -> dict[str, Any]:
    """A runner created through ``creator`` whose real agent is connected to ``plane``."""
    runner = await creator.create_runner(tags=tags)
    await start_agent(plane.base, runner["token"], sim)
    await plane.services.fleet.wait_for(lambda: plane.services.registry.get(runner["id"]) is not None, 20)
    return runner


async def test_a_workflow_submitted_to_one_control_plane_runs_on_an_agent_of_another(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        runner = await _agent_on(b, a, sim, start_agent, tags=["gpu"])  # the only agent, on B
        fields = {"$prompt": "a red fox", "$input_image": png_bytes((10, 200, 60)), "#sampler": "bilinear"}
        submitted = [await submit(a, WORKFLOW, tags="gpu", **fields) for _ in range(3)]
        done: dict[str, Any] = {}

        async def all_completed() -> bool:
            for wf in submitted:
                _, done[wf["id"]] = await a.request("GET", f"/v1/workflow/{wf['id']}")
            return all(d["status"] == "completed" for d in done.values())

        await poll_until(all_completed, timeout_s=30)
        assert {d["runner_id"] for d in done.values()} == {runner["id"]}
        assert all(d["attempt"] == 1 for d in done.values())  # each ran once, not once per replica
        for wf in submitted:
            status, listing = await a.request("GET", f"/v1/workflow/{wf['id']}/outputs")
            assert status == 200 and {o["node_id"] for o in listing["outputs"]} == {"5", "6"}


async def test_a_waiting_workflow_whose_announcement_was_lost_is_found_by_the_sweep(
    tmp_path: Path,
    pg_server: PgServer,
    http: aiohttp.ClientSession,
    sim: str,
    start_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "WAITING_SWEEP_S", 0.2)
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        runner = await _agent_on(b, a, sim, start_agent)

        # A commits the workflow and says nothing, as if it died before its NOTIFY.
        replicas = a.services.fleet.replicas
        assert replicas is not None
        monkeypatch.setattr(replicas, "announce_waiting", lambda workflow_id: None)
        wf = await submit(a, WORKFLOW, **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3))})
        done = await b.wait_for_status(wf["id"], {"completed", "failed", "invalid"})
        assert done["status"] == "completed" and done["runner_id"] == runner["id"]


async def _listening(*planes: ControlPlane) -> None:
    for plane in planes:
        replicas = plane.services.fleet.replicas
        assert replicas is not None
        await asyncio.wait_for(replicas.bus.listening.wait(), 20)


def _story(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, ...]]:
    """What a client of the stream would tell of it: the statuses, node events and outputs,
    in order (a status repeated with a new queue position is one step)."""
    told: list[tuple[str, ...]] = []
    for name, data in events:
        if name == "status":
            step: tuple[str, ...] = ("status", data["status"])
        elif name == "node":
            step = ("node", data["node_id"], data["event"])
        elif name == "output":
            step = ("output", data["node_id"], data["filename"])
        else:
            step = (name,)
        if not told or told[-1] != step:
            told.append(step)
    return told


async def _follow(plane: ControlPlane, wf_id: str, into: list[tuple[str, dict[str, Any]]]) -> None:
    async for name, data in plane.events(wf_id):
        into.append((name, data))


async def test_a_stream_on_any_control_plane_tells_what_the_agent_on_another_reports(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 3, heartbeat_s=1.0) as (a, b, c):
        await _listening(a, b, c)
        runner = await a.create_runner(tags=["gpu"])
        fields = {"$prompt": "a red fox", "$input_image": png_bytes((10, 200, 60)), "#sampler": "bilinear"}
        wf = await submit(a, WORKFLOW, tags="gpu", **fields)  # waits: no agent yet
        on_b: list[tuple[str, dict[str, Any]]] = []
        on_c: list[tuple[str, dict[str, Any]]] = []
        streams = [asyncio.create_task(_follow(p, wf["id"], into)) for p, into in ((b, on_b), (c, on_c))]
        await poll_until(lambda: _both_started(on_b, on_c))
        await start_agent(b.base, runner["token"], sim)  # the only agent, on B
        await asyncio.wait_for(asyncio.gather(*streams), 30)  # each ends at the terminal status
        told = _story(on_c)
        assert told == _story(on_b)  # B's own stream, fed by its agent directly
        statuses = [step[1] for step in told if step[0] == "status"]
        assert statuses == ["accepted", "uploaded", "queued", "running", "completed"]
        assert {step[1] for step in told if step[0] == "node"} >= {"5", "6"}
        assert {step[1] for step in told if step[0] == "output"} == {"5", "6"}


async def _both_started(*streams: list[tuple[str, dict[str, Any]]]) -> bool:
    return all(streams)


async def test_cancel_stats_and_runner_changes_on_one_control_plane_reach_the_agent_on_another(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    async with http.post(f"{sim}/sim/config", json={"node_delays_s": {"ImageInvert": 60}}) as resp:
        assert resp.status == 200
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        await _listening(a, b)
        runner = await _agent_on(b, a, sim, start_agent, tags=["gpu"])

        # Stats and an interrupt through A, answered by the agent on B.
        status, stats = await a.request("GET", f"/v1/runner/{runner['id']}/stats")
        assert status == 200 and "system" in json.dumps(stats), stats
        status, answer = await a.request("POST", f"/v1/runner/{runner['id']}/interrupt")
        assert status == 200, answer

        # A cancel on A interrupts the prompt on B's agent now, not at its next report (none
        # comes during a 60 s node).
        wf = await submit(a, SLOW)
        await a.wait_for_status(wf["id"], {"running"})
        _, running = await a.request("GET", f"/v1/workflow/{wf['id']}")
        status, _ = await a.request("POST", f"/v1/workflow/{wf['id']}/cancel")
        assert status == 200

        async def interrupted_on_comfyui() -> bool:
            async with http.get(f"{sim}/sim/log") as resp:
                return running["prompt_id"] in (await resp.json())["interrupted"]

        await poll_until(interrupted_on_comfyui, timeout_s=20)
        async with http.post(f"{sim}/sim/config", json={"node_delays_s": {}}) as resp:
            assert resp.status == 200  # the node may end now: the interrupt is heard there
        _, body = await b.request("GET", f"/v1/workflow/{wf['id']}")
        assert body["status"] == "cancelled"

        # New tags given on A are what B schedules the runner by.
        status, _ = await a.request("PUT", f"/v1/runner/{runner['id']}", json={"tags": ["fresh"]})
        assert status == 200
        fresh = await submit(
            a, WORKFLOW, tags="fresh", **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3))}
        )
        done = await a.wait_for_status(fresh["id"], {"completed", "failed", "invalid"}, timeout_s=30)
        assert done["status"] == "completed" and done["runner_id"] == runner["id"]

        # Deleted on A: B closes the agent's connection, and the agent does not come back.
        status, _ = await a.request("DELETE", f"/v1/runner/{runner['id']}")
        assert status == 200

        async def closed_on_b() -> bool:
            return b.services.registry.get(runner["id"]) is None

        await poll_until(closed_on_b)


async def test_a_stream_that_misses_what_another_control_plane_relays_still_reaches_the_end(
    tmp_path: Path,
    pg_server: PgServer,
    http: aiohttp.ClientSession,
    sim: str,
    start_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workflows, "SSE_KEEPALIVE_S", 0.2)
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        await _listening(a, b)
        replicas = a.services.fleet.replicas
        assert replicas is not None
        # A hears none of the events B relays (the handler was bound when A started).
        monkeypatch.setitem(replicas.bus._handlers, EVENTS_CHANNEL, lambda message: None)
        await _agent_on(b, a, sim, start_agent)
        wf = await submit(a, WORKFLOW, **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3))})
        done = await a.wait_for_status(wf["id"], {"completed", "failed", "invalid"}, timeout_s=30)
        assert done["status"] == "completed"


async def _bare(plane: ControlPlane, token: str, jobs: list[HeldJob] | None = None) -> ClientConnection:
    """A hand-driven agent connection to ``plane``, welcomed."""
    url = plane.base.replace("http", "ws") + "/v1/agent/connect"
    ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"})
    hello = Hello(
        agent_version="test", capacity=Capacity(), comfyui=ComfyUIInfo(url="http://x"), jobs=jobs or []
    )
    await ws.send(dump_message(hello))
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws


async def test_a_runner_is_held_by_one_control_plane_the_newest_connection_wins(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession
) -> None:
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0, runner_grace_s=0.2) as (a, b):
        await _listening(a, b)
        runner = await a.create_runner()
        on_a = await _bare(a, runner["token"])
        await on_a.send(dump_message(Ready(free_slots=1)))
        wf = await submit(a, SLOW)
        job = await next_of(on_a, "job")
        assert job["workflow_id"] == wf["id"]
        # The agent turns up at B holding its job (its connection to A half-dead, say).
        on_b = await _bare(b, runner["token"], [HeldJob(workflow_id=wf["id"], attempt=1)])
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                await on_a.recv()
        assert on_a.close_code == Close.REPLACED
        await a.services.fleet.wait_for(lambda: a.services.registry.get(runner["id"]) is None, 10)
        # A still says it is connected (to B), and B answers for it.
        _, seen = await a.request("GET", f"/v1/runner/{runner['id']}")
        assert seen["connected"] is True
        board = await snapshot(a, await a.token("alice", scope="operator"))  # A's dashboard
        assert [r["online"] for r in board["runners"] if r["id"] == runner["id"]] == [True]
        # A's grace period for the connection it lost ends: the job stays B's, same attempt.
        await a.services.fleet._grace_expired(runner["id"])
        _, body = await a.request("GET", f"/v1/workflow/{wf['id']}")
        assert (body["status"], body["attempt"], body["runner_id"]) == ("accepted", 1, runner["id"])
        await on_b.close()
        # Connected nowhere: asked for its stats, it is offline at once, from either.
        await b.services.fleet.wait_for(lambda: b.services.registry.get(runner["id"]) is None, 10)
        for plane in (a, b):
            status, answer = await plane.request("GET", f"/v1/runner/{runner['id']}/stats")
            assert status == 409 and "offline" in answer["message"], answer


async def test_the_runners_of_a_control_plane_that_stopped_renewing_are_taken_over_by_exactly_one(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession
) -> None:
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 3, heartbeat_s=1.0) as (a, b, c):
        await _listening(a, b, c)
        runner = await a.create_runner()
        on_a = await _bare(a, runner["token"])
        await on_a.send(dump_message(Ready(free_slots=1)))
        await submit(a, SLOW)
        await next_of(on_a, "job")
        # A stops renewing (it died, as far as the database can tell): its lease lapses.
        async with a.services.store.engine.begin() as conn:
            await conn.execute(text("UPDATE runner SET lease_expires_at = now() - interval '1 second'"))
        replicas = [p.services.fleet.replicas for p in (b, c)]
        assert all(r is not None for r in replicas)
        taken = await asyncio.gather(*(r.renew_leases() for r in replicas if r is not None))
        assert sorted(len(t) for t in taken) == [0, 1]  # one of them, not both
        keeper = b if taken[0] else c
        assert runner["id"] in keeper.services.fleet._grace
        await on_a.close()


async def test_a_stream_resumes_on_another_control_plane_from_the_last_event_id(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        await _listening(a, b)
        await _agent_on(b, a, sim, start_agent)
        wf = await submit(a, WORKFLOW, **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3))})
        logged = (await whole_stream(b, wf["id"]))[1:]  # on B, where its agent reports
        assert logged[-1][2]["status"] == "completed"
        for cut in (0, len(logged) // 2):
            event_id = logged[cut][0]
            assert event_id is not None
            assert await resumed(a, wf["id"], event_id) == logged[cut + 1 :], cut  # on A


async def test_a_stream_resumes_on_another_control_plane_whose_log_writes_are_held_up(
    tmp_path: Path,
    pg_server: PgServer,
    http: aiohttp.ClientSession,
    sim: str,
    start_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy control plane may write its events long after it published them. A client
    resuming elsewhere from one of them waits for that write, not given up on as an id from
    nowhere, because the others heard the event relayed."""
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        await _listening(a, b)
        await _agent_on(b, a, sim, start_agent)
        b_log, a_log = b.services.hub.journal, a.services.hub.journal
        assert b_log is not None and a_log is not None
        reads = 0
        events_since = a.services.store.events_since

        async def counted(workflow_id: str, event_id: str) -> Any:
            nonlocal reads
            reads += 1
            return await events_since(workflow_id, event_id)

        monkeypatch.setattr(a.services.store, "events_since", counted)
        async with b_log._lock:  # B's log writes wait: B's streams carry on
            wf = await submit(a, WORKFLOW, **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3))})
            logged = (await whole_stream(b, wf["id"]))[1:]
            assert logged[-1][2]["status"] == "completed"
            first = logged[0][0]
            assert first is not None

            async def heard() -> bool:
                return a_log.was_heard(first)

            async def read_past_the_wait() -> bool:
                return reads >= 6 or resuming.done()

            await poll_until(heard, 10)
            resuming = asyncio.create_task(resumed(a, wf["id"], first))
            # Well past the three writes' wait an unheard id gets: A is still waiting.
            await poll_until(read_past_the_wait, 10)
            assert not resuming.done()
        assert await resuming == logged[1:]


async def test_what_a_control_plane_of_another_version_says_and_this_one_cannot_use_is_ignored(
    tmp_path: Path,
    pg_server: PgServer,
    http: aiohttp.ClientSession,
    sim: str,
    start_agent: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """During a rolling upgrade a newer control plane may say what this one does not know:
    new kinds, new fields, or (broken) the wrong types. It changes nothing and breaks nothing;
    what it can use, it uses."""
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        await _listening(a, b)
        runner = await _agent_on(b, a, sim, start_agent, tags=["gpu"])
        rid = runner["id"]
        listener = await asyncpg.connect(url)
        heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def hear(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if payload.startswith("{"):  # this test's own garbage aside
                heard.put_nowait(json.loads(payload))

        await listener.add_listener(COMMANDS_CHANNEL, hear)
        try:
            said: list[tuple[str, str | dict[str, Any]]] = [
                (COMMANDS_CHANNEL, "not json"),
                (COMMANDS_CHANNEL, "[1, 2]"),
                (COMMANDS_CHANNEL, {"k": "teleport", "r": rid}),
                (COMMANDS_CHANNEL, {"k": "rename", "r": rid, "name": 7, "tags": "abc", "status": "gone"}),
                (COMMANDS_CHANNEL, {"k": "stop", "r": rid, "w": 5, "a": "1"}),
                (COMMANDS_CHANNEL, {"k": "ask", "r": rid, "q": "q1", "what": "stats", "t": "soon"}),
                (EVENTS_CHANNEL, {"w": 5, "n": "status", "d": []}),
                (EVENTS_CHANNEL, {"w": "x", "n": "status", "d": "x"}),
                (WAITING_CHANNEL, {"w": 12}),
                # What it knows, with a field it does not: answered.
                (COMMANDS_CHANNEL, {"k": "ask", "r": rid, "q": "q2", "what": "stats", "t": 5, "since": 3}),
            ]
            for channel, message in said:
                payload = message if isinstance(message, str) else json.dumps(message | {"from": "next"})
                await listener.execute("SELECT pg_notify($1, $2)", channel, payload)
            answered: list[dict[str, Any]] = []
            while not any(m.get("k") == "reply" and m.get("q") == "q2" for m in answered):
                answered.append(await asyncio.wait_for(heard.get(), 20))
            replies = [m for m in answered if m.get("k") == "reply"]
            assert [(m["q"], m["to"], m["ok"]) for m in replies] == [("q2", "next", True)]
        finally:
            await listener.close()
        conn = b.services.registry.get(rid)
        assert conn is not None and (conn.name, conn.tags, conn.status) == (runner["name"], ["gpu"], "active")
        wf = await submit(a, SLOW, tags="gpu")
        done = await a.wait_for_status(wf["id"], {"completed", "failed", "invalid"}, timeout_s=30)
        assert done["status"] == "completed" and done["runner_id"] == rid
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
