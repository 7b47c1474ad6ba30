"""When a mirror was added may be unknown (`mirrors.added_at` NULL): a store that forwarded
to its mirrors before 0005 recorded when each was added kept no trace of it, and the time
it was registered at, after the upgrade, would have a backfill of a mirror that forgets
event ids (Stripe) send again every event forwarded before: billed twice (probe).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mirrors") as batch:
        batch.alter_column("added_at", existing_type=sa.BigInteger, nullable=True)


def downgrade() -> None:
    # unknown becomes the epoch's first microsecond, so that a backfill of a forgetting
    # mirror by the older code sends nothing it may have had (0 it read as none noted, and
    # sent everything: review); upgraded again, it stays a known time, and sends nothing
    op.execute("UPDATE mirrors SET added_at = 1 WHERE added_at IS NULL")
    with op.batch_alter_table("mirrors") as batch:
        batch.alter_column("added_at", existing_type=sa.BigInteger, nullable=False)
