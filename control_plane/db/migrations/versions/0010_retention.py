"""what refers to each input file, and when a workflow's files were removed

Revision ID: 0010
Revises: 0009

Only adds: the previous version's code serves on (the schema floor stays). The workflows it
creates and deletes keep ``workflow_input`` right too, through the triggers: whatever code
path inserts or deletes a workflow, the references to its input files go with it, in the
same transaction. Existing workflows' references are filled in here.

Files are fixed when a workflow is created (a rerun is a new workflow; a new attempt keeps
them), so the triggers watch inserts and deletes, not updates.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_SQLITE = [
    """CREATE TRIGGER workflow_input_on_insert AFTER INSERT ON workflow FOR EACH ROW
    BEGIN
        INSERT OR IGNORE INTO workflow_input (workflow_id, sha256)
        SELECT NEW.id, json_extract(f.value, '$.sha256')
        FROM json_each(NEW.workflow_params, '$.files') AS f
        WHERE json_extract(f.value, '$.sha256') IS NOT NULL;
    END""",
    """CREATE TRIGGER workflow_input_on_delete AFTER DELETE ON workflow FOR EACH ROW
    BEGIN DELETE FROM workflow_input WHERE workflow_id = OLD.id; END""",
]
_POSTGRESQL = [
    """CREATE FUNCTION workflow_input() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO workflow_input (workflow_id, sha256)
            SELECT NEW.id, f.value ->> 'sha256'
            FROM json_each(COALESCE(NEW.workflow_params -> 'files', '{}'::json)) AS f
            WHERE f.value ->> 'sha256' IS NOT NULL
            ON CONFLICT DO NOTHING;
        ELSE
            DELETE FROM workflow_input WHERE workflow_id = OLD.id;
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER workflow_input AFTER INSERT OR DELETE ON workflow
    FOR EACH ROW EXECUTE FUNCTION workflow_input()""",
]


def upgrade() -> None:
    op.create_table(
        "workflow_input",
        sa.Column("workflow_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("workflow_id", "sha256"),
    )
    op.create_index("ix_workflow_input_sha256", "workflow_input", ["sha256"])
    op.create_index("ix_output_sha256", "output", ["sha256"])
    # Not batch mode: on SQLite a batch would rebuild the table and lose its triggers.
    op.add_column("workflow", sa.Column("files_removed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_workflow_retention", "workflow", ["files_removed_at", "completed_at"])
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)
    _fill_in_existing(op.get_bind())


def _fill_in_existing(bind: sa.Connection) -> None:
    workflows = sa.table("workflow", sa.column("id"), sa.column("workflow_params", sa.JSON()))
    refs = sa.table("workflow_input", sa.column("workflow_id"), sa.column("sha256"))
    rows: list[dict[str, str]] = []
    for workflow_id, params in bind.execute(sa.select(workflows.c.id, workflows.c.workflow_params)):
        files = (params or {}).get("files") or {}
        shas = {str(f["sha256"]) for f in files.values() if isinstance(f, dict) and f.get("sha256")}
        rows.extend({"workflow_id": workflow_id, "sha256": sha} for sha in sorted(shas))
    if rows:
        bind.execute(sa.insert(refs), rows)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER workflow_input ON workflow")
        op.execute("DROP FUNCTION workflow_input()")
    else:
        op.execute("DROP TRIGGER workflow_input_on_insert")
        op.execute("DROP TRIGGER workflow_input_on_delete")
    op.drop_index("ix_workflow_retention", "workflow")
    # SQLite drops a column in place (3.35 and later): a batch would rebuild the table and
    # lose the webhook triggers.
    op.drop_column("workflow", "files_removed_at")
    op.drop_index("ix_output_sha256", "output")
    op.drop_index("ix_workflow_input_sha256", "workflow_input")
    op.drop_table("workflow_input")
