"""A rejection drained again after a crash is recognised: each row names its arrival.

A spooled delivery refused on drain is written to the rejection log in the drain's transaction;
a crash after that COMMIT and before the spool's drained marker is written drains it again, and
the refusal was logged twice (events have their dedup key; rejections had none). Each rejection
now carries `arrival_sha256`, the SHA-256 of what identifies the arrival — when it was received,
from whom, and the body's size and hash (`ledger.hashing.rejection_arrival`), not the verdict,
which a later drain may word differently. A drain looks its rejections up by it under the
rejection log's head lock (every rejection writer holds that lock until COMMIT, so the look-up
is exact) and writes only the new ones; an online rejection is written with its key and no
look-up (no extra round trip). The index is not unique on purpose: two online arrivals identical
to the microsecond are two knocks, and must not fail a batch.

On a big table: the column is nullable without a default (a catalogue change, no rewrite); its
CHECK is added NOT VALID (rows before this revision are all NULL: nothing to check, no scan
under the table lock); the partial index holds no entry for them, so its build is one read of the
table under a lock that holds back rejection writes for that read (about a second per million
rows). Rows before this revision keep NULL and are never matched: they predate the key.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-27
"""

from ledger.migrations import execute_script

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    ALTER TABLE ledger.rejections ADD COLUMN arrival_sha256 bytea;
    ALTER TABLE ledger.rejections ADD CONSTRAINT rejections_arrival_sha256_length
        CHECK (length(arrival_sha256) = 32) NOT VALID;
    CREATE INDEX rejections_by_arrival ON ledger.rejections (arrival_sha256)
        WHERE arrival_sha256 IS NOT NULL;
    COMMENT ON COLUMN ledger.rejections.arrival_sha256 IS
        'SHA-256 of the arrival (received_at, peer, portal, event type, content type, body size '
        'and hash): a drain that runs again finds the row it wrote. NULL before migration 0016.';
    """)


def downgrade() -> None:
    execute_script("""
    DROP INDEX ledger.rejections_by_arrival;
    ALTER TABLE ledger.rejections DROP COLUMN arrival_sha256;
    """)
