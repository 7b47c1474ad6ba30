"""Meters and customers follow the ledger to its mirrors: the link from each ledger meter
to its counterpart on a mirror, and an index of the meter and customer changes still
owed (a mirror gets them before any later event).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

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
        sa.Column("linked_at", sa.BigInteger, nullable=False),
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
    op.drop_table("mirror_meters")
