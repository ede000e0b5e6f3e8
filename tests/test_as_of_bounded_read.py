"""An answer as of a moment well before the head reads about what it folds, not every event
from its snapshot to the head (tsclamp measured 2,984 rows read to fold 16)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from alembic.script import ScriptDirectory

from ledger import migrations
from ledger.asof import Occurred, Position, Received
from ledger.projections import fold
from ledger.projections import projector as projector_module
from ledger.settings import Settings
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import close_pool, create_pool
from tests.conftest import ClientFactory, Database
from tests.test_as_of_sender_time import by_the_rule
from tests.test_derived_state import Admin, bot_event, insert_events
from tests.test_projections import projections_of, projector_of

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
EVENTS = 3000
EVERY = 100


def history() -> list[dict[str, Any]]:
    """Received a second apart; `ts` two seconds before — but every 97th a day before (a
    delivery retried late, or a sender's clock), some without, a few in the year 9999; every
    61st spooled (received a minute earlier than its neighbours)."""
    items = []
    for i in range(EVENTS):
        received = T0 + timedelta(seconds=i) - (timedelta(minutes=1) if i % 61 == 60 else
                                                 timedelta())
        ts: datetime | None = received - timedelta(seconds=2)
        if i % 97 == 96:
            ts = received - timedelta(days=1)
        elif i % 13 == 12:
            ts = None
        elif i % 499 == 498:
            ts = datetime(9999, 12, 31, tzinfo=UTC)
        kind = "ONIMBOTDELETE" if i % 7 == 6 else "ONIMBOTJOINCHAT"
        item = bot_event(kind, 1 + i % 40, received=received, ts=ts)  # type: ignore[arg-type]
        item["payload"]["data"]["PARAMS"] = {"MESSAGE": "x" * 1500}  # a delivery's size
        items.append(item)
    return items


async def rows_read(admin: Admin, pool: Any, work: Any) -> tuple[Any, int]:
    """`work()`'s result and the rows of ledger.events PostgreSQL read for it (heap tuples
    fetched through indexes or read by scans; the statistics of the one backend it ran on)."""

    async def counted() -> int:
        return int(await admin.fetchval(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
            "FROM pg_stat_user_tables WHERE relid = 'ledger.events'::regclass"))

    async def flushed() -> None:  # the pool's one backend's counts, in the shared statistics
        async with pool.acquire() as connection:
            await connection.execute("SELECT pg_stat_force_next_flush()")
        async with pool.acquire() as connection:
            await connection.execute("SELECT 1")

    await flushed()
    before = await counted()
    result = await work()
    await flushed()
    return result, await counted() - before


async def by_received(client: Any, head: int, moment: datetime) -> fold.State:
    """From position 0, the events received at `moment` or before (the rule, not the SQL)."""
    state = fold.State()
    async with projections_of(client).stream_events(head) as stream:
        async for batch in stream:
            await projector_module._fold(state, [r for r in batch if r[6] <= moment],
                                         stream.payloads)
    return state


async def test_as_of_reads_about_what_it_folds(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin,
    database: Database,
) -> None:
    """Out of order on purpose: `ts` a day early every 97th event, spooled every 61st, none or
    the year 9999 on some. Every answer equals the fold from position 0 by the rule, and the
    rows of ledger.events PostgreSQL reads for it are the rows it folds, give or take the
    rows of one snapshot interval. On main (one-column indexes) a question as of the middle
    read every row up to its time: 1,5xx rows to fold a few dozen."""
    client = await make_client(settings_factory(projector_snapshot_every=EVERY))
    items = history()
    for start in range(0, EVENTS, EVERY):
        await insert_events(admin, items[start:start + EVERY])
        await projector_of(client).catch_up()  # a snapshot every EVERY events
    assert await admin.fetchval("SELECT count(*) FROM projections.snapshots") == EVENTS // EVERY
    await admin.execute("VACUUM ANALYZE ledger.events")  # what autovacuum does in service
    second = timedelta(seconds=1)
    questions = [Position(350), Position(1550), Received(T0 + 300 * second),
                 Received(T0 + 1530 * second), Occurred(T0 + 300 * second),
                 Occurred(T0 + 1530 * second), Occurred(T0 - timedelta(hours=1)),
                 Occurred(T0 + 2950 * second), Occurred(T0 + timedelta(days=1))]
    pool = await create_pool(database.admin_dsn, size=1)  # superuser: its stats are readable
    answers = []
    try:  # nothing else reads meanwhile: the table's counters are every backend's
        store = ProjectionStore(pool)
        for as_of in questions:
            counts: list[int] = []

            async def work(a: Any = as_of, c: list[int] = counts) -> fold.State:
                return await projector_module.fold_to(store, a, c.append)

            state, read = await rows_read(admin, pool, work)
            answers.append((as_of, state, sum(counts), read))
    finally:
        await close_pool(pool)
    for as_of, _, folded, read in answers:
        print(f"{as_of}: folded {folded}, read {read}")
    for as_of, state, folded, read in answers:
        if isinstance(as_of, Occurred):
            expected = await by_the_rule(client, EVENTS, as_of.at)
        elif isinstance(as_of, Received):
            expected = await by_received(client, EVENTS, as_of.at)
        else:
            assert isinstance(as_of, Position)
            expected = await projector_module.fold_range(projections_of(client), fold.State(),
                                                         as_of.position)
        assert fold.dump_state(state) == fold.dump_state(expected), as_of
        assert read <= folded + EVERY, (as_of, folded, read)


async def _definitions(dsn: str) -> dict[str, str]:
    connection = await asyncpg.connect(dsn)
    try:
        return {r["indexname"]: r["indexdef"] for r in await connection.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'ledger' "
            "AND tablename = 'events' AND indexname IN "
            "('events_by_effective_time', 'events_by_received_at')")}
    finally:
        await connection.close()


async def test_the_migration_goes_up_down_and_up(empty_database: Database) -> None:
    dsn = empty_database.admin_dsn
    (script,) = [s for s in ScriptDirectory.from_config(migrations.alembic_config(""))
                 .walk_revisions() if s.path.endswith("_as_of_reads_what_it_folds.py")]
    await asyncio.to_thread(migrations.upgrade, dsn, script.revision)
    up = await _definitions(dsn)
    assert up["events_by_received_at"].endswith("(received_at, \"position\")")
    assert up["events_by_effective_time"].endswith(
        "(LEAST(occurred_at, received_at), \"position\") INCLUDE (occurred_at, received_at)")
    await asyncio.to_thread(migrations.downgrade, dsn, str(script.down_revision))
    down = await _definitions(dsn)
    assert down["events_by_received_at"].endswith("(received_at)")
    assert down["events_by_effective_time"].endswith("btree (LEAST(occurred_at, received_at))")
    await asyncio.to_thread(migrations.upgrade, dsn)
    assert await _definitions(dsn) == up
