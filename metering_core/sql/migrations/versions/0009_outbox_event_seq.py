"""Where an owed event lies in the ledger (`event_seq`, its `events.seq`): a forwarder
reads the events of a pass by their primary key, a range of it, rather than looking each
up by its id (a second index, of text: two thirds of the read on PostgreSQL). Rows owed
before this revision are given theirs here; a row without one (an event gone, or a row
written by a process still on the previous revision) is read by its id, as before.
On PostgreSQL the column's lock is held while the rows are filled, and ingest (which
writes outbox rows) waits for it: upgrade when the outbox is short, not while it holds a
long outage's backlog.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("event_seq", sa.BigInteger))
    op.execute(
        "UPDATE outbox SET event_seq = (SELECT seq FROM events WHERE events.id = outbox.event_id)"
        " WHERE kind = 'usage'"
    )


def downgrade() -> None:
    # in place on both (SQLite 3.35+): a batch rebuild would drop the table's AUTOINCREMENT
    op.execute("ALTER TABLE outbox DROP COLUMN event_seq")
