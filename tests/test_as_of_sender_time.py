"""`as_of=ts:` and a sender's `ts`: no time a sender writes makes the read side's work grow with
the store (an event counts by its `ts` but never later than its received time, migration 0014).

Found by a "break this" review: one verified delivery with `ts=253402300799` (year 9999) raised
every later snapshot's latest Bitrix24 time to 9999, and from then on every `ts:` question
folded every event since that delivery (601 events instead of 0, snapshots every 50)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from alembic.script import ScriptDirectory

from ledger import migrations, wire
from ledger.asof import Occurred
from ledger.projections import fold
from ledger.projections import projector as projector_module
from ledger.projections.fold import State
from ledger.settings import Settings
from tests.conftest import ClientFactory, Database, sample
from tests.helpers import install_sample_portal, post
from tests.test_derived_state import Admin, bot_event, cli, insert_events
from tests.test_projections import projections_of, projector_of

YEAR_9999 = 253402300799
EVERY = 5


def message(message_id: int, ts: int | None = None) -> bytes:
    """The sample portal's message delivery, told apart by MESSAGE_ID, with `ts` if given."""
    document = wire.parse_php_form(sample("onimbotmessageadd-1"), max_fields=999, max_nesting=9)
    document["data"]["PARAMS"]["MESSAGE_ID"] = str(message_id)
    if ts is not None:
        document["ts"] = str(ts)
    return wire.http_build_query(document)


async def folded_as_of(client: Any, moment: datetime) -> tuple[State, int]:
    """The fold as of Bitrix24 time `moment`, and how many events it folded after the
    snapshot it started from."""
    counts: list[int] = []
    state = await projector_module.fold_to(projections_of(client), Occurred(moment),
                                           counts.append)
    return state, sum(counts)


async def by_the_rule(client: Any, head: int, moment: datetime) -> State:
    """From position 0 in position order, the events whose `ts` — never later than their
    received time; none: the received time — is at or before `moment`: the rule written out
    here, not by SQL."""
    state = State()
    async with projections_of(client).stream_events(head) as stream:
        async for batch in stream:
            kept = [row for row in batch  # row[5], row[6]: occurred_at, received_at
                    if min(t for t in (row[5], row[6]) if t is not None) <= moment]
            await projector_module._fold(state, kept, stream.payloads)
    return state


async def test_a_year_9999_ts_does_not_stop_later_ts_questions_from_using_snapshots(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin,
) -> None:
    """On main this folds every event since the far-future delivery (here 30) instead of fewer
    than the snapshot interval."""
    client = await make_client(settings_factory(projector_snapshot_every=EVERY))
    projector = projector_of(client)
    await install_sample_portal(client)
    status, future = await post(client, message(900000, ts=YEAR_9999))
    assert status == 200, future  # verified, stored as sent
    assert await admin.fetchval("SELECT occurred_at FROM ledger.events WHERE position = $1",
                                future["position"]) == datetime(9999, 12, 31, 23, 59, 59,
                                                                tzinfo=UTC)
    await projector.catch_up()
    for start in range(900001, 900031, 3):
        for message_id in range(start, start + 3):
            assert (await post(client, message(message_id)))[0] == 200
        await projector.catch_up()
    head = projector.checkpoint
    assert head - future["position"] >= 30
    assert await admin.fetchval("SELECT count(*) FROM projections.snapshots") >= 5

    now = datetime.now(UTC)
    state, folded = await folded_as_of(client, now)
    assert folded < EVERY, folded  # from the latest snapshot, not from before the delivery
    assert state.position == head  # every event counts by now: the future one too
    reference = await projector_module.fold_to(projections_of(client), head)
    assert fold.dump_state(state) == fold.dump_state(reference)
    # the snapshots' recorded time is the ledger's clock's, not the sender's
    assert await admin.fetchval(
        "SELECT max(max_effective_at) FROM projections.snapshots") <= now
    # a question before the delivery was received still leaves it out
    received = await admin.fetchval("SELECT received_at FROM ledger.events WHERE position = $1",
                                    future["position"])
    before, _ = await folded_as_of(client, received - timedelta(microseconds=1))
    assert fold.dump_state(before) == fold.dump_state(
        await by_the_rule(client, head, received - timedelta(microseconds=1)))
    assert fold.dump_state(before) != fold.dump_state(state)  # one message fewer


async def test_a_snapshot_saved_before_0014_is_used_and_its_9999_is_not_carried_on(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin,
) -> None:
    """Snapshots saved before the migration have no `max_effective_at`: the reader bounds it by
    their received time, and the next snapshot's time does not inherit the old 9999."""
    client = await make_client(settings_factory(projector_snapshot_every=EVERY))
    projector = projector_of(client)
    await install_sample_portal(client)
    assert (await post(client, message(910000, ts=YEAR_9999)))[0] == 200
    for message_id in range(910001, 910006):
        assert (await post(client, message(message_id)))[0] == 200
    await projector.catch_up()
    (old,) = await admin.fetch("SELECT position, max_occurred_at FROM projections.snapshots")
    assert old["max_occurred_at"].year == 9999  # the old record, as main wrote it
    await admin.execute("UPDATE projections.snapshots SET max_effective_at = NULL")  # pre-0014

    _, folded = await folded_as_of(client, datetime.now(UTC))
    assert folded == projector.checkpoint - old["position"]  # it starts from that snapshot
    for message_id in range(910006, 910006 + EVERY):
        assert (await post(client, message(message_id)))[0] == 200
    await projector.catch_up()
    (newest,) = await admin.fetch("SELECT position, max_effective_at FROM projections.snapshots "
                                  "ORDER BY position DESC LIMIT 1")
    assert newest["position"] > old["position"]
    assert newest["max_effective_at"] <= datetime.now(UTC)
    _, folded = await folded_as_of(client, datetime.now(UTC))
    assert folded == projector.checkpoint - newest["position"]


async def test_a_report_range_holds_a_deletion_whose_ts_is_in_the_year_9999(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin,
    database: Database, tmp_path: Path,
) -> None:
    """The report's `--from`/`--to` take deletions by the same rule: on main a deletion sent
    with `ts` in the year 9999 fell outside every range with an end — hidden from the report
    of the day it was received."""
    client = await make_client(settings_factory())
    await install_sample_portal(client)
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200
    document = wire.parse_php_form(sample("onimbotdelete-1"), max_fields=999, max_nesting=9)
    document["ts"] = str(YEAR_9999)
    status, stored = await post(client, wire.http_build_query(document))
    assert status == 200, stored
    await projector_of(client).catch_up()
    received = await admin.fetchval("SELECT received_at FROM ledger.events WHERE position = $1",
                                    stored["position"])
    output = tmp_path / "r.html"
    made = await cli(database, "report", "--output", str(output),
                     "--from", (received - timedelta(hours=1)).isoformat(),
                     "--to", (received + timedelta(hours=1)).isoformat())
    assert made.exit_code == 0, made.output
    deletions = output.read_text(encoding="utf-8").split('id="deletions-h"')[1]
    assert "567 (BOT)" in deletions.split("</section>")[0]


T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


async def test_ts_answers_equal_a_fold_from_zero_of_the_events_by_ts_never_after_received(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin,
) -> None:
    """Mixed past, future, far-future and missing `ts`, received in and out of position order
    (spooled), snapshots after every event: each `ts:` answer is the fold, from position 0 and
    in position order, of exactly the events whose `least(ts, received)` is at or before it."""
    client = await make_client(settings_factory(projector_snapshot_every=1))
    projector = projector_of(client)
    minute = timedelta(minutes=1)
    items = []
    for i in range(24):
        received = T0 + i * minute if i % 5 else T0 - (30 - i) * minute  # some spooled
        ts: datetime | None = [received - 3 * minute, received + 7 * minute,
                               datetime(9999, 12, 31, tzinfo=UTC), None][i % 4]
        kind = "ONIMBOTDELETE" if i % 6 == 5 else "ONIMBOTJOINCHAT"
        items.append(bot_event(kind, 1 + i % 4, received=received, ts=ts))  # type: ignore[arg-type]
    for item in items:
        await insert_events(admin, [item])
        await projector.catch_up()
    start = await admin.fetchval("SELECT min(position) FROM ledger.events") - 1
    assert await admin.fetchval("SELECT count(*) FROM projections.snapshots") >= len(items)

    moments = sorted({t for item in items for t in (item["occurred_at"], item["received_at"])
                      if t is not None and t.year < 9999})
    probes = [T0 - timedelta(days=1), *moments, *(t - timedelta(seconds=1) for t in moments),
              T0 + timedelta(days=1), datetime(9999, 12, 31, tzinfo=UTC)]
    some_events = False
    for moment in probes:
        answer, _ = await folded_as_of(client, moment)
        expected = await by_the_rule(client, start + len(items), moment)
        assert fold.dump_state(answer) == fold.dump_state(expected), moment
        some_events |= bool(expected.bots)
    assert some_events


def _revision_of_this_change() -> Any:
    (script,) = [s for s in ScriptDirectory.from_config(migrations.alembic_config(""))
                 .walk_revisions() if s.path.endswith("_ts_never_after_received.py")]
    return script


async def _schema(dsn: str) -> tuple[set[str], set[str]]:
    connection = await asyncpg.connect(dsn)
    try:
        indexes = {r["indexname"] for r in await connection.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'ledger' "
            "AND tablename = 'events'")}
        columns = {r["column_name"] for r in await connection.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'projections' AND table_name = 'snapshots'")}
    finally:
        await connection.close()
    return indexes, columns


async def test_the_migration_goes_up_down_and_up(empty_database: Database) -> None:
    dsn = empty_database.admin_dsn
    script = _revision_of_this_change()
    await asyncio.to_thread(migrations.upgrade, dsn, script.revision)
    indexes, columns = await _schema(dsn)
    assert "events_by_effective_time" in indexes
    assert "events_by_occurred_at" not in indexes
    assert "max_effective_at" in columns
    await asyncio.to_thread(migrations.downgrade, dsn, script.down_revision)
    indexes, columns = await _schema(dsn)
    assert "events_by_occurred_at" in indexes
    assert "events_by_effective_time" not in indexes
    assert "max_effective_at" not in columns
    await asyncio.to_thread(migrations.upgrade, dsn)
    indexes, columns = await _schema(dsn)
    assert "events_by_effective_time" in indexes
    assert "max_effective_at" in columns

