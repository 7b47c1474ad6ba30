"""Meters and customers follow the ledger to its mirrors: the link from each ledger meter
to its counterpart on a mirror, an index of the meter and customer changes still owed (a
mirror gets them before any later event), the repairs reconcile sent, when each mirror
was added, its backfills, and the refusal notices it sent.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from metering_core.sql.schema import Sequence, Value

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_CHANGE_OWED = sa.text("refused IS NULL AND kind IN ('meter', 'customer')")


def upgrade() -> None:
    op.create_table(
        "mirror_meters",
        sa.Column("mirror", sa.String(100), primary_key=True),
        sa.Column("meter_id", sa.String(100), primary_key=True),
        sa.Column("mirror_meter_id", sa.String(100), nullable=False),
        sa.Column("created", sa.Boolean, nullable=False),
        sa.Column("linked_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "mirror_repairs",
        sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
        sa.Column("mirror", sa.String(100), nullable=False),
        sa.Column("meter_id", sa.String(100), nullable=False),
        sa.Column("customer_id", sa.String(100), nullable=False),
        sa.Column("window_start", sa.BigInteger, nullable=False),
        sa.Column("window_end", sa.BigInteger, nullable=False),
        sa.Column("amount", Value, nullable=False),
        sa.Column("sent_at", sa.BigInteger, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("mirror_repairs_cell", "mirror_repairs", ["mirror", "window_start"])
    op.create_table(
        "mirror_notices",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("mirror", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("error_count", sa.Integer, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "mirrors",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("added_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "mirror_backfills",
        sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
        sa.Column("mirror", sa.String(100), nullable=False),
        sa.Column("start", sa.BigInteger, nullable=False),
        sa.Column("end", sa.BigInteger, nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "outbox_changes",
        "outbox",
        ["mirror", "seq"],
        postgresql_where=_CHANGE_OWED,
        sqlite_where=_CHANGE_OWED,
    )


def downgrade() -> None:
    op.drop_index("outbox_changes", "outbox")
    op.drop_index("mirror_repairs_cell", "mirror_repairs")
    op.drop_table("mirror_repairs")
    op.drop_table("mirrors")
    op.drop_table("mirror_notices")
    op.drop_table("mirror_backfills")
    op.drop_table("mirror_meters")
