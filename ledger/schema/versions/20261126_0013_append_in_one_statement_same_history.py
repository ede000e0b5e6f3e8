"""The one-statement append: the history the trust came from is checked; the unique index checks
the dedup keys.

`ledger.append_events` (migration 0012) trusted what the service remembered of a portal's trust
because no trust change was recorded after the position the service learned it at. That holds
only in the history the service learned it in. After a failover to a replica that had not
received the last commits, or a restore from a backup, under a running service, the head went
back: a trust change could then be recorded at or before that position (an operator ending a
portal's trust, a re-provisioning), and the head move past it again — the check passed, and a
delivery under a token PostgreSQL no longer trusts was stored where the long way refuses it.

So the service now also sends the chain hash it saw at that position, and the function writes
nothing unless the event there has that hash (one primary-key lookup, under the head lock with
the other checks): the same position in the same chain, hence the same trust up to it.

And the dedup keys are no longer looked up by a query of their own. The function's statements
are planned once per session and, after five calls, by a generic plan — which, made while
`ledger.events` was young (a new installation, a benchmark's fresh database), joined the keys
to a sequential scan of the whole table, and kept doing so as it grew until autovacuum's next
analyze: every statement, under the head lock, read every event. The insert itself meets any
stored key in the unique index `events_once_per_occurrence`, whatever the statistics say; a
violation of it rolls the insert back (a block of its own) and the function returns no row, as
for the other checks. The cheaper happy path too: one lookup per key, the one the insert makes.

The 0012 function is dropped — the service refuses a schema it does not match, so nothing calls
it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26
"""

import importlib.util
from pathlib import Path

from ledger.migrations import execute_script

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_SIGNATURE = """ledger.append_events(bigint, bytea, text[], text[], text[], text[], text[],
    timestamptz[], timestamptz[], bytea[], bytea[], text[], bytea[], text[], bytea[], text[],
    boolean)"""
_PREVIOUS = """ledger.append_events(bigint, text[], text[], text[], text[], text[],
    timestamptz[], timestamptz[], bytea[], bytea[], text[], bytea[], text[], bytea[], text[],
    boolean)"""


def upgrade() -> None:
    execute_script(f"""
    DROP FUNCTION {_PREVIOUS};
    CREATE FUNCTION ledger.append_events(
        trust_known_at bigint, trust_known_hash bytea, portals text[],
        m text[], t text[], o text[], b text[], oa timestamptz[], ra timestamptz[],
        dk bytea[], bs bytea[], pl text[], ps bytea[], md text[], en bytea[], fr text[],
        announce boolean,
        OUT start_position bigint, OUT start_hash bytea, OUT end_hash bytea
    ) RETURNS SETOF record
        LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        n integer := cardinality(m);
        h bytea;
        prevs bytea[] := '{{}}';
        hashes bytea[] := '{{}}';
        violated text;
    BEGIN
        SELECT s.position, s.hash INTO start_position, start_hash
        FROM ledger.stream_heads s WHERE s.stream = 'events' FOR UPDATE;
        IF NOT EXISTS (SELECT 1 FROM ledger.events e
                       WHERE e.position = trust_known_at AND e.hash = trust_known_hash)
           OR EXISTS (SELECT 1 FROM ledger.portal_trust p
                      WHERE p.member_id = ANY(portals) AND p.changed_position > trust_known_at)
        THEN
            RETURN;
        END IF;
        h := start_hash;
        FOR i IN 1 .. n LOOP
            prevs[i] := h;
            h := sha256(h || int8send(start_position + i) || en[i] || ps[i]);
            hashes[i] := h;
        END LOOP;
        BEGIN  -- a dedup key already stored: the unique index says so, and nothing is written
            INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids,
                occurred_at, received_at, dedup_key, body_sha256, payload, payload_sha256,
                metadata, prev_hash, hash, fold_record)
            SELECT start_position + r.i, r.m, r.t, r.o, r.b::bigint[], r.oa, r.ra, r.dk, r.bs,
                r.pl::json, r.ps, r.md::json, prevs[r.i], hashes[r.i], r.fr::json
            FROM unnest(m, t, o, b, oa, ra, dk, bs, pl, ps, md, fr) WITH ORDINALITY
                AS r(m, t, o, b, oa, ra, dk, bs, pl, ps, md, fr, i)
            ORDER BY r.i;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS violated = CONSTRAINT_NAME;
            IF violated = 'events_once_per_occurrence' THEN
                RETURN;
            END IF;
            RAISE;
        END;
        UPDATE ledger.stream_heads SET position = start_position + n, hash = h
        WHERE stream = 'events';
        IF announce THEN
            PERFORM pg_notify('ledger_events', (start_position + n)::text);
        END IF;
        end_hash := h;
        RETURN NEXT;
    END
    $fn$;
    ALTER FUNCTION {_SIGNATURE} OWNER TO ledger_owner;
    REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO ledger_app;
    """)


def downgrade() -> None:
    execute_script(f"DROP FUNCTION {_SIGNATURE};")
    # 0012's function, as 0012 creates it (one definition of it, not a copy here)
    path = Path(__file__).with_name("20261126_0012_append_in_one_statement.py")
    spec = importlib.util.spec_from_file_location("ledger_migration_0012", path)
    assert spec is not None
    assert spec.loader is not None
    previous = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    previous.upgrade()
