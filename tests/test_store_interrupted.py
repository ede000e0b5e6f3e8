"""An append cut short at every step of its transaction — cancelled (shutdown, the append
timeout) or its backend killed — leaves no connection in a transaction or holding the head lock,
commits nothing, and the store appends gap-free afterwards."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import drafts
from ledger.errors import DatabaseUnavailable
from ledger.models import Stored
from ledger.settings import TrustPolicy
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange
from tests.conftest import Database
from tests.gateway_helpers import eventually

Connection: TypeAlias = "asyncpg.Connection[Any]"

# What the admin connection holds to stop the append at one step (in its own transaction).
BLOCKERS = {
    # BEGIN + SELECT … FOR UPDATE waits for the head row
    "lock": ["SELECT 1 FROM ledger.stream_heads WHERE stream = 'events' FOR UPDATE"],
    # the facts statement (after the lock) waits to read the trust table
    "facts": ["LOCK TABLE ledger.portal_trust IN ACCESS EXCLUSIVE MODE"],
    # the events+head statement waits to insert (reads still pass)
    "insert": ["LOCK TABLE ledger.events IN EXCLUSIVE MODE"],
    # COMMIT runs a deferred trigger that waits for an advisory lock the admin holds
    "commit": ["SELECT pg_advisory_xact_lock(4242)"],
}


@pytest.fixture
async def slow_commit(admin: Connection) -> None:
    """A deferred constraint trigger on events: COMMIT waits while the admin holds lock 4242."""
    await admin.execute("""
        CREATE FUNCTION public.wait_at_commit() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $$
        BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER wait_at_commit AFTER INSERT ON ledger.events
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.wait_at_commit();
    """)


def _draft(member_id: str) -> Any:
    return drafts.operator_action(TrustChange.ALLOWED, member_id=member_id, domain=None,
                                  token=None, actor="test", received_at=datetime.now(UTC))


async def _waiting_backend(admin: Connection) -> int | None:
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'ledger' "
        "AND wait_event_type = 'Lock'")
    return pid


async def cut_short(task: asyncio.Task[Any], admin: Connection, how: str) -> None:
    """Once `task`'s append waits for a lock, cancel it or terminate its backend, and check it
    ends as the caller hears it: cancelled, or DatabaseUnavailable."""
    pid: list[int] = []

    async def waiting() -> bool:
        found = await _waiting_backend(admin)
        if found is not None:
            pid.append(found)
        return found is not None

    await eventually(waiting, within=10)
    if how == "cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await admin.execute("SELECT pg_terminate_backend($1)", pid[0])
        with pytest.raises(DatabaseUnavailable):
            await task


@pytest.mark.parametrize("how", ["cancel", "terminate"])
@pytest.mark.parametrize("step", list(BLOCKERS))
async def test_an_append_cut_short_at_any_step_leaves_the_pool_clean(
    database: Database, admin: Connection, slow_commit: None, step: str, how: str
) -> None:
    loop = asyncio.get_running_loop()
    complaints: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: complaints.append(context))
    pool = await create_pool(database.service_dsn, size=2)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    blocker = await asyncpg.connect(database.admin_dsn)
    try:
        assert isinstance((await store.append([_draft("first")]))[0], Stored)
        await blocker.execute("BEGIN")
        for statement in BLOCKERS[step]:
            await blocker.execute(statement)
        task = asyncio.create_task(store.append([_draft("cut-short")]))
        await cut_short(task, admin, how)
        await blocker.execute("ROLLBACK")
        # nothing the pool holds is in a transaction or holds a lock
        await eventually(lambda: admin.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'ledger' "
            "AND state <> 'idle'"), within=10)
        async with asyncio.timeout(10):  # the head lock is free: another appender passes
            other = await create_pool(database.service_dsn, size=1)
            try:
                stored = (await EventStore(other, policy=TrustPolicy.ALLOWLIST)
                          .append([_draft("other")]))[0]
            finally:
                await other.close()
            again = (await store.append([_draft("again")]))[0]
        assert isinstance(stored, Stored)
        assert isinstance(again, Stored)
        assert (stored.position, again.position) == (2, 3)  # the cut-short one committed nothing
        rows = await admin.fetch("SELECT member_id FROM ledger.events ORDER BY position")
        assert [r["member_id"] for r in rows] == ["first", "other", "again"]
    finally:
        await blocker.close()
        await pool.close()
        loop.set_exception_handler(previous)
    # the store's own transaction ended it: the pool never had to roll one back on release
    assert [c["message"] for c in complaints] == []
