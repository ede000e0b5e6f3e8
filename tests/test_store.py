"""The store's promises, checked in PostgreSQL itself: append-only, chained, serialised."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import drafts
from ledger.committer import GroupCommitter
from ledger.errors import AppendFailed
from ledger.hashing import sha256
from ledger.metrics import Metrics
from ledger.models import Duplicate, Stored
from ledger.offline import Appender, OfflineTrust
from ledger.operations import change_trust
from ledger.settings import TrustPolicy
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange
from tests.conftest import Database
from tests.gateway_helpers import eventually
from tests.helpers import allowance_drafts

Connection: TypeAlias = "asyncpg.Connection[Any]"

STATEMENTS = [
    "UPDATE ledger.events SET member_id = 'x'",
    "DELETE FROM ledger.events",
    "TRUNCATE ledger.events CASCADE",
    "UPDATE ledger.rejections SET reason = 'x'",
    "DELETE FROM ledger.rejections",
    "TRUNCATE ledger.rejections",
    "DELETE FROM ledger.redeliveries",
]


@pytest.fixture
async def store(database: Database) -> Any:
    pool = await create_pool(database.service_dsn, size=4)
    yield EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    await pool.close()


@pytest.fixture
def appender(store: EventStore, tmp_path: Path) -> Appender:
    """The store as the group committer drives it (with an offline trust state of its own)."""
    return Appender(store, OfflineTrust(tmp_path / "trust", worker=0,
                                        policy=TrustPolicy.ALLOWLIST))


async def _some_events(store: EventStore, count: int) -> None:
    for i in range(count):
        await change_trust(store, TrustChange.ALLOWED, member_id=f"portal-{i}", actor="test")


async def _some_history(store: EventStore) -> None:
    """Rows in every append-only table: events, a redelivery, a rejection."""
    await _some_events(store, 2)
    now = datetime.now(UTC)
    again = drafts.operator_action(
        TrustChange.ALLOWED, member_id="p", domain=None, token=None, actor="t", received_at=now
    )
    rejection = drafts.rejection_draft(
        received_at=now, status=400, reason="test", detail="", peer=None, content_type=None,
        body=b"x", claim=drafts.claim_of_text(b"x", 10),
    )
    redelivered = dataclasses.replace(again, received_at=now + timedelta(seconds=1))
    await store.append([again, redelivered, rejection])


@pytest.mark.parametrize("statement", STATEMENTS)
async def test_the_service_role_cannot_change_history(
    store: EventStore, service_connection: Connection, statement: str
) -> None:
    await _some_history(store)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await service_connection.execute(statement)


@pytest.mark.parametrize("statement", STATEMENTS)
async def test_even_the_owner_is_stopped_by_the_triggers(
    store: EventStore, admin: Connection, statement: str
) -> None:
    await _some_history(store)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await admin.execute(statement)
    assert await admin.fetchval("SELECT count(*) FROM ledger.events") == 3
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 1
    assert await admin.fetchval("SELECT count(*) FROM ledger.rejections") == 1


async def test_the_chain_is_exactly_what_the_spec_defines(
    store: EventStore, admin: Connection
) -> None:
    """A from-scratch re-implementation of docs/spec/chain.md (hashlib and json only), as a
    third party would write it: if this passes, that page is the specification."""
    await _some_history(store)
    previous = bytes(32)
    rows = await admin.fetch("SELECT * FROM ledger.events ORDER BY position")
    assert [r["position"] for r in rows] == [1, 2, 3]

    def stamp(moment: datetime | None) -> str | None:
        if moment is None:
            return None
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    for row in rows:
        assert bytes(row["prev_hash"]) == previous
        payload_sha256 = hashlib.sha256(row["payload"].encode()).digest()
        assert bytes(row["payload_sha256"]) == payload_sha256
        metadata = {
            "member_id": row["member_id"], "event_type": row["event_type"],
            "origin": row["origin"], "bot_ids": list(row["bot_ids"]),
            "occurred_at": stamp(row["occurred_at"]), "received_at": stamp(row["received_at"]),
            "dedup_key": bytes(row["dedup_key"]).hex(),
            "body_sha256": bytes(row["body_sha256"]).hex() if row["body_sha256"] else None,
            "metadata": json.loads(row["metadata"]),
        }
        canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode()
        expected = hashlib.sha256(
            previous + row["position"].to_bytes(8, "big") + canonical + payload_sha256
        ).digest()
        assert bytes(row["hash"]) == expected
        previous = expected
    head = await admin.fetchrow("SELECT * FROM ledger.stream_heads WHERE stream = 'events'")
    assert head is not None
    assert (head["position"], bytes(head["hash"])) == (3, previous)


@pytest.mark.parametrize("ahead", [False, True], ids=["plain", "locking-ahead"])
async def test_two_appenders_at_once_stay_gap_free_and_chained_and_store_each_draft_once(
    database: Database, admin: Connection, ahead: bool
) -> None:
    """Two pools (as `serve --workers 2`) append the same drafts in small batches at once: each
    waits for the other's head lock, and must plan on facts read after it — a head or dedup
    keys read before would reuse a position or store a draft twice (both refused by
    constraints: the append fails)."""
    pools = [await create_pool(database.service_dsn, size=2) for _ in range(2)]
    try:
        stores = [EventStore(pool, policy=TrustPolicy.ALLOWLIST) for pool in pools]
        batch = allowance_drafts(48)
        for store in stores if ahead else []:  # each locks the head ahead for its next batch
            store.lock_ahead_when(lambda: True)

        async def append_all(store: EventStore, starts: list[int]) -> dict[int, Any]:
            outcomes: dict[int, Any] = {}
            for i in starts:
                for offset, outcome in enumerate(await store.append(batch[i : i + 3])):
                    outcomes[i + offset] = outcome
            return outcomes

        starts = list(range(0, len(batch), 3))  # one from the front, one from the back: they
        first, second = await asyncio.gather(  # meet, each storing some and finding others
            append_all(stores[0], starts), append_all(stores[1], starts[::-1]))
        for store in stores:
            await store.let_go_ahead()
    finally:
        for pool in pools:
            await pool.close()
    for i in range(len(batch)):
        a, b = first[i], second[i]
        assert {type(a), type(b)} == {Stored, Duplicate}  # stored by one, found by the other
        assert a.position == b.position
    assert 0 < sum(isinstance(o, Stored) for o in first.values()) < len(batch)
    rows = await admin.fetch("SELECT position, prev_hash, hash FROM ledger.events "
                             "ORDER BY position")
    assert [r["position"] for r in rows] == list(range(1, len(batch) + 1))
    previous = bytes(32)
    for row in rows:
        assert bytes(row["prev_hash"]) == previous
        previous = bytes(row["hash"])
    head = await admin.fetchrow("SELECT * FROM ledger.stream_heads WHERE stream = 'events'")
    assert head is not None
    assert (head["position"], bytes(head["hash"])) == (len(batch), previous)


async def _head_locked_elsewhere(admin: Connection) -> bool:
    """Whether another transaction holds the events head's lock now."""
    try:
        async with admin.transaction():
            await admin.execute("SELECT 1 FROM ledger.stream_heads WHERE stream = 'events' "
                                "FOR UPDATE NOWAIT")
    except asyncpg.LockNotAvailableError:
        return True
    return False


async def _head_free(admin: Connection) -> bool:
    return not await _head_locked_elsewhere(admin)


async def _chained(admin: Connection) -> list[int]:
    """The events' positions, after checking that each row links to the one before it."""
    rows = await admin.fetch("SELECT position, prev_hash, hash FROM ledger.events "
                             "ORDER BY position")
    previous = bytes(32)
    for row in rows:
        assert bytes(row["prev_hash"]) == previous
        previous = bytes(row["hash"])
    return [r["position"] for r in rows]


async def test_while_drafts_wait_the_head_is_locked_for_the_next_batch_as_one_commits(
    store: EventStore, admin: Connection
) -> None:
    """Group commit's serial path loses a round trip: the next batch's transaction and head
    lock are taken while the current batch commits (granted as that COMMIT ends), and the next
    append starts with them — stored in order, chained, and the lock let go after."""
    waiting = [True]
    store.lock_ahead_when(lambda: waiting[0])
    first, second = allowance_drafts(2)
    await store.append([first])
    await eventually(lambda: _head_locked_elsewhere(admin), within=10)  # ours, taken ahead
    waiting[0] = False
    (outcome,) = await store.append([second])
    assert isinstance(outcome, Stored)
    assert outcome.position == 2
    assert not await _head_locked_elsewhere(admin)
    assert await _chained(admin) == [1, 2]


async def test_a_head_lock_taken_ahead_that_no_append_claims_is_let_go(
    store: EventStore, admin: Connection
) -> None:
    """A committer that turns to its spool, or stops, must not keep the head from other
    workers: unclaimed, the lock taken ahead is released within LOCK_AHEAD_HOLD_SECONDS, and
    `let_go_ahead` (shutdown) releases it at once."""
    store.lock_ahead_when(lambda: True)
    a, b, c = allowance_drafts(3)
    await store.append([a])
    await eventually(lambda: _head_locked_elsewhere(admin), within=10)
    await eventually(lambda: _head_free(admin), within=10)  # let go by itself
    await store.append([b])  # the ordinary path, then another lock ahead…
    await eventually(lambda: _head_locked_elsewhere(admin), within=10)
    await store.let_go_ahead()  # …released at once
    assert not await _head_locked_elsewhere(admin)
    (outcome,) = await store.append([c])
    assert isinstance(outcome, Stored)
    assert outcome.position == 3
    await store.let_go_ahead()
    assert await _chained(admin) == [1, 2, 3]


async def test_a_busy_committer_with_locks_taken_ahead_stores_every_draft_in_order(
    store: EventStore, appender: Appender, admin: Connection
) -> None:
    metrics = Metrics()
    committer = GroupCommitter(appender, max_events=8, max_delay=0, metrics=metrics)
    store.lock_ahead_when(committer.waiting)
    committer.start()
    batch = allowance_drafts(120)
    outcomes = await asyncio.gather(*(committer.submit(d) for d in batch))
    await committer.close()
    await store.let_go_ahead()
    assert [o.position for o in outcomes if isinstance(o, Stored)] == list(range(1, 121))
    assert await _chained(admin) == list(range(1, 121))
    assert not await _head_locked_elsewhere(admin)


async def test_commits_in_quick_succession_share_a_notification_and_the_last_is_announced(
    database: Database,
) -> None:
    """NOTIFY is a wake-up hint for listeners that gather anyway: at most one per slice, and
    the slice's last commit is always announced (a listener never waits for its poll)."""
    pool = await create_pool(database.service_dsn, size=2)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, notify_every=0.5)
    heard: list[str] = []
    listener = await asyncpg.connect(database.admin_dsn)
    await listener.add_listener("ledger_events", lambda *args: heard.append(args[3]))
    try:
        for draft in allowance_drafts(20):
            await store.append([draft])
        await eventually(lambda: heard and heard[-1] == "20", within=10)
        await store.announcer.flush()
    finally:
        await listener.close()
        await pool.close()
    assert len(heard) <= 20 // 2  # far fewer than the 20 commits


async def test_while_commits_keep_coming_each_slices_notification_rides_on_a_commit(
    database: Database,
) -> None:
    """The notification a slice owes is left to the next commit while one is on its way (a
    statement and a WAL flush of its own saved); listeners still hear one per slice, and the
    last commit is announced."""
    pool = await create_pool(database.service_dsn, size=4)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, notify_every=0.1)
    waiting = [True]
    store.lock_ahead_when(lambda: waiting[0])
    heard: list[str] = []
    listener = await asyncpg.connect(database.admin_dsn)
    await listener.add_listener("ledger_events", lambda *args: heard.append(args[3]))
    drafts_ = iter(allowance_drafts(5000))
    try:
        async with asyncio.timeout(60):
            while len(heard) < 4:  # several slices' worth of commits, back to back
                await store.append([next(drafts_)])
        waiting[0] = False
        (last,) = await store.append([next(drafts_)])
        assert isinstance(last, Stored)
        await eventually(lambda: heard and heard[-1] == str(last.position), within=10)
        await store.let_go_ahead()
        await store.announcer.flush()
    finally:
        await listener.close()
        await pool.close()
    assert store.announcer.alone <= 1  # at most the last commit's, when nothing followed it


async def test_group_commit_gathers_concurrent_drafts_into_few_transactions(
    appender: Appender, admin: Connection
) -> None:
    metrics = Metrics()
    committer = GroupCommitter(appender, max_events=64, max_delay=0.005, metrics=metrics)
    committer.start()
    batch = allowance_drafts(200)
    outcomes = await asyncio.gather(*(committer.submit(d) for d in batch))
    await committer.close()
    assert sorted(o.position for o in outcomes if isinstance(o, Stored)) == list(range(1, 201))
    transactions = metrics.registry.get_sample_value("ledger_append_batch_size_count")
    assert transactions is not None
    assert transactions <= 200 // 64 + 3  # far fewer transactions than events
    assert await admin.fetchval("SELECT count(*) FROM ledger.events") == 200


async def test_a_lone_draft_is_committed_at_once_whatever_the_delay_allows(
    appender: Appender,
) -> None:
    """Natural group commit: a draft that finds the committer idle waits for nobody (it would
    wait a minute here if it did; the deadline is far shorter)."""
    committer = GroupCommitter(appender, max_events=64, max_delay=60.0)
    committer.start()
    async with asyncio.timeout(10):
        outcome = await committer.submit(allowance_drafts(1)[0])
    assert isinstance(outcome, Stored)
    assert committer.lingered == 0
    await committer.close()


@pytest.mark.parametrize(("max_delay", "lingered"), [(0.0, 0), (0.05, 1)])
async def test_drafts_that_arrive_during_a_commit_are_the_next_batch(
    appender: Appender, admin: Connection, database: Database, max_delay: float, lingered: int
) -> None:
    """While one batch commits (held here on the head lock) the next fills, and is committed
    as soon as the first is done; only under such load may it wait `max_delay` for more."""
    metrics = Metrics()
    committer = GroupCommitter(appender, max_events=64, max_delay=max_delay, metrics=metrics)
    committer.start()
    first, *later = allowance_drafts(4)
    watcher = await asyncpg.connect(database.admin_dsn)
    try:
        async with admin.transaction():
            await admin.execute(
                "SELECT 1 FROM ledger.stream_heads WHERE stream = 'events' FOR UPDATE")
            alone = asyncio.ensure_future(committer.submit(first))
            await eventually(lambda: watcher.fetchval(
                "SELECT count(*) = 1 FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"))
            rest = [asyncio.ensure_future(committer.submit(d)) for d in later]
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(alone, *rest)
    finally:
        await watcher.close()
        await committer.close()
    assert [o.position if isinstance(o, Stored) else o for o in outcomes] == [1, 2, 3, 4]
    sizes = (metrics.registry.get_sample_value("ledger_append_batch_size_count"),
             metrics.registry.get_sample_value("ledger_append_batch_size_sum"))
    assert sizes == (2, 4)  # the lone draft, then the three that arrived meanwhile
    assert committer.lingered == lingered


async def test_one_bad_draft_fails_alone_and_its_neighbours_are_stored(
    appender: Appender, admin: Connection
) -> None:
    committer = GroupCommitter(appender, max_events=64, max_delay=0.05)
    committer.start()
    good = allowance_drafts(5)
    bad = dataclasses.replace(good[0], payload=b"{not json", dedup_key=sha256(b"bad"))
    results = await asyncio.gather(
        *(committer.submit(d) for d in [*good[:2], bad, *good[2:]]), return_exceptions=True
    )
    await committer.close()
    assert isinstance(results[2], AppendFailed)
    assert all(isinstance(r, Stored) for i, r in enumerate(results) if i != 2)
    positions = [r["position"] for r in await admin.fetch(
        "SELECT position FROM ledger.events ORDER BY position")]
    assert positions == [1, 2, 3, 4, 5]


async def test_a_closed_committer_takes_no_more_drafts(appender: Appender) -> None:
    from ledger.errors import CommitterClosed

    committer = GroupCommitter(appender, max_events=8, max_delay=0)
    committer.start()
    await committer.close()
    with pytest.raises(CommitterClosed):
        await committer.submit(allowance_drafts(1)[0])


async def test_draining_what_already_committed_records_no_redelivery_but_a_real_one_does(
    store: EventStore, admin: Connection
) -> None:
    """Found by a break test: an append that timed out but committed, then drained from the
    spool, left a redelivery row for an arrival that happened once."""
    now = datetime.now(UTC)
    draft = drafts.operator_action(
        TrustChange.ALLOWED, member_id="p", domain=None, token=None, actor="t", received_at=now
    )
    (stored,) = await store.append([draft])
    (again,) = await store.append([draft], draining=True)  # the spooled copy of that append
    assert isinstance(stored, Stored)
    assert isinstance(again, Duplicate)
    assert again.position == stored.position
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 0
    later = dataclasses.replace(draft, received_at=now + timedelta(seconds=3))
    await store.append([later], draining=True)
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 1
