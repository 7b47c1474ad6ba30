"""When the ledger's total a repair sent was read (`counted_at`): the repair stands for the
events of its cell stored before then, and only for those. A dead letter of an event
stored later, or an event a backfill owes the mirror, is not in the correction and is
sent (before, every event of a repaired cell was held back as sent, and one stored after
the repair could never be billed). Repairs recorded before this revision have none; their
`sent_at` stands in.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("mirror_repairs", sa.Column("counted_at", sa.BigInteger))


def downgrade() -> None:
    # in place on both (SQLite 3.35+): a batch rebuild would drop the table's AUTOINCREMENT
    op.execute("ALTER TABLE mirror_repairs DROP COLUMN counted_at")
