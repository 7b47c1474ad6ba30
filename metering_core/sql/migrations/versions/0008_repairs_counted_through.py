"""What the ledger's total a repair sent held (`counted_through`: the highest event seq
stored when it was read): the repair stands for the events of its cell up to there, and
only for those. A dead letter of an event stored later, or an event a backfill owes the
mirror, is not in the correction and is sent (before, every event of a repaired cell was
held back, and one stored after the repair could never be billed). A seq, not a time: an
ingesting host's clock ahead of the reconciling one's would have let a counted event be
sent again. Repairs recorded before this revision have none; their `sent_at` stands in,
against the events' `ingested_at`.

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
    op.add_column("mirror_repairs", sa.Column("counted_through", sa.BigInteger))


def downgrade() -> None:
    # in place on both (SQLite 3.35+): a batch rebuild would drop the table's AUTOINCREMENT
    op.execute("ALTER TABLE mirror_repairs DROP COLUMN counted_through")
