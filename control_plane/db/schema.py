"""The schema: alembic migrations at start, and which code may serve a database that a newer
version has already migrated.

During a rolling upgrade the first control plane of the new version migrates the database
while control planes of the old one go on serving it, and one of those may restart before it
is replaced. Its migrations end where the new version's begin, so it must not run them; it
serves on if the new schema still keeps its code working, which the database itself says:
``schema_floor`` names the oldest schema revision whose code may serve it. A migration that
only adds leaves the floor; one that drops or changes what older code relies on raises it to
its own revision, and older code then refuses to start with a message saying what to run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.db.refusals import SchemaTooNew

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"

# The key of the PostgreSQL advisory lock migrations run under ("comfyfle", as a bigint).
MIGRATION_LOCK = 0x636F6D6679666C65


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def create_schema(engine: AsyncEngine) -> None:
    """Bring the database to the newest schema this version knows (alembic upgrade head),
    unless a newer version has migrated it further (see the module's docstring). On
    PostgreSQL, control planes starting together take turns under an advisory lock held
    until the migration commits: one migrates, the others then find nothing left to do
    (unlocked, all but one failed creating the same tables)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await conn.run_sync(_migrate)


def _migrate(sync: Connection) -> None:
    config = alembic_config(sync)
    scripts = ScriptDirectory.from_config(config)
    known = {script.revision for script in scripts.walk_revisions()}
    current = set(MigrationContext.configure(sync).get_current_heads())
    newer = current - known
    if not newer:
        command.upgrade(config, "head")
        return
    floor = sync.execute(text("SELECT oldest_code_schema FROM schema_floor")).scalar()
    ours = scripts.get_current_head()
    if floor not in known:
        raise SchemaTooNew(
            f"the database's schema is at {', '.join(sorted(newer))}, migrated by a newer comfyfleet that "
            f"needs code of schema {floor} or later; this version knows schema {ours}: upgrade it"
        )
    log.warning(
        "the database's schema is at %s, newer than this version's %s; serving on, as it keeps "
        "code of schema %s and later working (a rolling upgrade under way?)",
        ", ".join(sorted(newer)),
        ours,
        floor,
    )
