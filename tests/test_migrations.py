"""The schema comes from alembic migrations: upgrade, nothing left to migrate, downgrade —
on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from control_plane.db.engine import alembic_config, create_schema, make_engine


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
