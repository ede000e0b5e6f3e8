"""An append of ordinary deliveries in one statement: lock, check, chain, write, move the head.

`ledger.append_events` is the store's fast path (`ledger.storage.store`, "one round trip"): the
service planned the batch on trust it holds in memory, and this function, under the events head's
row lock, checks what that plan assumed — that none of the batch's portals changed trust since the
position the service knew it at (`portal_trust.changed_position`, which only the trust trigger
moves), and that none of its dedup keys is stored — then numbers and chains the events after the
head as it finds it, writes them and moves the head. Called outside a transaction block, the call
is its own transaction, committed (synchronous_commit) before the result reaches the service. It
returns no row when an assumption failed: the service then appends the batch the long way, with
the facts loaded under the lock, so the verdicts are always those of PostgreSQL's trust.

Each statement of a VOLATILE PL/pgSQL function takes its own snapshot, so the checks, run after
the lock is granted, see every append committed before it (the reason the long way reads its
facts in a statement of its own). The chain is the one `ledger.hashing.chain_hash` computes:
SHA-256(previous hash || uint64be(position) || entry || SHA-256(payload)).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26
"""

from ledger.migrations import execute_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    CREATE FUNCTION ledger.append_events(
        trust_known_at bigint, portals text[],
        m text[], t text[], o text[], b text[], oa timestamptz[], ra timestamptz[],
        dk bytea[], bs bytea[], pl text[], ps bytea[], md text[], en bytea[], fr text[],
        announce boolean,
        OUT start_position bigint, OUT start_hash bytea, OUT end_hash bytea
    ) RETURNS SETOF record
        LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        n integer := cardinality(m);
        h bytea;
        prevs bytea[] := '{}';
        hashes bytea[] := '{}';
    BEGIN
        SELECT s.position, s.hash INTO start_position, start_hash
        FROM ledger.stream_heads s WHERE s.stream = 'events' FOR UPDATE;
        IF EXISTS (SELECT 1 FROM ledger.portal_trust p
                   WHERE p.member_id = ANY(portals) AND p.changed_position > trust_known_at)
           OR EXISTS (SELECT 1 FROM unnest(m, dk) AS k(member_id, dedup_key)
                      JOIN ledger.events e USING (member_id, dedup_key)) THEN
            RETURN;
        END IF;
        h := start_hash;
        FOR i IN 1 .. n LOOP
            prevs[i] := h;
            h := sha256(h || int8send(start_position + i) || en[i] || ps[i]);
            hashes[i] := h;
        END LOOP;
        INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids,
            occurred_at, received_at, dedup_key, body_sha256, payload, payload_sha256, metadata,
            prev_hash, hash, fold_record)
        SELECT start_position + r.i, r.m, r.t, r.o, r.b::bigint[], r.oa, r.ra, r.dk, r.bs,
            r.pl::json, r.ps, r.md::json, prevs[r.i], hashes[r.i], r.fr::json
        FROM unnest(m, t, o, b, oa, ra, dk, bs, pl, ps, md, fr) WITH ORDINALITY
            AS r(m, t, o, b, oa, ra, dk, bs, pl, ps, md, fr, i)
        ORDER BY r.i;
        UPDATE ledger.stream_heads SET position = start_position + n, hash = h
        WHERE stream = 'events';
        IF announce THEN
            PERFORM pg_notify('ledger_events', (start_position + n)::text);
        END IF;
        end_hash := h;
        RETURN NEXT;
    END
    $fn$;
    ALTER FUNCTION ledger.append_events(bigint, text[], text[], text[], text[], text[],
        timestamptz[], timestamptz[], bytea[], bytea[], text[], bytea[], text[], bytea[], text[],
        boolean) OWNER TO ledger_owner;
    REVOKE ALL ON FUNCTION ledger.append_events(bigint, text[], text[], text[], text[], text[],
        timestamptz[], timestamptz[], bytea[], bytea[], text[], bytea[], text[], bytea[], text[],
        boolean) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION ledger.append_events(bigint, text[], text[], text[], text[],
        text[], timestamptz[], timestamptz[], bytea[], bytea[], text[], bytea[], text[], bytea[],
        text[], boolean) TO ledger_app;
    """)


def downgrade() -> None:
    execute_script("""
    DROP FUNCTION ledger.append_events(bigint, text[], text[], text[], text[], text[],
        timestamptz[], timestamptz[], bytea[], bytea[], text[], bytea[], text[], bytea[], text[],
        boolean);
    """)
