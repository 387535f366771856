"""A rolling upgrade: control planes and agents of this version and of the next serve one
PostgreSQL together.

The next version is made from this one the way a release grows: its agent protocol goes to
3 (still speaking 2) and it brings a migration that adds a column. It runs from a copy of the
source tree, as separate processes, beside this version's processes, and each side must
work with the other: work submitted to either runs on agents of either, and this version's
control plane restarts on the schema the next one migrated, until a later migration says
that its code may no longer serve.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from alembic.script import ScriptDirectory

from comfyfleet import processes
from comfyfleet.admin import create_token
from comfyfleet.throwaway_postgres import PgServer
from control_plane.db.schema import MIGRATIONS
from control_plane.settings import Settings
from tests.conftest import AgentFactory, poll_until, sse_frames
from tests.test_e2e import curl_form
from tests.test_faults import SLOW

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("comfyfleet", "control_plane", "protocol", "runner_agent")
NEXT = "99.0.0"  # the next agent's version

# This version's newest migration, and the one the next version adds after it.
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head() or ""
AFTER = f"{int(HEAD) + 1:04d}"
NEXT_MIGRATION = '''"""the next version's: a column that only it uses

Revision ID: {after}
Revises: {head}
"""

import sqlalchemy as sa
from alembic import op

revision = "{after}"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workflow", schema=None) as batch_op:
        batch_op.add_column(sa.Column("note", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflow", schema=None) as batch_op:
        batch_op.drop_column("note")
'''


def next_version(into: Path) -> Path:
    """This source tree as its next release would be: another version, protocol 3 (speaking 2
    as well), one migration more."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    messages = into / "protocol" / "messages.py"
    text = messages.read_text()
    assert "\nPROTOCOL_VERSION = 2 " in text and "\nOLDEST_PROTOCOL_VERSION = 2 " in text
    messages.write_text(text.replace("\nPROTOCOL_VERSION = 2 ", "\nPROTOCOL_VERSION = 3 "))
    package = into / "runner_agent" / "__init__.py"
    text = package.read_text()
    assert '__version__ = metadata.version("comfyfleet")' in text
    package.write_text(text.replace('metadata.version("comfyfleet")', repr(NEXT)))
    versions = into / "control_plane" / "db" / "migrations" / "versions"
    assert sorted(p.name for p in versions.glob("0*.py"))[-1].startswith(HEAD)
    migration = NEXT_MIGRATION.format(after=AFTER, head=HEAD)
    (versions / f"{AFTER}_the_next_versions_column.py").write_text(migration)
    return into


def next_code(part: processes.Part, code: Path) -> processes.Part:
    """``part`` run from the next version's tree (``python -m`` puts the working directory
    first on the path, so it runs there too)."""
    return dataclasses.replace(part, env=part.env | {"PYTHONPATH": str(code)}, cwd=code)


@dataclasses.dataclass
class Plane:
    part: processes.Part
    base: str

    async def start(self) -> None:
        await self.part.start()
        await processes.wait_until_answers(f"{self.base}/healthz")


def plane(root: Path, replica: str, url: str, code: Path | None) -> Plane:
    port = processes.free_port()
    part = processes.control_plane(
        root / "cp", port, database_url=url, settings={"replica_id": replica, "heartbeat_s": "1"}
    )
    part = dataclasses.replace(part, log=root / f"serve-{replica}.log")
    if code is not None:
        part = next_code(part, code)
    return Plane(part, f"http://127.0.0.1:{port}")


@dataclasses.dataclass
class Client:
    http: aiohttp.ClientSession
    headers: dict[str, str]

    async def call(self, method: str, base: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, base + path, headers=self.headers, **kwargs) as resp:
            return resp.status, await resp.json()

    async def run(self, submit_on: str, follow_on: str, tags: str) -> dict[str, Any]:
        """Submit on one control plane, follow on another until the end; the workflow."""
        status, wf = await self.call("POST", submit_on, "/v1/workflow", data=curl_form(SLOW, tags=tags))
        assert status == 201, wf
        told = []
        url = f"{follow_on}/v1/workflow/{wf['id']}/subscribe"
        async with self.http.get(url, headers=self.headers) as resp:
            async for _, name, data in sse_frames(resp):
                if name == "status":
                    told.append(data["status"])
        assert told[-1] == "completed", told
        _, done = await self.call("GET", submit_on, f"/v1/workflow/{wf['id']}")
        return done  # type: ignore[no-any-return]

    async def speaks(self, base: str, runner_id: str, agent: str, protocol: int) -> bool:
        _, seen = await self.call("GET", base, f"/v1/runner/{runner_id}")
        said = (seen["agent_version"], seen["protocol_version"])
        return bool(seen["connected"]) and said == (agent, protocol)


async def schema_of(url: str) -> tuple[str, str]:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
        floor = await conn.fetchval("SELECT oldest_code_schema FROM schema_floor")
        return version, floor
    finally:
        await conn.close()


async def test_this_version_and_the_next_serve_one_database_together(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    url = await pg_server.new_database()
    old = plane(tmp_path, "old", url, None)
    new = plane(tmp_path, "new", url, next_version(tmp_path / "next"))
    agent: processes.Part | None = None
    try:
        await old.start()
        token = await create_token(
            Settings(data_dir=tmp_path / "cp", database_url=url), "alice", None, "client", None
        )
        client = Client(http, {"Authorization": f"Bearer {token}"})
        _, old_runner = await client.call("POST", old.base, "/v1/runner", json={"name": "o", "tags": ["old"]})
        _, new_runner = await client.call("POST", old.base, "/v1/runner", json={"name": "n", "tags": ["new"]})
        old_agent = await start_agent(old.base, old_runner["token"], sim)
        this = old_agent.settings.agent_version
        await poll_until(lambda: client.speaks(old.base, old_runner["id"], this, 2))

        # The first control plane of the next version migrates; this one goes on serving.
        await new.start()
        assert await schema_of(url) == (AFTER, "0005")  # it only adds: the floor stays
        # The next version's agent, on this version's control plane: they agree on 2.
        agent = processes.agent(
            tmp_path / "next-agent",
            f"{old.base},{new.base}",
            new_runner["token"],
            sim,
            settings={"reconnect_initial_s": "0.05", "reconnect_max_s": "0.5"},
        )
        agent = next_code(agent, tmp_path / "next")
        await agent.start()
        await poll_until(lambda: client.speaks(new.base, new_runner["id"], NEXT, 2), timeout_s=30)

        # Submitted to either, run by agents of either, followed on the other.
        done = await client.run(new.base, old.base, tags="old")
        assert done["runner_id"] == old_runner["id"]
        done = await client.run(old.base, new.base, tags="new")
        assert done["runner_id"] == new_runner["id"]

        # This version's control plane restarts on the next one's schema and serves on;
        # meanwhile the next agent has moved to the next control plane, and speaks 3 there.
        assert await old.part.stop() == 0
        await poll_until(lambda: client.speaks(new.base, new_runner["id"], NEXT, 3), timeout_s=30)
        await old.start()
        assert f"newer than this version's {HEAD}; serving on" in old.part.log.read_text()
        done = await client.run(old.base, old.base, tags="new")
        assert done["runner_id"] == new_runner["id"]
        await poll_until(lambda: client.speaks(old.base, old_runner["id"], this, 2))
        done = await client.run(old.base, new.base, tags="old")
        assert done["runner_id"] == old_runner["id"]

        # A later migration that older code cannot run on raises the floor: this version
        # then refuses to start, and says what to do.
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE schema_floor SET oldest_code_schema = $1", AFTER)
        finally:
            await conn.close()
        assert await old.part.stop() == 0
        await old.part.start()
        assert await old.part.exited() == 2
        assert (
            f"needs code of schema {AFTER} or later; this version knows schema {HEAD}: upgrade it"
            in old.part.log.read_text()
        )
    finally:
        if agent is not None:
            await agent.stop()
        for each in (old, new):
            await each.part.stop()
