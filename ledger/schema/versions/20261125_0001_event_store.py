"""The append-only event store, its rejection log, portal trust and the roles that guard them.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    DO $$
    BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_owner') THEN
            CREATE ROLE ledger_owner NOLOGIN;
        END IF;
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_app') THEN
            CREATE ROLE ledger_app LOGIN;
        END IF;
    END
    $$;

    CREATE SCHEMA ledger AUTHORIZATION ledger_owner;
    COMMENT ON SCHEMA ledger IS
        'Bitrix24 chatbot audit ledger: append-only store (events), rejected deliveries, trust.';

    -- One row per stream: the single serialisation point of appends. Holding its row lock until
    -- COMMIT makes positions gap-free and commit-ordered, and gives the hash chain its predecessor.
    CREATE TABLE ledger.stream_heads (
        stream      text PRIMARY KEY CHECK (stream IN ('events', 'rejections')),
        position    bigint NOT NULL CHECK (position >= 0),
        hash        bytea NOT NULL CHECK (length(hash) = 32)
    );
    INSERT INTO ledger.stream_heads VALUES
        ('events', 0, decode(repeat('00', 32), 'hex')),
        ('rejections', 0, decode(repeat('00', 32), 'hex'));

    CREATE TABLE ledger.events (
        position        bigint PRIMARY KEY CHECK (position > 0),
        member_id       text NOT NULL,
        event_type      text NOT NULL,
        origin          text NOT NULL CHECK (origin IN ('bitrix24', 'operator', 'ledger')),
        bot_ids         bigint[] NOT NULL,
        occurred_at     timestamptz,
        received_at     timestamptz NOT NULL,
        dedup_key       bytea NOT NULL CHECK (length(dedup_key) = 32),
        body_sha256     bytea CHECK (length(body_sha256) = 32),
        payload         json NOT NULL,
        payload_sha256  bytea NOT NULL CHECK (length(payload_sha256) = 32),
        metadata        json NOT NULL,
        prev_hash       bytea NOT NULL CHECK (length(prev_hash) = 32),
        hash            bytea NOT NULL CHECK (length(hash) = 32),
        CONSTRAINT events_once_per_occurrence UNIQUE (member_id, dedup_key)
    );
    CREATE INDEX events_by_portal ON ledger.events (member_id, position);
    COMMENT ON TABLE ledger.events IS
        'Every verified delivery, secrets removed, in gap-free commit order; never updated.';
    COMMENT ON COLUMN ledger.events.payload IS
        'The decoded delivery minus secrets, key order as received (json, not jsonb, on purpose).';
    COMMENT ON COLUMN ledger.events.metadata IS
        'Delivery facts outside the body: query string, removed-secret fingerprints, peer.';

    CREATE TABLE ledger.redeliveries (
        position        bigint NOT NULL REFERENCES ledger.events (position),
        received_at     timestamptz NOT NULL,
        body_sha256     bytea,
        peer            text
    );
    CREATE INDEX redeliveries_by_position ON ledger.redeliveries (position);
    COMMENT ON TABLE ledger.redeliveries IS
        'Each later delivery of an already stored occurrence (answered as a duplicate).';

    CREATE TABLE ledger.rejections (
        position        bigint PRIMARY KEY CHECK (position > 0),
        received_at     timestamptz NOT NULL,
        status          smallint NOT NULL,
        reason          text NOT NULL,
        detail          text NOT NULL,
        member_id       text,
        event_type      text,
        peer            text,
        content_type    text,
        body_size       bigint NOT NULL,
        body_sha256     bytea NOT NULL CHECK (length(body_sha256) = 32),
        excerpt         text NOT NULL,
        prev_hash       bytea NOT NULL CHECK (length(prev_hash) = 32),
        hash            bytea NOT NULL CHECK (length(hash) = 32)
    );
    COMMENT ON TABLE ledger.rejections IS
        'Every delivery refused at the door, with a redacted, size-capped excerpt; never updated.';

    -- Trust is current state, not history (the history is the LEDGER.TRUST_CHANGED events).
    CREATE TABLE ledger.portal_trust (
        member_id        text PRIMARY KEY,
        domain           text,
        state            text NOT NULL CHECK (state IN ('trusted', 'ended')),
        token_sha256     bytea CHECK (length(token_sha256) = 32),
        changed_at       timestamptz NOT NULL,
        changed_position bigint NOT NULL REFERENCES ledger.events (position),
        CHECK ((state = 'trusted') = (token_sha256 IS NOT NULL))
    );
    CREATE TABLE ledger.portal_allowances (
        member_id        text,
        domain           text,
        allowed_at       timestamptz NOT NULL,
        position         bigint NOT NULL REFERENCES ledger.events (position),
        CHECK (num_nonnulls(member_id, domain) = 1)
    );
    CREATE UNIQUE INDEX portal_allowances_member ON ledger.portal_allowances (member_id)
        WHERE member_id IS NOT NULL;
    CREATE UNIQUE INDEX portal_allowances_domain ON ledger.portal_allowances (domain)
        WHERE domain IS NOT NULL;

    -- Immutability in the database itself, for every role including the owner.
    CREATE FUNCTION ledger.forbid_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        RAISE EXCEPTION 'ledger.% is append-only: % is forbidden', TG_TABLE_NAME, TG_OP
            USING HINT = 'history is never changed; append a correcting event instead';
    END
    $fn$;
    CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON ledger.events
        FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON ledger.events
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER rejections_no_update_delete BEFORE UPDATE OR DELETE ON ledger.rejections
        FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER rejections_no_truncate BEFORE TRUNCATE ON ledger.rejections
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER redeliveries_no_update_delete BEFORE UPDATE OR DELETE ON ledger.redeliveries
        FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER redeliveries_no_truncate BEFORE TRUNCATE ON ledger.redeliveries
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();

    ALTER TABLE ledger.stream_heads OWNER TO ledger_owner;
    ALTER TABLE ledger.events OWNER TO ledger_owner;
    ALTER TABLE ledger.redeliveries OWNER TO ledger_owner;
    ALTER TABLE ledger.rejections OWNER TO ledger_owner;
    ALTER TABLE ledger.portal_trust OWNER TO ledger_owner;
    ALTER TABLE ledger.portal_allowances OWNER TO ledger_owner;
    ALTER FUNCTION ledger.forbid_change() OWNER TO ledger_owner;

    -- The service may append and read history, and keep current trust; nothing more.
    GRANT USAGE ON SCHEMA ledger TO ledger_app;
    GRANT SELECT, INSERT ON ledger.events, ledger.redeliveries, ledger.rejections TO ledger_app;
    GRANT SELECT, UPDATE ON ledger.stream_heads TO ledger_app;
    GRANT SELECT, INSERT, UPDATE ON ledger.portal_trust TO ledger_app;
    GRANT SELECT, INSERT ON ledger.portal_allowances TO ledger_app;
    GRANT SELECT ON public.alembic_version TO ledger_app;
    """)


def downgrade() -> None:
    # Roles are cluster-wide and may serve other databases: they stay.
    execute_script("""
    REVOKE ALL ON public.alembic_version FROM ledger_app;
    DROP SCHEMA ledger CASCADE;
    """)
