"""When a pass delivered events to a mirror with a processing delay, and the span of their
timestamps (`mirror_deliveries`): a reconcile right after read such a mirror's windows
short while it was still processing what it had accepted, and `--repair` sent the
difference as well, billed twice once the mirror caught up.

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
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("mirror", sa.String(100), nullable=False),
        sa.Column("delivered_at", sa.BigInteger, nullable=False),
        sa.Column("first_ts", sa.BigInteger, nullable=False),
        sa.Column("last_ts", sa.BigInteger, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("mirror_deliveries_at", "mirror_deliveries", ["mirror", "delivered_at"])


def downgrade() -> None:
    op.drop_table("mirror_deliveries")
