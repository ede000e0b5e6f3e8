"""Projections (bot registry, portals, deletion timeline) and the human-facing `audit` views.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    DO $$
    BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_reader') THEN
            CREATE ROLE ledger_reader NOLOGIN;
        END IF;
    END
    $$;

    -- point-in-time and time-range questions start from received_at
    CREATE INDEX events_by_received_at ON ledger.events (received_at);

    -- Derived, disposable state: rebuilt from ledger.events at will. Not history.
    CREATE SCHEMA projections AUTHORIZATION ledger_owner;

    CREATE TABLE projections.checkpoints (
        projection  text PRIMARY KEY,
        position    bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO projections.checkpoints (projection, position) VALUES ('registry', 0);

    CREATE TABLE projections.bots (
        member_id               text NOT NULL,
        bot_id                  bigint NOT NULL,
        bot_code                text,
        api_version             text NOT NULL,
        status                  text NOT NULL,
        first_seen_position     bigint NOT NULL,
        first_seen_at           timestamptz NOT NULL,
        last_activity_position  bigint,
        last_activity_at        timestamptz,
        message_count           bigint NOT NULL,
        command_count           bigint NOT NULL,
        chat_join_count         bigint NOT NULL,
        deleted_position        bigint,
        deleted_at              timestamptz,
        deleted_by              text,
        deletion_cause          text,
        code_position           bigint,
        last_deletion_position  bigint,
        PRIMARY KEY (member_id, bot_id)
    );

    CREATE TABLE projections.deletions (
        position                bigint NOT NULL,
        bot_id                  bigint NOT NULL,
        member_id               text NOT NULL,
        domain                  text,
        bot_code                text,
        occurred_at             timestamptz,
        received_at             timestamptz NOT NULL,
        actor_user_id           text,
        cause                   text NOT NULL,
        event_type              text NOT NULL,
        event_hash              bytea NOT NULL,
        first_seen_at           timestamptz,
        last_activity_at        timestamptz,
        message_count           bigint NOT NULL,
        never_seen              boolean NOT NULL,
        repeated                boolean NOT NULL,
        activity_after_deletion boolean NOT NULL,
        activity_after_position bigint,
        PRIMARY KEY (position, bot_id)
    );
    CREATE INDEX deletions_by_portal ON projections.deletions (member_id, occurred_at);

    CREATE TABLE projections.portals (
        member_id               text PRIMARY KEY,
        domain                  text,
        trust_state             text NOT NULL,
        trust_position          bigint,
        installed_at            timestamptz,
        installed_position      bigint,
        uninstalled_at          timestamptz,
        uninstalled_position    bigint,
        install_count           bigint NOT NULL,
        app_version             text,
        event_count             bigint NOT NULL,
        first_event_position    bigint,
        last_event_at           timestamptz,
        last_event_position     bigint
    );

    CREATE TABLE projections.portal_lifecycle (
        position        bigint PRIMARY KEY,
        member_id       text NOT NULL,
        event_type      text NOT NULL,
        occurred_at     timestamptz,
        received_at     timestamptz NOT NULL,
        version         text,
        actor_user_id   text
    );

    ALTER TABLE projections.checkpoints OWNER TO ledger_owner;
    ALTER TABLE projections.bots OWNER TO ledger_owner;
    ALTER TABLE projections.deletions OWNER TO ledger_owner;
    ALTER TABLE projections.portals OWNER TO ledger_owner;
    ALTER TABLE projections.portal_lifecycle OWNER TO ledger_owner;
    GRANT USAGE ON SCHEMA projections TO ledger_app;
    GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA projections
        TO ledger_app;

    -- For people and BI tools: stable names, readable columns, documented. Views run with
    -- their owner's rights, so readers need rights on the views only.
    CREATE SCHEMA audit AUTHORIZATION ledger_owner;
    COMMENT ON SCHEMA audit IS
        'Read-only views of the Bitrix24 bot ledger for auditors and reporting tools.';

    CREATE VIEW audit.events AS
    SELECT e.position,
           e.received_at,
           e.occurred_at,
           e.member_id                             AS portal_member_id,
           p.domain                                AS portal_domain,
           e.event_type,
           e.origin,
           e.bot_ids,
           e.payload::jsonb #>> '{auth,user_id}'  AS actor_user_id,
           e.payload::jsonb                        AS payload,
           e.metadata::jsonb #> '{query}'          AS query,
           encode(e.hash, 'hex')                   AS event_hash,
           encode(e.payload_sha256, 'hex')         AS payload_sha256
    FROM ledger.events e
    LEFT JOIN projections.portals p ON p.member_id = e.member_id;
    COMMENT ON VIEW audit.events IS
        'Every stored event (secrets removed), in ledger order, with its chain hash.';

    CREATE VIEW audit.bots AS
    SELECT b.member_id               AS portal_member_id,
           p.domain                  AS portal_domain,
           b.bot_id,
           b.bot_code,
           b.api_version,
           b.status,
           b.first_seen_at,
           b.first_seen_position,
           b.last_activity_at,
           b.last_activity_position,
           b.message_count,
           b.command_count,
           b.chat_join_count,
           b.deleted_at,
           b.deleted_by              AS deleted_by_user_id,
           b.deletion_cause,
           b.deleted_position
    FROM projections.bots b
    LEFT JOIN projections.portals p ON p.member_id = b.member_id;
    COMMENT ON VIEW audit.bots IS
        'The bot registry: every bot any event named, per portal, active or deleted.';

    CREATE VIEW audit.deletions AS
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
           d.activity_after_position
    FROM projections.deletions d;
    COMMENT ON VIEW audit.deletions IS
        'The deletion timeline: one row per bot deletion, explicit or by uninstall.';

    CREATE VIEW audit.portals AS
    SELECT p.member_id               AS portal_member_id,
           p.domain                  AS portal_domain,
           p.trust_state,
           p.installed_at,
           p.uninstalled_at,
           p.install_count,
           p.app_version,
           p.event_count,
           p.last_event_at,
           p.last_event_position
    FROM projections.portals p;
    COMMENT ON VIEW audit.portals IS
        'Portals: trust, installation state and when each last sent anything.';

    CREATE VIEW audit.portal_lifecycle AS
    SELECT l.position, l.member_id AS portal_member_id, p.domain AS portal_domain,
           l.event_type, l.occurred_at, l.received_at, l.version AS app_version,
           l.actor_user_id
    FROM projections.portal_lifecycle l
    LEFT JOIN projections.portals p ON p.member_id = l.member_id;
    COMMENT ON VIEW audit.portal_lifecycle IS
        'Every install, update and uninstall of the application, per portal.';

    ALTER VIEW audit.events OWNER TO ledger_owner;
    ALTER VIEW audit.bots OWNER TO ledger_owner;
    ALTER VIEW audit.deletions OWNER TO ledger_owner;
    ALTER VIEW audit.portals OWNER TO ledger_owner;
    ALTER VIEW audit.portal_lifecycle OWNER TO ledger_owner;
    GRANT USAGE ON SCHEMA audit TO ledger_reader, ledger_app;
    GRANT SELECT ON ALL TABLES IN SCHEMA audit TO ledger_reader, ledger_app;
    """)


def downgrade() -> None:
    execute_script("""
    DROP SCHEMA audit CASCADE;
    DROP SCHEMA projections CASCADE;
    DROP INDEX ledger.events_by_received_at;
    """)
