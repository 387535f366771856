"""a workflow's priority

Revision ID: 0007
Revises: 0006

Only adds: the previous version's code serves on (the schema floor stays); the workflows it
creates get priority 0.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workflow") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("workflow") as batch:
        batch.drop_column("priority")
