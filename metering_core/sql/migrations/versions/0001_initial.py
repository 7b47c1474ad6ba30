"""The first schema: meters, events (unique id), customers.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from metering_core.sql.schema import Sequence, Value

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meters",
        sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(100), nullable=False, unique=True),
        sa.Column("event_name", sa.String(100), nullable=False, unique=True),
        sa.Column("display_name", sa.String(250), nullable=False),
        sa.Column("aggregation", sa.String(20), nullable=False),
        sa.Column("dimensions", sa.JSON, nullable=False),
        sa.Column("description", sa.String(1000)),
        sa.Column("unique_dimension", sa.String(100)),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "events",
        sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(100), nullable=False, unique=True),
        sa.Column("meter_seq", sa.BigInteger, nullable=False),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("customer_id", sa.String(100), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("value", Value, nullable=False),
        sa.Column("dimensions", sa.JSON, nullable=False),
        sa.Column("cancelled", sa.Boolean, nullable=False, server_default=sa.false()),
        sqlite_autoincrement=True,
    )
    op.create_index("events_meter_customer_ts", "events", ["meter_seq", "customer_id", "ts"])
    op.create_index("events_meter_ts", "events", ["meter_seq", "ts"])
    op.create_table(
        "customers",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("name", sa.String(256)),
        sa.Column("email", sa.String(512)),
        sa.Column("metadata", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("customers")
    op.drop_table("events")
    op.drop_table("meters")
