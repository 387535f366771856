"""what a runner's agent speaks, and the oldest code the schema still serves

Revision ID: 0005
Revises: 0004

From here on the database says which code may serve it: ``schema_floor`` holds the oldest
schema revision whose code still runs correctly on this schema. A migration that only adds
(a table, a nullable column) leaves it; one that removes or changes what older code relies
on raises it to its own revision. A control plane that finds the database migrated past
what it knows serves on if it knows the floor, and refuses to start otherwise
(``control_plane/db/schema.py``): that is what lets two versions serve together during a
rolling upgrade.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runner", schema=None) as batch_op:
        batch_op.add_column(sa.Column("agent_version", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("protocol_version", sa.Integer(), nullable=True))
    floor = op.create_table(
        "schema_floor",
        sa.Column("oldest_code_schema", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("oldest_code_schema"),
    )
    op.bulk_insert(floor, [{"oldest_code_schema": "0005"}])


def downgrade() -> None:
    op.drop_table("schema_floor")
    with op.batch_alter_table("runner", schema=None) as batch_op:
        batch_op.drop_column("protocol_version")
        batch_op.drop_column("agent_version")
