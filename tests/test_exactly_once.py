"""Exactly once: a request under an Idempotency-Key creates one workflow (or one new attempt)
whatever crashes when. ``comfyfleet serve`` runs as a process of its own and dies at a fail
point (as a SIGKILL would: nothing cleaned up, nothing answered); the client retries against
the restarted control plane, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet import processes
from comfyfleet.admin import create_token
from control_plane import failpoints
from control_plane.settings import Settings
from tests.test_e2e import curl_form
from tests.test_faults import SLOW

pytestmark = pytest.mark.timeout(120)


class Served:
    """One control plane's data, served by a process that can be made to crash."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root, self.database_url = root, database_url
        self.port = processes.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.part: processes.Part | None = None

    async def start(self, failpoint: str = "") -> None:
        settings = {"failpoints": failpoint} if failpoint else {}
        self.part = processes.control_plane(
            self.root, self.port, database_url=self.database_url, settings=settings
        )
        await self.part.start()
        await processes.wait_until_answers(f"{self.base}/healthz")

    async def client(self, account: str) -> dict[str, str]:
        """Headers with a client token of ``account``, made straight in the database."""
        settings = Settings(data_dir=self.root, database_url=self.database_url).validate()
        return {"Authorization": f"Bearer {await create_token(settings, account, None, 'client', None)}"}

    async def add_runner(self, http: aiohttp.ClientSession, auth: dict[str, str]) -> None:
        async with http.post(f"{self.base}/v1/runner", json={"name": "r"}, headers=auth) as resp:
            assert resp.status == 201

    async def crashed(self) -> int | None:
        assert self.part is not None
        return await asyncio.wait_for(self.part.exited(), 30)

    async def stop(self) -> None:
        if self.part is not None:
            await self.part.stop()


async def post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], **kw: Any
) -> tuple[int, Any, bool]:
    async with http.post(url, headers=headers, **kw) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body, resp.headers.get("Idempotent-Replayed") == "true"


async def test_a_crash_around_the_commit_of_a_submit_leaves_exactly_one_workflow(
    tmp_path: Path, database_url: str, http: aiohttp.ClientSession
) -> None:
    served = Served(tmp_path / "cp", database_url)
    try:
        for point, replayed in (("before_workflow_commit", False), ("after_workflow_commit", True)):
            auth = await served.client(point)
            await served.start(point)
            await served.add_runner(http, auth)
            keyed = {**auth, "Idempotency-Key": f"submit-{point}"}
            with pytest.raises(aiohttp.ClientConnectionError):
                await post(http, f"{served.base}/v1/workflow", keyed, data=curl_form(SLOW))
            assert await served.crashed() == failpoints.EXIT_CODE

            await served.start()
            status, first, was_replayed = await post(
                http, f"{served.base}/v1/workflow", keyed, data=curl_form(SLOW)
            )
            # Committed before the crash: the answer is replayed; not committed: it runs now.
            assert (status, was_replayed) == (201, replayed), first
            status, again, was_replayed = await post(
                http, f"{served.base}/v1/workflow", keyed, data=curl_form(SLOW)
            )
            assert (status, again["id"], was_replayed) == (201, first["id"], True)
            async with http.get(f"{served.base}/v1/workflow", headers=auth) as resp:
                assert (await resp.json())["total"] == 1
            await served.stop()
    finally:
        await served.stop()


async def test_a_crash_after_a_rerun_from_a_task_commits_starts_one_new_attempt(
    tmp_path: Path, database_url: str, http: aiohttp.ClientSession
) -> None:
    served = Served(tmp_path / "cp", database_url)
    auth = await served.client("acme")
    try:
        await served.start("after_attempt_commit")
        await served.add_runner(http, auth)
        status, wf, _ = await post(http, f"{served.base}/v1/workflow", auth, data=curl_form(SLOW))
        assert status == 201
        status, _, _ = await post(http, f"{served.base}/v1/workflow/{wf['id']}/cancel", auth)
        assert status == 200
        keyed = {**auth, "Idempotency-Key": "rerun-1"}
        rerun_url = f"{served.base}/api/workflow/{wf['id']}/rerun"
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, rerun_url, keyed, json={})
        assert await served.crashed() == failpoints.EXIT_CODE

        await served.start()
        for _ in range(2):
            status, answer, was_replayed = await post(http, rerun_url, keyed, json={})
            assert (status, answer, was_replayed) == (200, wf["id"], True)
        async with http.get(f"{served.base}/v1/workflow/{wf['id']}", headers=auth) as resp:
            assert (await resp.json())["attempt"] == 2  # one new attempt, not one per try
    finally:
        await served.stop()


async def test_retries_at_the_same_time_create_one_workflow_and_get_one_answer(
    tmp_path: Path, database_url: str, http: aiohttp.ClientSession
) -> None:
    served = Served(tmp_path / "cp", database_url)
    auth = await served.client("acme")
    try:
        await served.start()
        await served.add_runner(http, auth)
        keyed = {**auth, "Idempotency-Key": "same"}
        answers = await asyncio.gather(
            *(post(http, f"{served.base}/v1/workflow", keyed, data=curl_form(SLOW)) for _ in range(8))
        )
        assert {status for status, _, _ in answers} == {201}
        assert len({body["id"] for _, body, _ in answers}) == 1
        async with http.get(f"{served.base}/v1/workflow", headers=auth) as resp:
            assert (await resp.json())["total"] == 1
    finally:
        await served.stop()
