"""Fold records: what the fold reads of a payload, computed once at intake, stored beside the
event, read by rebuild and `as_of` instead of the payload — and checked against the payload."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import foldrecord, migrations, wire
from ledger.errors import DeliveryRejected
from ledger.foldrecord import FoldRecord, decode, encode, fold_record
from ledger.intake import Delivery, IntakeService
from ledger.models import ORIGIN_BITRIX24, TRUST_EVENT
from ledger.projections import readers
from ledger.settings import Settings
from ledger.simulation import Traffic
from ledger.storage.projection_store import TABLES
from tests.conftest import ClientFactory, Database, sample, sample_names
from tests.helpers import Client, install_sample_portal, post
from tests.test_derived_state import KNOWN_TYPES, POISONS, cli, json_values, shaped
from tests.test_planner import delivery, run, trusted
from tests.test_projections import ingest, projections_of, projector_of, view_contents

Admin: TypeAlias = "asyncpg.Connection[Any]"
NOW = datetime(2026, 3, 1, tzinfo=UTC)


# ---- the record, pure ------------------------------------------------------------------------


def _drafts(settings: Settings) -> list[Any]:
    intake = IntakeService(settings, committer=None)  # type: ignore[arg-type]  # drafts only
    bodies = [sample(name) for name in sample_names()]
    traffic = Traffic(seed=11, portals=6)
    bodies += [wire.http_build_query(traffic.next().document) for _ in range(1500)]
    drafts = []
    for body in bodies:
        try:
            drafts.append(intake.draft(Delivery(body, wire.FORM, "", "127.0.0.1"), NOW))
        except DeliveryRejected:  # a sample the intake refuses has no draft to check
            continue
    return drafts


def test_the_intakes_record_is_the_one_its_stored_payload_gives(settings: Settings) -> None:
    """Computed from the document the draft builder holds, it must equal what a reader of the
    stored payload text computes: the two paths of the fold cannot disagree."""
    drafts = _drafts(settings)
    assert len(drafts) > 1000
    with_codes = 0
    for draft in drafts:
        assert draft.fold_record is not None
        record = decode(draft.fold_record)
        assert record is not None
        from_payload = fold_record(draft.event_type, draft.origin, orjson.loads(draft.payload))
        assert record == from_payload, draft.payload
        with_codes += bool(record.codes)
    assert with_codes > 500  # the bot codes are in it


@given(st.sampled_from(KNOWN_TYPES) | st.text(max_size=8),
       st.sampled_from(["bitrix24", "operator", "ledger"]), shaped | json_values)
@settings(max_examples=300, deadline=None, database=None)
def test_any_payloads_record_round_trips(event_type: str, origin: str, payload: Any) -> None:
    record = fold_record(event_type, origin, payload)
    assert decode(encode(record)) == record


@given(st.sampled_from(KNOWN_TYPES) | st.text(max_size=8),
       st.sampled_from(["bitrix24", "operator", "ledger"]), shaped | json_values)
@settings(max_examples=500, deadline=None, database=None)
def test_the_intakes_shortcut_writes_what_the_reader_writes(event_type: str, origin: str,
                                                           payload: Any) -> None:
    """`stored` reads an ordinary payload in one go (`foldrecord._ordinary`): the same text as
    the reader's record, whatever the payload."""
    assert foldrecord.stored(event_type, origin, payload) == encode(
        fold_record(event_type, origin, payload))


def test_the_shortcut_takes_simulated_deliveries_and_leaves_odd_ones_to_the_reader() -> None:
    """Without this the test above could pass with the shortcut never (or always) taken."""
    traffic = Traffic(seed=12, portals=4)
    payloads = [wire.parse_php_form(wire.http_build_query(traffic.next().document),
                                    max_fields=1000, max_nesting=32) for _ in range(300)]
    for payload in payloads:
        event = payload["event"]
        assert foldrecord._ordinary(event, ORIGIN_BITRIX24, payload) == encode(
            fold_record(event, ORIGIN_BITRIX24, payload))
    odds: list[dict[str, Any]] = [
        {"data": {"BOT": {"x": {}}}}, {"auth": {"domain": 7}}, {"data": []},
        {"data": {"BOT_ID": "\xb2"}}, {"auth": {"user_id": 5}}, POISONS]
    for odd in odds:
        assert foldrecord._ordinary("ONIMBOTJOINCHAT", ORIGIN_BITRIX24, odd) is None
        assert fold_record("ONIMBOTJOINCHAT", ORIGIN_BITRIX24, odd).notes or odd == {
            "auth": {"user_id": 5}}
    assert foldrecord._ordinary(TRUST_EVENT, "operator", {"change": "allowed"}) is None


def test_the_poisons_are_noted_in_the_record_as_the_fold_notes_them() -> None:
    record = fold_record("ONIMBOTDELETE", ORIGIN_BITRIX24, POISONS)
    assert (record.actor, record.domain) == (None, None)
    assert "data.BOT_ID: '\\xb2' is not a bot id (ASCII digits, int64)" in record.notes
    assert decode(encode(record)) == record


@pytest.mark.parametrize("text", [
    "", "null", "[]", "{}", '{"v":2,"domain":"x"}', '{"v":1,"domain":7}', '{"v":1,"domain":""}',
    '{"v":1,"codes":{"567":"x"}}', '{"v":1,"codes":[[true,"x"]]}', '{"v":1,"codes":[["5","x"]]}',
    '{"v":1,"codes":[[5,"x"],[5,"y"]]}', '{"v":1,"notes":"x"}', '{"v":1,"notes":[1]}',
    '{"v":1,"other":1}', '{"v":true}', "not json",
])
def test_anything_but_a_record_of_this_version_is_not_used(text: str) -> None:
    assert decode(text) is None


def test_a_draft_without_a_record_gets_one_from_its_payload_in_the_planner() -> None:
    """Spool records written before fold records existed have none."""
    draft = dataclasses.replace(delivery("ONIMBOTDELETE", "T"), fold_record=None)
    made = run([draft], trusted("T"))
    row = made.events[0]
    assert row[14] == foldrecord.stored("ONIMBOTDELETE", ORIGIN_BITRIX24,
                                        orjson.loads(draft.payload))


# ---- stored, read, checked ------------------------------------------------------------------


async def test_every_stored_event_carries_the_record_its_payload_gives(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)  # an operator's and the ledger's trust events too
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
    rows = await admin.fetch(
        "SELECT event_type, origin, payload::text AS payload, fold_record::text AS record "
        "FROM ledger.events ORDER BY position")
    assert {r["event_type"] for r in rows} >= {TRUST_EVENT, "ONAPPINSTALL", "ONIMBOTDELETE"}
    for row in rows:
        assert row["record"] is not None
        assert decode(row["record"]) == fold_record(
            row["event_type"], row["origin"], orjson.loads(row["payload"]))
    deletion = decode(rows[-1]["record"])
    assert deletion == FoldRecord(domain="some-domain.bitrix24.com", actor="27",
                                  codes={567: "BOT"})


async def test_a_store_with_events_from_before_the_migration_rebuilds_to_what_incremental_gave(
    make_client: ClientFactory, settings: Settings, database: Database, admin: Admin
) -> None:
    """Events stored before migration 0011 have no fold record (the column comes back NULL
    for them, nothing is updated): they fold from their payloads, the later ones from their
    records, and a rebuild of the mixed store gives what incremental updating gave."""
    traffic = Traffic(seed=3, portals=5)
    before = await make_client(settings)
    await ingest(before, traffic, 300)
    await projector_of(before).catch_up()
    await before.close()
    await asyncio.to_thread(migrations.downgrade, database.admin_dsn, "0010")
    await asyncio.to_thread(migrations.upgrade, database.admin_dsn)
    old = await admin.fetchval("SELECT count(*) FROM ledger.events WHERE fold_record IS NULL")
    assert old > 300  # every event of before, trust events included

    client = await make_client(settings)
    projector = projector_of(client)
    for _ in range(3):
        await ingest(client, traffic, 200)
        await projector.catch_up()
    new = await admin.fetchval("SELECT count(*) FROM ledger.events WHERE fold_record IS NOT NULL")
    assert new >= 600
    incremental = await view_contents(admin)
    assert incremental["audit.deletions"].count("\n") > 10
    await projector.rebuild()
    assert await view_contents(admin) == incremental
    checked = await cli(database, "verify", "--projections", "--quiet")
    assert checked.exit_code == 0, checked.output


async def _forge_actor(admin: Admin, position: int, record: str) -> None:
    """A superuser's edit: the append-only trigger is off for this session only."""
    async with admin.transaction():
        await admin.execute("SET LOCAL session_replication_role = replica")
        await admin.execute("UPDATE ledger.events SET fold_record = $2::json WHERE position = $1",
                            position, record)


async def test_a_forged_fold_record_misleads_a_rebuild_and_verify_names_its_position(
    client: Client, admin: Admin, database: Database
) -> None:
    await install_sample_portal(client)
    _, stored = await post(client, sample("onimbotdelete-1"))
    position = stored["position"]
    projector = projector_of(client)
    await projector.catch_up()
    assert (await cli(database, "verify", "--projections", "--quiet")).exit_code == 0
    text = await admin.fetchval("SELECT fold_record::text FROM ledger.events WHERE position = $1",
                                position)
    real = decode(text)
    assert real is not None
    assert real.actor == "27"
    forged = encode(real._replace(actor="1"))
    await _forge_actor(admin, position, forged)

    await projector.rebuild()  # the rebuild reads the record, not the payload: it is misled
    assert await admin.fetchval("SELECT deleted_by FROM projections.bots WHERE bot_id = 567") == "1"
    tampered = await cli(database, "verify", "--projections", "--quiet")
    assert tampered.exit_code == 1
    assert f"ledger.events (position={position}) fold_record: stored '{forged}'" \
        in tampered.output, tampered.output
    assert (await cli(database, "verify", "--quiet")).exit_code == 0  # the chain is intact


async def test_a_record_that_is_not_one_is_ignored_by_the_fold_and_named_by_verify(
    client: Client, admin: Admin, database: Database
) -> None:
    await install_sample_portal(client)
    _, stored = await post(client, sample("onimbotdelete-1"))
    position = stored["position"]
    await _forge_actor(admin, position, '{"v":1,"actor":["x"]}')
    projector = projector_of(client)
    await projector.rebuild()  # folded from the payload instead: nothing a record says breaks it
    assert await admin.fetchval("SELECT deleted_by FROM projections.bots WHERE bot_id = 567") \
        == "27"
    tampered = await cli(database, "verify", "--projections", "--quiet")
    assert tampered.exit_code == 1
    assert f"ledger.events (position={position}) fold_record" in tampered.output, tampered.output


async def test_a_record_of_another_version_is_not_used_and_not_a_difference(
    client: Client, admin: Admin, database: Database
) -> None:
    """What a later fold version writes is ignored by this one (it reads the payload)."""
    await install_sample_portal(client)
    _, stored = await post(client, sample("onimbotdelete-1"))
    await _forge_actor(admin, stored["position"], '{"v":99,"actor":"1"}')
    await projector_of(client).rebuild()
    assert await admin.fetchval("SELECT deleted_by FROM projections.bots WHERE bot_id = 567") \
        == "27"
    checked = await cli(database, "verify", "--projections", "--quiet")
    assert checked.exit_code == 0, checked.output


async def test_rows_without_a_usable_record_in_the_middle_of_a_read_fold_in_order(
    client: Client, admin: Admin
) -> None:
    """Rows are folded as they are read, so the rows that need their payload are the ones to
    get wrong: here records of another version (their payloads are read in one more statement,
    for them and the rows after them) and rows stored without one (their payloads come with
    them) sit among usable records in one read. A rebuild, a catch-up from position 0 in one
    batch, and `as_of` all give what incremental updating gave before."""
    await ingest(client, Traffic(seed=5, portals=4), 400)
    projector = projector_of(client)
    await projector.catch_up()
    expected = await view_contents(admin)
    live = await readers.bots(projections_of(client), None)
    head = projector.checkpoint
    async with admin.transaction():
        await admin.execute("SET LOCAL session_replication_role = replica")
        await admin.execute("UPDATE ledger.events SET fold_record = '[99]' "
                            "WHERE position % 7 = 3 AND position > $1", head // 3)
        await admin.execute("UPDATE ledger.events SET fold_record = NULL "
                            "WHERE position % 5 = 1 AND position > $1", head // 2)
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE fold_record::text = '[99]'") > 10

    await projector.rebuild()
    assert await view_contents(admin) == expected
    assert await readers.bots(projections_of(client), projector, as_of=head) == live

    await admin.execute("TRUNCATE " + ", ".join(f"projections.{t}" for t in TABLES))
    await admin.execute("UPDATE projections.checkpoints SET position = 0")
    assert await projector.catch_up() == head  # one batch (10,000 at most)
    assert await view_contents(admin) == expected


async def test_the_read_ahead_waits_for_payloads_and_for_a_reader_that_stops_early(
    client: Client, admin: Admin
) -> None:
    """A stream asks for the next batch before it hands this one out; a payload read between
    batches, and leaving the stream with a read still in flight, wait for that read (one
    statement at a time per connection), and every row still comes once, in order."""
    await ingest(client, Traffic(seed=5, portals=2), 130)
    projections = projections_of(client)
    head = await admin.fetchval("SELECT position FROM ledger.stream_heads WHERE stream = 'events'")
    seen: list[int] = []
    async with projections.stream_events(head, batch=20) as stream:
        async for batch in stream:
            positions = [row[0] for row in batch]
            assert sorted(await stream.payloads(positions)) == positions
            seen += positions
    assert seen == list(range(1, head + 1))
    for _ in range(3):  # more connections than the pool's: each must come back usable
        async with projections.stream_events(head, batch=20) as stream:
            async for batch in stream:
                assert batch[0][0] == 1
                break
    assert (await projections.checkpoint("registry"))["position"] >= 0
