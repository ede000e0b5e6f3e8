"""Gateway mode: every forward attempt to a route's destination, without the body.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    CREATE TABLE ledger.forward_attempts (
        id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        route_id      text NOT NULL,
        member_id     text NOT NULL,
        position      bigint,
        dedup_key     bytea NOT NULL,
        attempt       integer NOT NULL,
        outcome       text NOT NULL CHECK (outcome IN ('delivered', 'failed', 'given_up')),
        status        smallint,
        error         text,
        latency_ms    real,
        accepted_at   timestamptz NOT NULL,
        attempted_at  timestamptz NOT NULL
    );
    COMMENT ON TABLE ledger.forward_attempts IS
        'Gateway mode: each attempt to forward a stored delivery to a route''s destination, '
        'and each forward given up. Never the body. position is null for a delivery forwarded '
        'while spooled: it is found by (member_id, dedup_key) once drained (audit.forwards).';
    CREATE INDEX forward_attempts_by_position ON ledger.forward_attempts (position);
    CREATE INDEX forward_attempts_by_route ON ledger.forward_attempts (route_id, id);
    CREATE INDEX forward_attempts_by_identity ON ledger.forward_attempts (member_id, dedup_key);
    CREATE TRIGGER forward_attempts_no_update_delete BEFORE UPDATE OR DELETE
        ON ledger.forward_attempts FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER forward_attempts_no_truncate BEFORE TRUNCATE ON ledger.forward_attempts
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();
    ALTER TABLE ledger.forward_attempts OWNER TO ledger_owner;
    GRANT SELECT, INSERT ON ledger.forward_attempts TO ledger_app;

    CREATE VIEW audit.forwards AS
    SELECT a.id,
           a.route_id,
           a.member_id                          AS portal_member_id,
           coalesce(a.position, e.position)    AS position,
           e.event_type,
           encode(e.hash, 'hex')                AS event_hash,
           encode(a.dedup_key, 'hex')           AS spool_id,
           a.attempt,
           a.outcome,
           a.status,
           a.error,
           a.latency_ms,
           a.accepted_at,
           a.attempted_at
    FROM ledger.forward_attempts a
    LEFT JOIN ledger.events e ON e.member_id = a.member_id AND e.dedup_key = a.dedup_key;
    COMMENT ON VIEW audit.forwards IS
        'Gateway mode: every forward attempt and every forward given up, with the position of '
        'the event forwarded ("the bot never received event 412": outcome given_up).';
    ALTER VIEW audit.forwards OWNER TO ledger_owner;
    GRANT SELECT ON audit.forwards TO ledger_reader, ledger_app;
    """)


def downgrade() -> None:
    execute_script("""
    DROP VIEW audit.forwards;
    DROP TABLE ledger.forward_attempts;
    """)
