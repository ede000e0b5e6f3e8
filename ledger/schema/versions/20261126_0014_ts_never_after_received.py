"""`as_of=ts:` counts an event by its Bitrix24 time, but never later than its received time.

`ts` is the sender's to set. Counted as sent, one verified delivery with `ts` in the year 9999
raised every later fold snapshot's latest Bitrix24 time to 9999, so no snapshot after it could
serve a `ts:` question before 9999 and every such question folded every event since that
delivery — work that grew with the store, on the serving event loop. An event cannot have
happened after the ledger received it: a `ts:` question now takes the events whose
`least(occurred_at, received_at)` is at or before its time (`least` ignores NULL, so events
without a `ts` count by their received time, as before). That is bounded by the ledger's own
clock, and so is a snapshot's latest such time.

- `events_by_effective_time` serves that expression; `events_by_occurred_at` (on
  `coalesce(occurred_at, received_at)`) served only the old rule and goes.
- `projections.snapshots.max_effective_at`: the latest `least(occurred_at, received_at)` folded
  into a snapshot. Snapshots saved before this revision have none; for them the reader takes
  `least(max_occurred_at, max_received_at)`, which bounds it from above (each event's
  `least(...)` is at most its `coalesce(...)` and at most its received time): correct, at worst
  conservative by the portals' clock skew, and never the year 9999 — nothing to run.
  `max_occurred_at` is still written as before, so a downgrade finds it as it expects.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-26
"""

from ledger.migrations import execute_script

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    -- "as of" a Bitrix24 time: ts, but never after the received time; no ts: the received time
    CREATE INDEX events_by_effective_time ON ledger.events ((least(occurred_at, received_at)));
    DROP INDEX ledger.events_by_occurred_at;

    ALTER TABLE projections.snapshots ADD COLUMN max_effective_at timestamptz;
    COMMENT ON COLUMN projections.snapshots.max_effective_at IS
        'latest least(occurred_at, received_at) folded into this state: it may serve '
        'as_of=ts: times no earlier (NULL: saved before 0014; then least(max_occurred_at, '
        'max_received_at) bounds it)';
    """)


def downgrade() -> None:
    execute_script("""
    ALTER TABLE projections.snapshots DROP COLUMN max_effective_at;
    CREATE INDEX events_by_occurred_at ON ledger.events ((coalesce(occurred_at, received_at)));
    DROP INDEX ledger.events_by_effective_time;
    """)
