"""the sweep a workflow belongs to

Revision ID: 0008
Revises: 0007

Only adds: the previous version's code serves on (the schema floor stays); the workflows it
creates belong to no sweep.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workflow") as batch:
        batch.add_column(sa.Column("sweep_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.create_index("ix_workflow_sweep_id", ["sweep_id"])


def downgrade() -> None:
    with op.batch_alter_table("workflow") as batch:
        batch.drop_index("ix_workflow_sweep_id")
        batch.drop_column("sweep_id")
