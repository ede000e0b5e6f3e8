"""The projector writes as a role of its own; projections record the chain head they fold to;
payload anomalies are kept; "as of" a Bitrix24 time is served by an index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    DO $$
    BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_projector') THEN
            CREATE ROLE ledger_projector LOGIN;
        END IF;
    END
    $$;

    -- "as of" a Bitrix24 time (ts; events without one count by their received time)
    CREATE INDEX events_by_occurred_at ON ledger.events ((coalesce(occurred_at, received_at)));

    -- The chain head the projections were folded up to, committed with the checkpoint.
    ALTER TABLE projections.checkpoints ADD COLUMN head_hash bytea;
    UPDATE projections.checkpoints c SET head_hash = coalesce(
        (SELECT e.hash FROM ledger.events e WHERE e.position = c.position),
        decode(repeat('00', 32), 'hex'));
    ALTER TABLE projections.checkpoints ALTER COLUMN head_hash SET NOT NULL,
        ADD CHECK (length(head_hash) = 32);

    -- What the fold found unexpected in a payload (and left out of the registry).
    CREATE TABLE projections.anomalies (
        position    bigint PRIMARY KEY,
        member_id   text NOT NULL,
        event_type  text NOT NULL,
        bot_ids     bigint[] NOT NULL,
        notes       text[] NOT NULL
    );
    ALTER TABLE projections.anomalies OWNER TO ledger_owner;
    ALTER TABLE projections.deletions
        ADD COLUMN payload_anomalies text[] NOT NULL DEFAULT '{}';

    -- Latest times folded into a snapshot: it may serve an "as of" time no earlier than these.
    ALTER TABLE projections.snapshots ADD COLUMN max_received_at timestamptz,
        ADD COLUMN max_occurred_at timestamptz;

    -- Only the projector writes projections; the service reads them.
    GRANT USAGE ON SCHEMA ledger TO ledger_projector;
    GRANT SELECT ON ledger.events, ledger.stream_heads TO ledger_projector;
    GRANT SELECT ON public.alembic_version TO ledger_projector;
    GRANT USAGE ON SCHEMA projections TO ledger_projector;
    GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA projections
        TO ledger_projector;
    REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA projections FROM ledger_app;
    GRANT SELECT ON ALL TABLES IN SCHEMA projections TO ledger_app;

    CREATE OR REPLACE VIEW audit.deletions AS
    SELECT d.occurred_at             AS deleted_at,
           d.received_at,
           d.member_id               AS portal_member_id,
           d.domain                  AS portal_domain,
           d.bot_id,
           d.bot_code,
           d.actor_user_id           AS deleted_by_user_id,
           d.cause,
           d.event_type,
           d.position,
           encode(d.event_hash, 'hex') AS event_hash,
           d.first_seen_at,
           d.last_activity_at,
           d.message_count,
           d.never_seen              AS anomaly_never_seen,
           d.repeated                AS anomaly_repeated,
           d.activity_after_deletion AS anomaly_activity_after_deletion,
           d.activity_after_position,
           d.payload_anomalies
    FROM projections.deletions d;

    CREATE VIEW audit.anomalies AS
    SELECT a.position, a.member_id AS portal_member_id, a.event_type, a.bot_ids, a.notes
    FROM projections.anomalies a;
    COMMENT ON VIEW audit.anomalies IS
        'Stored events whose payload held something unexpected (what the registry left out).';
    ALTER VIEW audit.anomalies OWNER TO ledger_owner;
    GRANT SELECT ON audit.anomalies TO ledger_reader, ledger_app;
    """)


def downgrade() -> None:
    execute_script("""
    DROP VIEW audit.anomalies;
    DROP VIEW audit.deletions;
    CREATE VIEW audit.deletions AS
    SELECT d.occurred_at AS deleted_at, d.received_at, d.member_id AS portal_member_id,
           d.domain AS portal_domain, d.bot_id, d.bot_code,
           d.actor_user_id AS deleted_by_user_id, d.cause, d.event_type, d.position,
           encode(d.event_hash, 'hex') AS event_hash, d.first_seen_at, d.last_activity_at,
           d.message_count, d.never_seen AS anomaly_never_seen, d.repeated AS anomaly_repeated,
           d.activity_after_deletion AS anomaly_activity_after_deletion,
           d.activity_after_position
    FROM projections.deletions d;
    COMMENT ON VIEW audit.deletions IS
        'The deletion timeline: one row per bot deletion, explicit or by uninstall.';
    ALTER VIEW audit.deletions OWNER TO ledger_owner;
    GRANT SELECT ON audit.deletions TO ledger_reader, ledger_app;
    GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA projections
        TO ledger_app;
    REVOKE ALL ON ALL TABLES IN SCHEMA projections FROM ledger_projector;
    REVOKE ALL ON SCHEMA projections FROM ledger_projector;
    REVOKE ALL ON ledger.events, ledger.stream_heads FROM ledger_projector;
    REVOKE ALL ON SCHEMA ledger FROM ledger_projector;
    REVOKE ALL ON public.alembic_version FROM ledger_projector;
    ALTER TABLE projections.snapshots DROP COLUMN max_received_at,
        DROP COLUMN max_occurred_at;
    DROP TABLE projections.anomalies;
    ALTER TABLE projections.deletions DROP COLUMN payload_anomalies;
    ALTER TABLE projections.checkpoints DROP COLUMN head_hash;
    DROP INDEX ledger.events_by_occurred_at;
    """)
