"""When a forwarder last delivered events of an (event name, customer, hour of event time)
to a mirror with a processing delay (`mirror_deliveries`): a reconcile right after read
such a mirror's cells short while it was still processing what it had accepted, and
`--repair` sent the difference as well, billed twice once the mirror caught up.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mirror_deliveries",
        sa.Column("mirror", sa.String(100), primary_key=True),
        sa.Column("event_name", sa.String(100), primary_key=True),
        sa.Column("customer_id", sa.String(100), primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("delivered_at", sa.BigInteger, nullable=False),
    )
    op.create_index("mirror_deliveries_at", "mirror_deliveries", ["mirror", "delivered_at"])


def downgrade() -> None:
    op.drop_table("mirror_deliveries")
