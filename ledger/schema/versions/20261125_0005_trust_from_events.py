"""Trust state follows from the trust events alone; the service role cannot write it directly.

`ledger.portal_trust` and `ledger.portal_allowances` are maintained by a SECURITY DEFINER trigger
(owned by `ledger_owner`) on INSERT of `LEDGER.TRUST_CHANGED` events into `ledger.events`: it
applies the effect each event records (state, token digest, consumed allowance) exactly as
`ledger.trust.apply` does, and decides nothing. `ledger_app` keeps SELECT only, so a trust change
without a trust event — which is chained and append-only — is impossible for it.
Allowances become single-use: `consumed_position` names the trust event of the install that used
one; several may be open for one portal. Domains are normalised (lower case, no trailing dot).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    DROP INDEX ledger.portal_allowances_member;
    DROP INDEX ledger.portal_allowances_domain;
    ALTER TABLE ledger.portal_allowances
        ADD COLUMN consumed_position bigint REFERENCES ledger.events (position);
    ALTER TABLE ledger.portal_allowances ADD PRIMARY KEY (position);
    UPDATE ledger.portal_allowances SET domain = rtrim(lower(domain), '.')
        WHERE domain IS NOT NULL;
    UPDATE ledger.portal_trust SET domain = rtrim(lower(domain), '.') WHERE domain IS NOT NULL;
    CREATE INDEX portal_allowances_open_member ON ledger.portal_allowances (member_id)
        WHERE consumed_position IS NULL AND member_id IS NOT NULL;
    CREATE INDEX portal_allowances_open_domain ON ledger.portal_allowances (domain)
        WHERE consumed_position IS NULL AND domain IS NOT NULL;
    COMMENT ON COLUMN ledger.portal_allowances.consumed_position IS
        'The trust event of the install this allowance admitted; NULL while it is open.';
    -- the trust events in order, for the offline trust state and verification
    CREATE INDEX events_trust_changes ON ledger.events (position)
        WHERE event_type = 'LEDGER.TRUST_CHANGED';

    CREATE FUNCTION ledger.apply_trust_event() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        p jsonb := NEW.payload::jsonb;
        change text := p ->> 'change';
        member text := nullif(p ->> 'member_id', '');
        portal_domain text := rtrim(lower(p ->> 'domain'), '.');
        token bytea := decode(p ->> 'token_sha256', 'hex');
    BEGIN
        IF change = 'allowed' THEN
            INSERT INTO ledger.portal_allowances (member_id, domain, allowed_at, position)
            VALUES (member, CASE WHEN member IS NULL THEN portal_domain END,
                    NEW.received_at, NEW.position);
        ELSIF change IN ('established', 'provisioned', 'ended') THEN
            IF member IS NULL OR member <> NEW.member_id THEN
                RAISE EXCEPTION 'trust event at % names no portal of its own', NEW.position;
            END IF;
            IF change <> 'ended' AND token IS NULL THEN
                RAISE EXCEPTION 'trust event at % carries no token digest', NEW.position;
            END IF;
            INSERT INTO ledger.portal_trust AS t
                (member_id, domain, state, token_sha256, changed_at, changed_position)
            VALUES (member, portal_domain,
                    CASE WHEN change = 'ended' THEN 'ended' ELSE 'trusted' END,
                    CASE WHEN change = 'ended' THEN NULL ELSE token END,
                    NEW.received_at, NEW.position)
            ON CONFLICT (member_id) DO UPDATE SET
                domain = coalesce(EXCLUDED.domain, t.domain),
                state = EXCLUDED.state,
                token_sha256 = EXCLUDED.token_sha256,
                changed_at = EXCLUDED.changed_at,
                changed_position = EXCLUDED.changed_position;
            IF change IN ('established', 'provisioned')
                    AND jsonb_typeof(p -> 'allowance_position') = 'number' THEN
                UPDATE ledger.portal_allowances SET consumed_position = NEW.position
                WHERE position = (p ->> 'allowance_position')::bigint
                    AND consumed_position IS NULL;
            END IF;
        ELSE
            RAISE EXCEPTION 'trust event at % records an unknown change %', NEW.position, change;
        END IF;
        RETURN NULL;
    END
    $fn$;
    ALTER FUNCTION ledger.apply_trust_event() OWNER TO ledger_owner;
    REVOKE ALL ON FUNCTION ledger.apply_trust_event() FROM PUBLIC;
    CREATE TRIGGER events_apply_trust AFTER INSERT ON ledger.events
        FOR EACH ROW WHEN (NEW.event_type = 'LEDGER.TRUST_CHANGED' AND NEW.origin <> 'bitrix24')
        EXECUTE FUNCTION ledger.apply_trust_event();

    -- derived from history: nobody edits it, only the trigger writes it
    CREATE TRIGGER portal_trust_no_delete BEFORE DELETE ON ledger.portal_trust
        FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER portal_trust_no_truncate BEFORE TRUNCATE ON ledger.portal_trust
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER portal_allowances_no_delete BEFORE DELETE ON ledger.portal_allowances
        FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER portal_allowances_no_truncate BEFORE TRUNCATE ON ledger.portal_allowances
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();

    REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ledger.portal_trust, ledger.portal_allowances
        FROM ledger_app;
    GRANT SELECT ON ledger.portal_trust, ledger.portal_allowances TO ledger_app;
    """)


def downgrade() -> None:
    execute_script("""
    DROP TRIGGER events_apply_trust ON ledger.events;
    DROP FUNCTION ledger.apply_trust_event();
    DROP TRIGGER portal_trust_no_delete ON ledger.portal_trust;
    DROP TRIGGER portal_trust_no_truncate ON ledger.portal_trust;
    DROP TRIGGER portal_allowances_no_delete ON ledger.portal_allowances;
    DROP TRIGGER portal_allowances_no_truncate ON ledger.portal_allowances;
    DROP INDEX ledger.events_trust_changes;
    DROP INDEX ledger.portal_allowances_open_member;
    DROP INDEX ledger.portal_allowances_open_domain;
    DELETE FROM ledger.portal_allowances WHERE consumed_position IS NOT NULL;
    ALTER TABLE ledger.portal_allowances DROP CONSTRAINT portal_allowances_pkey;
    ALTER TABLE ledger.portal_allowances DROP COLUMN consumed_position;
    DELETE FROM ledger.portal_allowances a USING ledger.portal_allowances b
        WHERE a.position > b.position
            AND (a.member_id = b.member_id OR a.domain = b.domain);
    CREATE UNIQUE INDEX portal_allowances_member ON ledger.portal_allowances (member_id)
        WHERE member_id IS NOT NULL;
    CREATE UNIQUE INDEX portal_allowances_domain ON ledger.portal_allowances (domain)
        WHERE domain IS NOT NULL;
    GRANT SELECT, INSERT, UPDATE ON ledger.portal_trust TO ledger_app;
    GRANT SELECT, INSERT ON ledger.portal_allowances TO ledger_app;
    """)
