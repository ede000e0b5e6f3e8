"""An answer as of a time reads the rows it folds, not every row up to that time or the head.

A question as of a time (`received:T`, `ts:T`) folds, from the latest snapshot holding nothing
later than T (at position S), the events after S whose time is at or before T — in position
order; a spooled delivery or a sender's early `ts` can put such an event anywhere after S, so
no position bounds them. With an index on the time alone PostgreSQL read every row up to T
(all of them before S, to drop them by position); by position, every row from S to the head.
With the position beside the time in the index, `time <= T AND position > S` is decided in the
index: the heap rows read are the rows folded (the index entries up to T are stepped over, in
the index). The indexes keep their names, and serve every query the one-column ones served.
The expression's index carries its two columns too: PostgreSQL reads an expression index
alone (an index-only scan) only when every column the question names is in it — without
them it planned the walk from S to the head, sorted, instead.

Building them locks writes to ledger.events for the build (seconds per million events).

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-26
"""

from ledger.migrations import execute_script

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    DROP INDEX ledger.events_by_effective_time;
    CREATE INDEX events_by_effective_time
        ON ledger.events ((least(occurred_at, received_at)), position)
        INCLUDE (occurred_at, received_at);
    DROP INDEX ledger.events_by_received_at;
    CREATE INDEX events_by_received_at ON ledger.events (received_at, position);
    """)


def downgrade() -> None:
    execute_script("""
    DROP INDEX ledger.events_by_received_at;
    CREATE INDEX events_by_received_at ON ledger.events (received_at);
    DROP INDEX ledger.events_by_effective_time;
    CREATE INDEX events_by_effective_time ON ledger.events ((least(occurred_at, received_at)));
    """)
