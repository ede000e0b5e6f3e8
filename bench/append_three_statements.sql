-- The three-statement ledger.append_events tried as migration 0016 and withdrawn (bench/RESULTS.md,
-- "PostgreSQL CPU per delivery"): a variant for `python -m bench.appendcpu`.

    CREATE FUNCTION ledger.append_events_v2(
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
        hashes bytea[];
        written bigint;
        violated text;
    BEGIN
        SELECT s.position, s.hash INTO start_position, start_hash
        FROM ledger.stream_heads s WHERE s.stream = 'events' FOR UPDATE;
        IF n = 0 THEN  -- no row to count (never sent by the service): the checks alone
            IF NOT EXISTS (SELECT 1 FROM ledger.events e
                           WHERE e.position = trust_known_at AND e.hash = trust_known_hash)
               OR EXISTS (SELECT 1 FROM ledger.portal_trust p
                          WHERE p.member_id = ANY(portals)
                            AND p.changed_position > trust_known_at)
            THEN
                RETURN;
            END IF;
        END IF;
        h := start_hash;
        FOR i IN 1 .. n LOOP
            h := sha256(h || int8send(start_position + i) || en[i] || ps[i]);
            hashes[i] := h;
        END LOOP;
        BEGIN  -- a dedup key already stored: the unique index says so, and nothing is written
            INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids,
                occurred_at, received_at, dedup_key, body_sha256, payload, payload_sha256,
                metadata, prev_hash, hash, fold_record)
            SELECT start_position + r.i, r.m, r.t, r.o, r.b::bigint[], r.oa, r.ra, r.dk, r.bs,
                r.pl::json, r.ps, r.md::json,
                CASE WHEN r.i = 1 THEN start_hash ELSE hashes[r.i - 1] END, hashes[r.i],
                r.fr::json
            FROM unnest(m, t, o, b, oa, ra, dk, bs, pl, ps, md, fr) WITH ORDINALITY
                AS r(m, t, o, b, oa, ra, dk, bs, pl, ps, md, fr, i)
            -- the history the trust came from, and no trust change since (one evaluation)
            WHERE EXISTS (SELECT 1 FROM ledger.events e
                          WHERE e.position = trust_known_at AND e.hash = trust_known_hash)
              AND NOT EXISTS (SELECT 1 FROM ledger.portal_trust p
                              WHERE p.member_id = ANY(portals)
                                AND p.changed_position > trust_known_at)
            ORDER BY r.i;
            GET DIAGNOSTICS written = ROW_COUNT;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS violated = CONSTRAINT_NAME;
            IF violated = 'events_once_per_occurrence' THEN
                RETURN;
            END IF;
            RAISE;
        END;
        IF written < n THEN  -- a check failed: nothing was written
            RETURN;
        END IF;
        UPDATE ledger.stream_heads SET position = start_position + n, hash = h
        WHERE stream = 'events'
        RETURNING CASE WHEN announce
                       THEN pg_notify('ledger_events', position::text)::text END
        INTO violated;
        end_hash := h;
        RETURN NEXT;
    END
    $fn$;
    