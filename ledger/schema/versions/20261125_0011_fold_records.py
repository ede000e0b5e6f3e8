"""Each event's fold record: what the fold reads of its payload, computed once at intake.

A rebuild and `as_of` read this small column instead of parsing whole payloads
(`ledger/foldrecord.py`). Adding a nullable column without a default rewrites nothing and fires
no trigger: events stored before this revision keep NULL and are folded from their payload, as
before (no backfill: history is never updated, and a backfill here would freeze today's fold
code, or a copy of it in SQL, into a migration). The record is derived state outside the chain
hash; `ledger verify --projections` recomputes it from the payload (docs/spec/chain.md).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from ledger.migrations import execute_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    ALTER TABLE ledger.events ADD COLUMN fold_record json;
    COMMENT ON COLUMN ledger.events.fold_record IS
        'What the projections read of the payload (domain, actor, version, bot codes, notes), '
        'derived from it at intake; NULL for events stored before it existed. Outside the chain '
        'hash: `ledger verify --projections` recomputes it from the payload.';
    """)


def downgrade() -> None:
    execute_script("ALTER TABLE ledger.events DROP COLUMN fold_record;")
