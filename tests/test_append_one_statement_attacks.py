"""Attacks on the one-statement append (`ledger.append_events`, `EventStore._append_fast`): what
the intake remembers of trust must never let it accept what the long way — PostgreSQL's trust,
PostgreSQL's dedup facts — would refuse, whatever happened to the database meanwhile."""

from __future__ import annotations

from ledger.models import Refusal, Stored
from ledger.operations import change_trust
from ledger.settings import Settings
from ledger.storage.store import create_pool
from ledger.storage.target import ensure_database
from ledger.trust import TrustChange
from tests.conftest import MEMBER_ID, Cluster, Database, _drop_database
from tests.test_append_one_statement import _delivery, _installed, _Process


async def test_a_database_that_went_back_in_history_is_not_trusted_from_memory(
    cluster: Cluster, database: Database, settings: Settings
) -> None:
    """A failover to a replica that had not received the last commits (or a restore from a
    backup) under a running worker: the history the worker learned trust in is not the
    database's any more. There an operator ended the portal's trust at the position the worker
    learned it at, and the head has since moved past what the worker saw. A delivery under the
    old token is refused, as the long way refuses it — not stored on the worker's memory."""
    pool = await create_pool(database.service_dsn, size=2)
    try:
        await _installed(_Process(pool), settings)
    finally:
        await pool.close()
    replica = f"{database.name}_replica"
    await ensure_database(cluster.admin_dsn, replica, template=database.name)
    try:
        pool = await create_pool(database.service_dsn, size=2)
        worker = _Process(pool)
        try:
            for batch in range(3):  # learned at the first (the long way), then one statement
                (stored,) = await worker.store.append(
                    [_delivery(settings, "onimbotmessageadd-1", f"before-{batch}")])
                assert isinstance(stored, Stored), stored
            assert worker.ways["one_statement"] == 2, worker.ways
            # the replica lost those three; there an operator ended the portal's trust, at the
            # position the worker learned it at, and the head moved on past what it saw
            other = _Process(replica_pool := await create_pool(
                cluster.dsn(replica, user="ledger_app"), size=2))
            try:
                await change_trust(other.store, TrustChange.ENDED, member_id=MEMBER_ID,
                                   actor="test")
                for i in range(4):
                    await change_trust(other.store, TrustChange.ALLOWED, member_id=f"m{i}",
                                       actor="test")
            finally:
                await replica_pool.close()
            # failover: the same pool's new connections reach the replica
            pool.set_connect_args(dsn=cluster.dsn(replica, user="ledger_app"))
            await pool.expire_connections()
            (late,) = await worker.store.append(
                [_delivery(settings, "onimbotmessageadd-1", "after-failover")])
            assert isinstance(late, Refusal), late
            assert (late.status, late.code) == (403, "portal_uninstalled")
            assert worker.ways["retried"] == 1, worker.ways  # sent, and refused under the lock
        finally:
            await pool.close()
    finally:
        await _drop_database(cluster, replica)

