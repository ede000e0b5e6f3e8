"""Offline judging after PostgreSQL went back in history under a running worker (a failover to
a replica that had not received the last commits, or a restore from a backup).

What a worker keeps for outages — the trust base read from PostgreSQL, its own committed trust
changes, the dedup facts of its recent commits (`ledger.recent`), the lifecycle deliveries
shared through the journal — are facts of *a* history. Read on as if they were the database's
after it lost commits, they answered what online would not: a 200 "duplicate" for a delivery
the database does not hold and whose token it no longer trusts, and a 202 under a token only the
lost history trusted, which the drain then stored as judged. Each test asserts the offline
answer is the one the database the worker now reaches gives online.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ledger import intake
from ledger.errors import LedgerError
from ledger.models import Draft, Duplicate, EventDraft, Outcome, Refusal, Spooled, Stored
from ledger.offline import Appender, OfflineTrust
from ledger.operations import change_trust
from ledger.recent import RecentCommits
from ledger.settings import Settings, TrustPolicy
from ledger.storage.store import Pool, create_pool
from ledger.trust import TrustChange
from tests.conftest import FORM, MEMBER_ID, TOKEN, Cluster, Database, _drop_database
from tests.test_append_one_statement import (
    _delivery,
    _installed_then_copied,
    _Process,
)
from tests.test_intake import forge
from tests.test_trust_outage import NEW_TOKEN


def _draft(settings: Settings, body: bytes) -> Any:
    delivery = intake.Delivery(body, FORM, "", "127.0.0.1")
    return intake.draft_of(settings, delivery, intake.decode(settings, delivery),
                           datetime.now(UTC), 1000)


class _Worker:
    """One serve worker's append path and offline state, on a pool whose DSN a failover moves."""

    def __init__(self, pool: Pool, directory: Path, number: int = 0) -> None:
        self.process = _Process(pool)
        self.offline = OfflineTrust(directory, worker=number, policy=TrustPolicy.ALLOWLIST,
                                    recent=RecentCommits(max_entries=1000, max_bytes=1 << 20))
        self.appender = Appender(self.process.store, self.offline)

    def offline_answers(
        self, drafts: list[Draft]
    ) -> tuple[list[Outcome | LedgerError], list[Draft]]:
        """What the worker answers these while PostgreSQL is away, and what it spools."""
        spooled: list[Draft] = []
        return self.offline.spool(drafts, spooled.extend), spooled


@asynccontextmanager
async def _replica(cluster: Cluster, database: Database, settings: Settings, *,
                   moves_on: int = 0, ended: bool = False) -> AsyncIterator[str]:
    """The sample portal installed, then a copy of the database as it is then (dropped after):
    its own history goes on with `moves_on` messages past that position and, when `ended`, the
    portal's trust ended there."""
    replica = await _installed_then_copied(cluster, database, settings)
    try:
        replica_pool = await create_pool(cluster.dsn(replica, user="ledger_app"), size=2)
        try:
            other = _Process(replica_pool)
            for i in range(moves_on):
                (stored,) = await other.store.append(
                    [_delivery(settings, "onimbotmessageadd-1", f"replica-{i}")])
                assert isinstance(stored, Stored), stored
            if ended:
                await change_trust(other.store, TrustChange.ENDED, member_id=MEMBER_ID,
                                   actor="test")
        finally:
            await replica_pool.close()
        yield replica
    finally:
        await _drop_database(cluster, replica)


async def _failover(pool: Pool, cluster: Cluster, replica: str) -> None:
    pool.set_connect_args(dsn=cluster.dsn(replica, user="ledger_app"))
    await pool.expire_connections()


async def test_a_copy_of_a_delivery_the_database_lost_is_not_answered_as_a_duplicate(
    cluster: Cluster, database: Database, settings: Settings, tmp_path: Path
) -> None:
    """The worker stored a message; the replica it fails over to lost it, and there the
    portal's trust was ended. Online a copy of the message is refused (403: nothing stored, the
    portal uninstalled); offline it was answered 200 duplicate from the worker's memory, at a
    position the database holds another event at — and spooled, refused on drain."""
    async with _replica(cluster, database, settings, ended=True) as replica:
        pool = await create_pool(database.service_dsn, size=2)
        try:
            worker = _Worker(pool, tmp_path / "trust")
            await worker.offline.start(worker.process.store)
            message = _delivery(settings, "onimbotmessageadd-1", "lost-in-failover")
            (stored,) = await worker.appender.append([message])
            assert isinstance(stored, Stored), stored
            await worker.offline.refresh(worker.process.store)  # online, as every second

            await _failover(pool, cluster, replica)
            await worker.offline.refresh(worker.process.store)  # online again, on the replica
            (offline,), _ = worker.offline_answers([message])
            (online,) = await worker.process.store.append([message])
            assert isinstance(online, Refusal), online
            assert (online.status, online.code) == (403, "portal_uninstalled")
            assert not isinstance(offline, Duplicate), offline
            assert isinstance(offline, Refusal), offline
            assert (offline.status, offline.code) == (online.status, online.code)
        finally:
            await pool.close()


async def test_a_token_only_the_lost_history_trusted_is_not_accepted_offline(
    cluster: Cluster, database: Database, settings: Settings, tmp_path: Path
) -> None:
    """The portal was re-provisioned with another token; the replica lost that (and took other
    deliveries past its position). The worker's trust base still held the lost token: offline a
    delivery under it was accepted on settled trust (202) and the drain stores such a delivery
    as judged — under a token the database never trusted; the genuine token was refused."""
    # the replica moves on without the re-provisioning: its head passes its position
    async with _replica(cluster, database, settings, moves_on=4) as replica:
        pool = await create_pool(database.service_dsn, size=2)
        try:
            worker = _Worker(pool, tmp_path / "trust")
            await worker.offline.start(worker.process.store)
            await change_trust(worker.process.store, TrustChange.PROVISIONED,
                               member_id=MEMBER_ID, token=NEW_TOKEN, actor="test")
            await worker.offline.refresh(worker.process.store)

            await _failover(pool, cluster, replica)
            await worker.offline.refresh(worker.process.store)
            lost = _draft(settings, forge("onimbotjoinchat-1", application_token=NEW_TOKEN))
            genuine = _draft(settings, forge("onimbotjoinchat-1", application_token=TOKEN,
                                             ts="1796526500"))
            offline, spooled = worker.offline_answers([lost, genuine])
            online = await worker.process.store.append([lost, genuine])
            assert isinstance(online[0], Refusal), online
            assert (online[0].status, online[0].code) == (401, "invalid_application_token")
            assert isinstance(online[1], Stored), online
            assert isinstance(offline[0], Refusal), offline
            assert (offline[0].status, offline[0].code) == (online[0].status, online[0].code)
            assert isinstance(offline[1], Spooled), offline
            assert not any(isinstance(d, EventDraft) and d.offline_accepted
                           and d.presented_sha256 == lost.presented_sha256 for d in spooled)
        finally:
            await pool.close()


async def test_other_workers_ignore_shared_commits_of_a_history_the_database_lost(
    cluster: Cluster, database: Database, settings: Settings, tmp_path: Path
) -> None:
    """Worker 1 reinstalled the portal with another token and shared the install through the
    journal (settled at its position, with its dedup facts); the replica lost it. Once worker 1
    finds the database went back, worker 0 — which never committed anything lost, and whose
    own facts still hold — no longer applies that entry: offline it accepts the token the
    database trusts and refuses the lost one, as online."""
    async with _replica(cluster, database, settings, moves_on=6) as replica:
        pools = [await create_pool(database.service_dsn, size=2) for _ in range(2)]
        try:
            workers = [_Worker(p, tmp_path / "trust", n) for n, p in enumerate(pools)]
            for worker in workers:
                await worker.offline.start(worker.process.store)
            await change_trust(workers[1].process.store, TrustChange.ALLOWED,
                               member_id=MEMBER_ID, actor="test")
            uninstalled = await workers[1].appender.append(
                [_draft(settings, forge("onappuninstall-1", application_token=TOKEN))])
            assert isinstance(uninstalled[0], Stored), uninstalled
            await change_trust(workers[1].process.store, TrustChange.ALLOWED,
                               member_id=MEMBER_ID, actor="test")
            reinstall = _draft(settings, forge("onappinstall-1", application_token=NEW_TOKEN,
                                               ts="1796526400"))
            (reinstalled,) = await workers[1].appender.append([reinstall])
            assert isinstance(reinstalled, Stored), reinstalled
            journal = (tmp_path / "trust" / "journal.log").read_bytes().splitlines()
            assert any("stored" in orjson.loads(line) for line in journal), journal

            for pool in pools:
                await _failover(pool, cluster, replica)
            await workers[1].offline.refresh(workers[1].process.store)  # it finds out
            await workers[0].offline.refresh(workers[0].process.store)

            lost = _draft(settings, forge("onimbotjoinchat-1", application_token=NEW_TOKEN))
            genuine = _draft(settings, forge("onimbotjoinchat-1", application_token=TOKEN,
                                             ts="1796526500"))
            offline, _ = workers[0].offline_answers([lost, genuine])
            (copy,), _ = workers[0].offline_answers([reinstall])
            online = await workers[0].process.store.append([lost, genuine])
            assert isinstance(online[0], Refusal), online
            assert isinstance(online[1], Stored), online
            assert isinstance(offline[0], Refusal), offline
            assert (offline[0].status, offline[0].code) == (online[0].status, online[0].code)
            assert isinstance(offline[1], Spooled), offline
            assert not isinstance(copy, Duplicate), copy  # the database holds no such install
        finally:
            for pool in pools:
                await pool.close()


async def test_a_worker_restarted_on_a_snapshot_checks_the_history_it_was_saved_in(
    cluster: Cluster, database: Database, settings: Settings, tmp_path: Path
) -> None:
    """A worker restarted while PostgreSQL was away judges by the saved snapshot; the database
    it then reaches lost the re-provisioning the snapshot holds. Its first refresh finds that
    out (the snapshot records the head it was read at): the lost token is refused offline."""
    async with _replica(cluster, database, settings, moves_on=4) as replica:
        pool = await create_pool(database.service_dsn, size=2)
        try:
            before = _Worker(pool, tmp_path / "trust")
            await before.offline.start(before.process.store)
            await change_trust(before.process.store, TrustChange.PROVISIONED,
                               member_id=MEMBER_ID, token=NEW_TOKEN, actor="test")
            await before.offline.refresh(before.process.store)  # saves the snapshot

            pool.set_connect_args(dsn=cluster.dsn(f"{database.name}_gone", user="ledger_app"))
            await pool.expire_connections()
            restarted = _Worker(pool, tmp_path / "trust")
            await restarted.offline.start(restarted.process.store)  # from the snapshot
            await _failover(pool, cluster, replica)
            await restarted.offline.refresh(restarted.process.store)

            lost = _draft(settings, forge("onimbotjoinchat-1", application_token=NEW_TOKEN))
            (offline,), _ = restarted.offline_answers([lost])
            (online,) = await restarted.process.store.append([lost])
            assert isinstance(online, Refusal), online
            assert isinstance(offline, Refusal), offline
            assert (offline.status, offline.code) == (online.status, online.code)
        finally:
            await pool.close()
