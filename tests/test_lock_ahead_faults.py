"""The head lock taken ahead (`ledger.storage.store._HeadLockAhead`) under faults: its backend
terminated while it waits for the grant, while it holds the lock unclaimed, its claimant
cancelled — the next append still stores, and nothing is left behind (no transaction idle
in PostgreSQL, no task exception nobody retrieved)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import drafts
from ledger.committer import GroupCommitter
from ledger.errors import LifecycleNotDrained
from ledger.models import EventDraft, Stored
from ledger.offline import Appender, OfflineTrust
from ledger.settings import TrustPolicy
from ledger.storage import store as store_module
from ledger.storage.store import EventStore, create_pool
from tests.conftest import Database
from tests.gateway_helpers import eventually
from tests.helpers import allowance_drafts

Connection: TypeAlias = "asyncpg.Connection[Any]"

_OURS = ("datname = current_database() AND application_name = 'ledger' "
         "AND pid <> pg_backend_pid()")


async def _pids(admin: Connection, condition: str) -> list[int]:
    return [r["pid"] for r in await admin.fetch(
        f"SELECT pid FROM pg_stat_activity WHERE {_OURS} AND {condition}")]


async def _holding_idle(admin: Connection) -> list[int]:
    """Our backends idle in a transaction (a lock taken ahead, held unclaimed)."""
    return await _pids(admin, "state = 'idle in transaction'")


async def _waiting_for_lock(admin: Connection) -> list[int]:
    return await _pids(admin, "wait_event_type = 'Lock'")


async def _gone(admin: Connection, pid: int) -> bool:
    return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)


@pytest.fixture
async def store(database: Database, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A store whose locks taken ahead are held until claimed (within the test's deadlines),
    not let go after 0.1 s: each fault is set up deterministically on a loaded machine."""
    monkeypatch.setattr(store_module, "LOCK_AHEAD_HOLD_SECONDS", 30.0)
    pool = await create_pool(database.service_dsn, size=4)
    yield EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    await pool.close()


@pytest.fixture
async def unretrieved() -> Any:
    """Exceptions the loop's handler reports (a task's exception nobody retrieved, a leaked
    transaction the pool rolled back): each is an ERROR in the service's log."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    yield reported
    loop.set_exception_handler(None)


async def _lock_ahead_waiting_behind(store: EventStore, admin: Connection,
                                     blocker: Connection) -> int:
    """A lock taken ahead that waits for its grant behind `blocker`'s transaction: its pid.

    A rejections-only append locks no head, yet locks it ahead for the next batch as it
    commits — while `blocker` holds it, so the lock ahead waits (deterministically: a lock ahead
    sent as a commit ends can be granted before a waiter the commit wakes)."""
    store.lock_ahead_when(lambda: True)
    await blocker.execute("BEGIN")
    await blocker.execute("SELECT 1 FROM ledger.stream_heads WHERE stream = 'events' FOR UPDATE")
    now = datetime.now(UTC)
    body = b"not a form"
    await store.append([drafts.rejection_draft(
        received_at=now, status=400, reason="malformed", detail="test", peer=None,
        content_type=None, body=body, claim=drafts.claim_of_text(body, 64))])
    (pid,) = await eventually_one(lambda: _waiting_for_lock(admin))
    return pid


async def _blocker_waits(admin: Connection, blocker: Connection) -> bool:
    return bool(await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
        blocker.get_server_pid()))


async def eventually_one(probe: Any, within: float = 10) -> list[int]:
    found: list[int] = []

    async def one() -> bool:
        found[:] = await probe()
        return len(found) == 1
    try:
        await eventually(one, within=within)
    except AssertionError:
        raise AssertionError(f"not exactly one backend: {found}") from None
    return found


async def test_a_lock_ahead_whose_backend_is_terminated_while_held_leaves_the_next_append_whole(
    store: EventStore, admin: Connection, unretrieved: list[dict[str, Any]],
) -> None:
    """Terminated while it holds the lock unclaimed (an operator's pg_terminate_backend, a
    failover): the next append must not fail with it. Once the driver has seen the connection
    close, the claim declines it; claimed in the moment before (CI once caught that moment),
    its first statement fails, nothing of it was committed, and the batch goes again on a
    fresh connection. Either way: stored, not spooled."""
    store.lock_ahead_when(lambda: True)
    a, b = allowance_drafts(2)
    await store.append([a])
    (pid,) = await eventually_one(lambda: _holding_idle(admin))
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    await eventually(lambda: _gone(admin, pid), within=10)
    (outcome,) = await store.append([b])
    assert isinstance(outcome, Stored)
    assert outcome.position == 2
    await store.let_go_ahead()
    await eventually(lambda: _no_idle(admin), within=10)
    gc.collect()
    assert unretrieved == []


async def _no_idle(admin: Connection) -> bool:
    return await _holding_idle(admin) == []


async def test_a_lock_ahead_terminated_while_it_waits_for_the_grant_leaves_the_next_append_whole(
    store: EventStore, database: Database, admin: Connection,
    unretrieved: list[dict[str, Any]],
) -> None:
    blocker = await asyncpg.connect(database.admin_dsn)
    try:
        pid = await _lock_ahead_waiting_behind(store, admin, blocker)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        await eventually(lambda: _gone(admin, pid), within=10)
        await blocker.execute("ROLLBACK")
        (c,) = allowance_drafts(1)
        await _stored_first(store, c)
    finally:
        await blocker.close()
    await _nothing_left_behind(admin, unretrieved)


async def _stored_first(store: EventStore, draft: EventDraft) -> None:
    """The next append is whole: stored, at position 1; then the store lets go what it holds."""
    (outcome,) = await store.append([draft])
    assert isinstance(outcome, Stored)
    assert outcome.position == 1
    await store.let_go_ahead()


async def _nothing_left_behind(admin: Connection, unretrieved: list[dict[str, Any]]) -> None:
    """No transaction left idle, no exception nobody retrieved."""
    await eventually(lambda: _no_idle(admin), within=10)
    gc.collect()
    assert unretrieved == []


@pytest.mark.parametrize("terminated", [False, True], ids=["granted-later", "terminated"])
async def test_a_claimant_cancelled_while_the_lock_ahead_waits_leaves_nothing_behind(
    store: EventStore, database: Database, admin: Connection,
    unretrieved: list[dict[str, Any]], terminated: bool,
) -> None:
    """Shutdown (or a timeout) cancels the append that claimed a lock still waiting for its
    grant: once granted it is let go, or its failure is consumed — never an idle transaction
    holding the head, nor an exception nobody retrieved."""
    blocker = await asyncpg.connect(database.admin_dsn)
    try:
        pid = await _lock_ahead_waiting_behind(store, admin, blocker)
        (c, d) = allowance_drafts(2)
        claimant = asyncio.create_task(store.append([c]))
        await eventually(lambda: store._appending == 1, within=10)
        claimant.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claimant
        if terminated:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await eventually(lambda: _gone(admin, pid), within=10)
        await blocker.execute("ROLLBACK")
        await store.let_go_ahead()
        await eventually(lambda: _no_idle(admin), within=10)
        await _stored_first(store, d)
    finally:
        await blocker.close()
    await _nothing_left_behind(admin, unretrieved)


def _saturate(dsn: str, worker: int, total: int, ahead: bool) -> int:
    """One worker process appending single-draft batches back to back until the ledger holds
    `total` events: how many it committed."""
    async def run() -> int:
        pool = await create_pool(dsn, size=3)
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
        if ahead:
            store.lock_ahead_when(lambda: True)
        mine, i = 0, 0
        try:
            async with asyncio.timeout(120):
                while True:
                    i += 1
                    (outcome,) = await store.append(allowance_drafts(1, worker * 10**6 + i))
                    assert isinstance(outcome, Stored)
                    mine += 1
                    if outcome.position >= total:
                        break
            await store.let_go_ahead()
        finally:
            await pool.close()
        return mine
    return asyncio.run(run())


@pytest.mark.parametrize("ahead", [False, True], ids=["plain", "locking-ahead"])
@pytest.mark.parametrize("workers", [2, 3])
async def test_worker_processes_that_all_lock_ahead_share_the_head_fairly(
    database: Database, workers: int, ahead: bool,
) -> None:
    """Saturated worker processes (as `serve --workers N`, each with drafts always waiting)
    each lock the head ahead as they commit: PostgreSQL's row lock is not a queue for a
    newcomer (a lock sent as a commit ends can be granted before a waiter that commit wakes),
    so one worker could keep the head — none may be starved (`plain`: the share without)."""

    total = 200 * workers
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as executor:
        loop = asyncio.get_running_loop()
        counts = await asyncio.gather(*(
            loop.run_in_executor(executor, _saturate, database.service_dsn, w, total, ahead)
            for w in range(workers)))
    print(f"{'ahead' if ahead else 'plain'}: commits per worker process: {counts}")
    assert min(counts) >= sum(counts) / workers / 3, counts


async def test_the_smallest_pool_with_a_lock_ahead_serves_a_saturated_committer_and_readers(
    database: Database, admin: Connection, tmp_path: Path,
) -> None:
    """LEDGER_DB_POOL_SIZE's minimum (2): at each commit the committer holds one connection
    and the lock taken ahead another, while announcements of their own and readers want one
    too — everyone is served in turn (no deadlock), every draft stored in order, and nothing
    is left idle in a transaction."""
    pool = await create_pool(database.service_dsn, size=2)  # Settings.pool_size's minimum
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, notify_every=0.01)
    appender = Appender(store, OfflineTrust(tmp_path / "trust", worker=0,
                                            policy=TrustPolicy.ALLOWLIST))
    committer = GroupCommitter(appender, max_events=4, max_delay=0, append_timeout=30)
    store.lock_ahead_when(committer.waiting)
    committer.start()
    reads = 0

    async def read() -> None:
        nonlocal reads
        while not committer_done.is_set():
            await store.head()
            reads += 1

    committer_done = asyncio.Event()
    try:
        async with asyncio.timeout(60):
            reader = asyncio.create_task(read())
            outcomes = await asyncio.gather(
                *(committer.submit(allowance_drafts(1, i)[0]) for i in range(200)))
            committer_done.set()
            await reader
            await committer.close()
            await store.let_go_ahead()
            await store.announcer.flush()
    finally:
        await pool.close()
    assert sorted(o.position for o in outcomes if isinstance(o, Stored)) == list(range(1, 201))
    assert reads > 0
    assert await _no_idle(admin)


async def test_a_worker_spooling_behind_another_workers_lifecycle_lets_its_lock_ahead_go(
    store: EventStore, admin: Connection, tmp_path: Path
) -> None:
    """Online, a batch for a portal whose trust waits on another worker's spooled lifecycle
    events is spooled behind them — and that worker's drain needs the events head: a head lock
    this worker took ahead is let go first, or it held that drain up as long as it stayed."""
    offline = OfflineTrust(tmp_path / "trust", worker=0, policy=TrustPolicy.ALLOWLIST)
    appender = Appender(store, offline)
    first, second = allowance_drafts(2)
    store.lock_ahead_when(lambda: True)
    await store.append([first])
    await eventually(lambda: _holding_idle(admin), within=10)  # ours, taken ahead

    async def unsettled_elsewhere() -> frozenset[str]:
        return frozenset({second.member_id})

    offline.unsettled_elsewhere = unsettled_elsewhere  # type: ignore[method-assign]
    store.lock_ahead_when(lambda: False)
    with pytest.raises(LifecycleNotDrained):
        await appender.append([second])
    assert not await _holding_idle(admin)
    async with admin.transaction():  # the other worker's drain takes the head at once
        await admin.execute("SELECT 1 FROM ledger.stream_heads WHERE stream = 'events' "
                            "FOR UPDATE NOWAIT")


async def test_a_pooled_connection_whose_backend_died_unnoticed_costs_the_batch_nothing(
    proxy: Any,
) -> None:
    """The pool hands over a connection whose backend went away before the driver could see it
    (nothing was read on it since): the append's first statement fails before any COMMIT was
    sent, and the batch is appended again on a fresh connection — stored (200), not spooled
    (202). A lock taken ahead claimed in that moment is the same case (the test above)."""
    relay, dsn = proxy
    pool = await create_pool(dsn, size=1)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    try:
        for draft in allowance_drafts(3):
            relay.sever()  # the pool's connection: its backend gone, unknown to the driver
            (outcome,) = await store.append([draft])
            assert isinstance(outcome, Stored), outcome
    finally:
        await pool.close()
