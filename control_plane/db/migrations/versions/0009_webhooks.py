"""webhooks: endpoints, the outbox, and the trigger that fills it

Revision ID: 0009
Revises: 0008

Only adds: the previous version's code serves on (the schema floor stays). Its status
changes fill the outbox too, through the trigger, and this version's control planes deliver.

The trigger writes a ``webhook_change`` row in the very transaction of a workflow's status
change (or its creation) when the workflow names a ``webhook_url`` or its account has an
active endpoint: whatever code path changed the status, its announcement commits or rolls
back with it.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_WANTED = """(NEW.webhook_url IS NOT NULL OR EXISTS (
    SELECT 1 FROM webhook_endpoint e WHERE e.account_id = NEW.account_id AND e.status = 'active'))"""
_ROW = (
    "(workflow_id, account_id, status, attempt, changed_at)"
    " VALUES (NEW.id, NEW.account_id, NEW.status, NEW.attempt, NEW.updated_at)"
)

_SQLITE = [
    f"""CREATE TRIGGER webhook_change_on_insert AFTER INSERT ON workflow
    FOR EACH ROW WHEN {_WANTED}
    BEGIN INSERT INTO webhook_change {_ROW}; END""",
    f"""CREATE TRIGGER webhook_change_on_update AFTER UPDATE OF status, attempt ON workflow
    FOR EACH ROW WHEN (NEW.status <> OLD.status OR NEW.attempt <> OLD.attempt) AND {_WANTED}
    BEGIN INSERT INTO webhook_change {_ROW}; END""",
]
_POSTGRESQL = [
    f"""CREATE FUNCTION webhook_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF (TG_OP = 'INSERT' OR NEW.status <> OLD.status OR NEW.attempt <> OLD.attempt) AND {_WANTED} THEN
            INSERT INTO webhook_change {_ROW};
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER webhook_change AFTER INSERT OR UPDATE OF status, attempt ON workflow
    FOR EACH ROW EXECUTE FUNCTION webhook_change()""",
]


def upgrade() -> None:
    with op.batch_alter_table("account") as batch:
        batch.add_column(sa.Column("webhook_secret", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    with op.batch_alter_table("workflow") as batch:
        batch.add_column(sa.Column("webhook_url", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.create_table(
        "webhook_endpoint",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("account_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("url", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("secret", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("disabled_reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook_endpoint") as batch:
        batch.create_index("ix_webhook_endpoint_account_id", ["account_id"], unique=False)
    op.create_table(
        "webhook_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workflow_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("account_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "webhook_delivery",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("account_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("endpoint_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("url", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("event_type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("workflow_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("payload", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempt_log", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook_delivery") as batch:
        batch.create_index("ix_webhook_delivery_account_id", ["account_id"], unique=False)
        batch.create_index("ix_webhook_delivery_endpoint_id", ["endpoint_id"], unique=False)
        batch.create_index("ix_webhook_delivery_workflow_id", ["workflow_id"], unique=False)
        batch.create_index("ix_webhook_delivery_due", ["status", "next_attempt_at"], unique=False)
    for statement in _POSTGRESQL if op.get_bind().dialect.name == "postgresql" else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER webhook_change ON workflow")
        op.execute("DROP FUNCTION webhook_change()")
    else:
        op.execute("DROP TRIGGER webhook_change_on_insert")
        op.execute("DROP TRIGGER webhook_change_on_update")
    op.drop_table("webhook_delivery")
    op.drop_table("webhook_change")
    op.drop_table("webhook_endpoint")
    with op.batch_alter_table("workflow") as batch:
        batch.drop_column("webhook_url")
    with op.batch_alter_table("account") as batch:
        batch.drop_column("webhook_secret")
