"""The mirrors' outbox: a row per stored event (and cancellation) per mirror, written in
the transaction that stores it, until a forwarder has delivered it (then deleted) or the
mirror refused it (then kept, with the reason).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from metering_core.sql.schema import Sequence

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_OWED = sa.text("refused IS NULL")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
        sa.Column("mirror", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("event_id", sa.String(100), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("claimed_until", sa.BigInteger),
        sa.Column("refused", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "outbox_owed", "outbox", ["mirror", "seq"], postgresql_where=_OWED, sqlite_where=_OWED
    )


def downgrade() -> None:
    op.drop_index("outbox_owed", "outbox")
    op.drop_table("outbox")
