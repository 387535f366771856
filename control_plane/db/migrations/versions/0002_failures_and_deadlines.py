"""failures kept apart, retries, deadlines

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Idempotency answers are now written with what they answer for; a bare reservation
    # (status 0) left by a request that died under the previous scheme answers nothing.
    op.execute("DELETE FROM idempotency_record WHERE status = 0")
    with op.batch_alter_table("workflow", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure_reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("attempt_log", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("avoid_runner_ids", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("min_gpu_free_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("timeout_s", sa.Integer(), nullable=False, server_default="3600"))
        batch_op.add_column(
            sa.Column("queue_timeout_s", sa.Integer(), nullable=False, server_default="86400")
        )
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_workflow_deadline_at"), ["deadline_at"], unique=False)
    with op.batch_alter_table("template", schema=None) as batch_op:
        batch_op.add_column(sa.Column("timeout_s", sa.Integer(), nullable=True))
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("failure_kind", sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_column("failure_kind")
        batch_op.drop_column("reason")
    with op.batch_alter_table("template", schema=None) as batch_op:
        batch_op.drop_column("timeout_s")
    with op.batch_alter_table("workflow", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workflow_deadline_at"))
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("queue_timeout_s")
        batch_op.drop_column("timeout_s")
        batch_op.drop_column("min_gpu_free_bytes")
        batch_op.drop_column("not_before")
        batch_op.drop_column("avoid_runner_ids")
        batch_op.drop_column("attempt_log")
        batch_op.drop_column("failure_reason")
