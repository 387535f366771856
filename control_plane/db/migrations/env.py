"""Alembic's environment: migrations run on the connection the control plane hands over
(``config.attributes["connection"]``), inside its own async engine; there is no alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from control_plane.db import tables  # noqa: F401  (registers the tables on the metadata)

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
