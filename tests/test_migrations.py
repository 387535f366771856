"""The schema comes from alembic migrations: upgrade, nothing left to migrate, downgrade —
on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from comfyfleet.processes import free_port
from comfyfleet.throwaway_postgres import PgServer
from control_plane.db.engine import make_engine
from control_plane.db.schema import MIGRATIONS, alembic_config, create_schema
from tests.test_cli import serving


async def test_upgrade_matches_the_models_and_downgrade_removes_everything(
    tmp_path: Path, database_url: str
) -> None:
    engine = make_engine(database_url or f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        await create_schema(engine)
        async with engine.connect() as conn:
            diffs = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata)
            )
            assert diffs == []  # the migrations build exactly what the models describe
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert {"account", "workflow", "task", "output", "runner", "template"} <= tables
        await create_schema(engine)  # a second start changes nothing
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(alembic_config(sync), "base"))
        async with engine.connect() as conn:
            left = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert left <= {"alembic_version"}
    finally:
        await engine.dispose()


async def test_three_replicas_starting_together_on_one_postgresql_all_serve_its_newest_schema(
    tmp_path: Path, pg_server: PgServer
) -> None:
    url = await pg_server.new_database()
    # Three replicas start together on an empty database: one migrates it, the others wait
    # for it and find nothing left to do; all three serve.
    replicas = await asyncio.gather(
        *(serving(tmp_path / f"r{i}", free_port(), "--database-url", url) for i in range(3))
    )
    try:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
                diffs = await conn.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata)
                )
        finally:
            await engine.dispose()
        heads = ScriptDirectory(str(MIGRATIONS)).get_heads()
        assert [v[0] for v in versions] == heads
        assert diffs == []
    finally:
        for proc in replicas:
            proc.terminate()
        assert [await asyncio.wait_for(proc.wait(), 20) for proc in replicas] == [0, 0, 0]


MIGRATE = """
import asyncio, sys
from control_plane.db.engine import make_engine
from control_plane.db.schema import create_schema
async def main() -> None:
    engine = make_engine(sys.argv[1])
    sys.stdin.readline()  # all ready: go together
    try:
        await create_schema(engine)
    finally:
        await engine.dispose()
asyncio.run(main())
"""


async def test_migrations_started_in_the_same_instant_on_postgresql_all_succeed(pg_server: PgServer) -> None:
    url = await pg_server.new_database()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", MIGRATE, url, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(4)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
    results = await asyncio.gather(*(asyncio.wait_for(proc.communicate(), 60) for proc in procs))
    errors = [err.decode()[-600:] for (_, err), proc in zip(results, procs, strict=True) if proc.returncode]
    assert errors == []
