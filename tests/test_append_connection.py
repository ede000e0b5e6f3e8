"""The appends' kept connection (`EventStore(keep_connection=True)`, as `ledger serve` wires it):
one pooled connection serves append after append, either way, without an acquire and a
release each; it is handed back on `release_kept`, and one whose backend went away is
replaced, not used again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from ledger import intake
from ledger.committer import GroupCommitter
from ledger.errors import DatabaseUnavailable
from ledger.models import Outcome, Stored
from ledger.offline import Appender, OfflineTrust
from ledger.operations import change_trust
from ledger.settings import Settings, TrustPolicy
from ledger.storage.store import EventStore, Pool, create_pool
from ledger.trust import TrustChange
from tests.conftest import FORM, MEMBER_ID, Database, sample
from tests.gateway_helpers import eventually
from tests.helpers import allowance_drafts


def _message(settings: Settings, text: str) -> Any:
    """A message delivery of the sample portal, an occurrence of its own."""
    body = sample("onimbotmessageadd-1").replace(
        b"%5BMESSAGE%5D=Hello", b"%5BMESSAGE%5D=" + text.encode())
    delivery = intake.Delivery(body, FORM, "", "127.0.0.1")
    return intake.draft_of(settings, delivery, intake.decode(settings, delivery),
                           datetime.now(UTC), 1000)


async def _installed(store: EventStore, settings: Settings) -> None:
    await change_trust(store, TrustChange.ALLOWED, member_id=MEMBER_ID, actor="test")
    body = sample("onappinstall-1")
    delivery = intake.Delivery(body, FORM, "", "127.0.0.1")
    install = intake.draft_of(settings, delivery, intake.decode(settings, delivery),
                              datetime.now(UTC), 1000)
    (outcome,) = await store.append([install])
    assert isinstance(outcome, Stored), outcome


def _held(pool: Pool) -> int:
    """Connections of the pool not idle in it (held by someone)."""
    return pool.get_size() - pool.get_idle_size()


async def _backends(admin: asyncpg.Connection[Any]) -> list[int]:
    return [r["pid"] for r in await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND usename = 'ledger_app'")]


async def test_appends_either_way_keep_one_connection_until_it_is_released(
    database: Database, settings: Settings, admin: asyncpg.Connection[Any]
) -> None:
    pool = await create_pool(database.service_dsn, size=3)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, keep_connection=True)
        ways: list[str] = []
        store.count_ways(ways.append)
        await _installed(store, settings)  # the long way (trust changes)
        assert _held(pool) == 1
        for batch in range(3):  # the one-statement way
            outcomes = await store.append([_message(settings, f"k{batch}-{i}") for i in range(2)])
            assert all(isinstance(o, Stored) for o in outcomes), outcomes
        assert ways[-3:] == ["one_statement"] * 3
        assert _held(pool) == 1
        assert len(await _backends(admin)) == 1  # never a second connection opened for them
        await store.release_kept()
        assert _held(pool) == 0
        async with asyncio.timeout(10):  # asyncpg's close waits for every connection
            await pool.close()
    finally:
        pool.terminate()


async def test_a_store_that_keeps_nothing_hands_each_connection_back(
    database: Database, settings: Settings
) -> None:
    pool = await create_pool(database.service_dsn, size=2)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
        await _installed(store, settings)
        (outcome,) = await store.append([_message(settings, "alone")])
        assert isinstance(outcome, Stored)
        assert _held(pool) == 0
    finally:
        await pool.close()


async def test_a_kept_connection_whose_backend_went_away_is_replaced(
    database: Database, settings: Settings, admin: asyncpg.Connection[Any]
) -> None:
    pool = await create_pool(database.service_dsn, size=2)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, keep_connection=True)
        await _installed(store, settings)
        (first,) = await store.append([_message(settings, "before")])
        assert isinstance(first, Stored)
        (gone,) = await _backends(admin)
        await admin.execute("SELECT pg_terminate_backend($1)", gone)
        stored: list[Outcome] = []

        async def appended() -> bool:
            try:  # a statement sent before the driver saw the end of its socket fails alone
                stored.extend(await store.append([_message(settings, f"after-{len(stored)}")]))
            except DatabaseUnavailable:
                return False
            return True

        await eventually(appended, within=10)
        assert all(isinstance(o, Stored) for o in stored), stored
        (outcome,) = await store.append([_message(settings, "and-after")])
        assert isinstance(outcome, Stored)
        assert gone not in await _backends(admin)
        assert _held(pool) == 1
        await store.release_kept()
    finally:
        await pool.close()


async def test_appends_at_once_take_a_second_connection_and_keep_one(
    database: Database, admin: asyncpg.Connection[Any]
) -> None:
    pool = await create_pool(database.service_dsn, size=3)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, keep_connection=True)
        batches = [allowance_drafts(3, first) for first in (0, 10, 20, 30)]
        results = await asyncio.gather(*(store.append(b) for b in batches))
        stored = [o.position for r in results for o in r if isinstance(o, Stored)]
        assert sorted(stored) == list(range(1, 13))
        assert _held(pool) == 1
        await store.release_kept()
        assert _held(pool) == 0
    finally:
        await pool.close()


async def test_a_sender_cancelled_while_waiting_leaves_its_batch_and_the_next_answered(
    database: Database, admin: asyncpg.Connection[Any], tmp_path: Path
) -> None:
    """`submit` awaits its future without a shield: the cancelled sender's future is cancelled,
    the committer answers the others and stores the cancelled one's draft with its batch."""
    pool = await create_pool(database.service_dsn, size=3)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, keep_connection=True)
        offline = OfflineTrust(tmp_path / "trust", worker=0, policy=TrustPolicy.ALLOWLIST)
        committer = GroupCommitter(Appender(store, offline), max_events=8, max_delay=0)
        committer.start()
        # the head held elsewhere: the first batch waits on it with both drafts in it
        locker = await asyncpg.connect(database.admin_dsn)
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute(
            "SELECT 1 FROM ledger.stream_heads WHERE stream = 'events' FOR UPDATE")
        first, second = allowance_drafts(2)
        cancelled = asyncio.ensure_future(committer.submit(first))
        kept = asyncio.ensure_future(committer.submit(second))
        await eventually(lambda: admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'ledger_app' "
            "AND wait_event_type = 'Lock'"))
        assert not committer.waiting()  # both drafts are in the batch that waits
        cancelled.cancel()
        await transaction.rollback()
        await locker.close()
        async with asyncio.timeout(10):
            outcome = await kept
        assert isinstance(outcome, Stored)
        assert cancelled.cancelled()
        (later,) = allowance_drafts(1, 5)
        async with asyncio.timeout(10):
            assert isinstance(await committer.submit(later), Stored)
        await committer.close()
        assert await admin.fetchval("SELECT count(*) FROM ledger.events") == 3
        await store.release_kept()
    finally:
        await pool.close()
