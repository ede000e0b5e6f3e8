"""Snapshots of the projections' fold state, so answers "as of" a moment start near it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    CREATE TABLE projections.snapshots (
        projection  text NOT NULL,
        position    bigint NOT NULL,
        taken_at    timestamptz NOT NULL DEFAULT now(),
        state       bytea NOT NULL,
        PRIMARY KEY (projection, position)
    );
    COMMENT ON TABLE projections.snapshots IS
        'Fold state at a position (zlib-compressed JSON); derived, dropped by every rebuild.';
    ALTER TABLE projections.snapshots OWNER TO ledger_owner;
    GRANT SELECT, INSERT, DELETE, TRUNCATE ON projections.snapshots TO ledger_app;
    """)


def downgrade() -> None:
    execute_script("DROP TABLE projections.snapshots;")
