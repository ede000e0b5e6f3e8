"""Read API: bearer tokens, a record of verification runs, and indexes for its filters.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    CREATE TABLE ledger.api_tokens (
        name          text PRIMARY KEY,
        token_sha256  bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
        created_at    timestamptz NOT NULL,
        created_by    text NOT NULL,
        revoked_at    timestamptz,
        revoked_by    text
    );
    COMMENT ON TABLE ledger.api_tokens IS
        'Bearer tokens of the read API, stored as SHA-256 only.';

    CREATE TABLE ledger.verifications (
        id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ran_at         timestamptz NOT NULL,
        stream         text NOT NULL,
        verified_rows  bigint NOT NULL,
        head_position  bigint NOT NULL,
        head_hash      bytea NOT NULL,
        checkpoint_position bigint,
        ok             boolean NOT NULL,
        problem        text
    );
    CREATE TRIGGER verifications_no_update_delete BEFORE UPDATE OR DELETE ON ledger.verifications
        FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER verifications_no_truncate BEFORE TRUNCATE ON ledger.verifications
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();
    COMMENT ON TABLE ledger.verifications IS 'Every run of `ledger verify` and its outcome.';

    -- filters the read API offers, each answerable from an index in position order
    CREATE INDEX events_by_type ON ledger.events (event_type, position);
    CREATE INDEX events_by_bot ON ledger.events USING gin (bot_ids);

    ALTER TABLE ledger.api_tokens OWNER TO ledger_owner;
    ALTER TABLE ledger.verifications OWNER TO ledger_owner;
    GRANT SELECT, INSERT, UPDATE ON ledger.api_tokens TO ledger_app;
    GRANT SELECT, INSERT ON ledger.verifications TO ledger_app;
    """)


def downgrade() -> None:
    execute_script("""
    DROP INDEX ledger.events_by_bot;
    DROP INDEX ledger.events_by_type;
    DROP TABLE ledger.verifications;
    DROP TABLE ledger.api_tokens;
    """)
