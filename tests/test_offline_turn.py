"""One order for lifecycle decisions made online by one worker and offline by another.

Found by bench.churn (2 workers, a backend killed every 50 ms; 1 or 2 runs in 10 lost hundreds of
acknowledged deliveries): worker 0 committed an uninstall online and shared it through the
journal only after its COMMIT; worker 1, cut off from PostgreSQL in that gap, judged on the
journal without it and answered 202 to deliveries under the ended token (or to a reinstall),
which its drain then refused. And worker 0 asked for other workers' spooled lifecycle entries
before it held the head lock, so an entry spooled in between was judged around.
Worker 0 here reaches PostgreSQL directly, worker 1 through a relay the test cuts.
"""

from __future__ import annotations

import asyncio
import fcntl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger.models import Stored
from ledger.offline import Appender, OfflineTrust
from ledger.operations import change_trust
from ledger.settings import Settings
from ledger.storage.store import create_pool
from ledger.trust import TrustChange
from tests.conftest import MEMBER_ID, ClientFactory, Database, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, allow_sample_portal, drained, install_sample_portal, post
from tests.test_intake import forge
from tests.test_offline_cache import stored
from tests.test_offline_failover import _draft, _Worker
from tests.test_trust_outage import (
    NEW_TOKEN,
    known_everywhere,
    refused,
    reinstall,
    spooled,
    stored_types,
)

Admin: TypeAlias = "asyncpg.Connection[Any]"


def journal_held_elsewhere(settings: Settings) -> bool:
    return journal_held(settings.trust_dir / "journal.log")


def journal_held(journal: Path) -> bool:
    """Whether some open description of the journal holds its lock (flock is per description:
    this probe's own is a new one, so the test process's other holders count)."""
    with journal.open("rb") as probe:
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
        return False


@pytest.fixture
def two_workers(outage: Any, settings_factory: Any, tmp_path: Path) -> Any:
    """Worker 0 reaches PostgreSQL directly, worker 1 through the relay; one spool directory."""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=0)
    return relay, direct, settings_for(worker=1)


async def test_a_worker_offline_waits_for_an_uninstall_committed_online_to_be_shared(
    make_client: ClientFactory, two_workers: Any, admin: Admin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay, direct, through_relay = two_workers
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(through_relay)
    await install_sample_portal(online)
    await known_everywhere(online, cut_off)
    await relay.cut()

    committed, share = threading.Event(), threading.Event()
    original = OfflineTrust._share

    def paused(self: OfflineTrust, committed_: Any, *held: Any) -> None:
        if self._worker == 0:  # committed in PostgreSQL; the journal does not have it yet
            committed.set()
            assert share.wait(30)
        original(self, committed_, *held)

    monkeypatch.setattr(OfflineTrust, "_share", paused)
    uninstalling = asyncio.create_task(post(online, sample("onappuninstall-1")))
    await eventually(committed.is_set)
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE event_type = 'ONAPPUNINSTALL'") == 1
    # from the head lock until the uninstall is shared, the journal is the append's
    assert journal_held_elsewhere(direct)
    judging = asyncio.create_task(
        refused(cut_off, sample("onimbotjoinchat-1"), 403, "portal_uninstalled"))
    share.set()
    await judging
    assert (await uninstalling)[0] == 200
    assert not journal_held_elsewhere(direct)

    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]


async def test_a_lifecycle_entry_spooled_after_the_early_check_is_seen_under_the_lock(
    make_client: ClientFactory, two_workers: Any, admin: Admin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker 1, offline, takes the uninstall; worker 0 had found no spooled lifecycle entry
    for the portal just before. Judged by PostgreSQL's trust, the reinstall was refused
    (token_replacement_refused: the uninstall was not there yet) — a genuine reinstall, and
    everything under its token, lost. Under the lock it sees the entry and spools behind it."""
    relay, direct, through_relay = two_workers
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(through_relay)
    await install_sample_portal(online)
    await allow_sample_portal(online)  # for the reinstall to come
    await known_everywhere(online, cut_off)
    await relay.cut()

    checked, go_on = asyncio.Event(), asyncio.Event()
    original = Appender._after_other_workers

    async def paused(self: Appender, drafts: Any) -> None:
        await original(self, drafts)
        checked.set()
        await go_on.wait()

    monkeypatch.setattr(Appender, "_after_other_workers", paused)
    reinstalling = asyncio.create_task(post(online, reinstall()))
    await asyncio.wait_for(checked.wait(), 30)
    await spooled(cut_off, sample("onappuninstall-1"))  # between the check and the head lock
    go_on.set()
    status, answer = await reinstalling
    assert (status, answer.get("status")) == (202, "spooled"), answer
    monkeypatch.setattr(Appender, "_after_other_workers", original)

    await relay.start()
    await drained(cut_off)
    await drained(online)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]
    # the reinstall's token is the portal's now
    await stored(online, forge("onimbotjoinchat-1", application_token=NEW_TOKEN))


async def test_an_append_given_up_on_lets_go_of_the_journal_for_its_spool(
    make_client: ClientFactory, settings_factory: Any, tmp_path: Path, admin: Admin,
) -> None:
    """PostgreSQL stalls (here: a lock the append's first statement waits on) while an
    uninstall's append holds the journal's turn. The committer gives up after the append
    timeout and spools the batch — under the journal's lock, which its own stalled append
    held: the worker answered nothing until the statement timed out (command_timeout, 60 s),
    and every other worker's offline judgement waited as long. Given up on, the turn is let
    go; the stalled append, should it go on, judges nothing more under it."""
    settings = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool",
                                append_timeout_seconds=0.5)
    online: Client = await make_client(settings)
    await install_sample_portal(online)
    stall = admin.transaction()
    await stall.start()
    try:
        await admin.execute("LOCK TABLE ledger.portal_trust IN ACCESS EXCLUSIVE MODE")
        status, answer = await asyncio.wait_for(post(online, sample("onappuninstall-1")), 15)
        assert (status, answer.get("status")) == (202, "spooled"), answer
        await eventually(lambda: not journal_held_elsewhere(settings))
    finally:
        await stall.rollback()
    await drained(online)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]


@asynccontextmanager
async def commits_stalled(admin: Admin) -> AsyncIterator[None]:
    """Every COMMIT that stores an event waits (a deferred trigger, fired at COMMIT, takes a
    lock this connection holds) until the block ends."""
    await admin.execute("""
        CREATE FUNCTION public.stall_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER stall_commit AFTER INSERT ON ledger.events
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.stall_commit();
        SELECT pg_advisory_lock(4242);
    """)
    try:
        yield
    finally:
        await admin.execute("SELECT pg_advisory_unlock(4242)")


async def committing(admin: Admin) -> bool:
    """Whether a service connection waits in its COMMIT (`commits_stalled`)."""
    return bool(await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ledger' "
        "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"))


@pytest.fixture
def paused_spool(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Worker 0's first offline judgement waits for the test (`go_on`) once it began
    (`spooling`)."""
    spooling, go_on = threading.Event(), threading.Event()
    original = OfflineTrust.spool

    def paused(self: OfflineTrust, drafts: Any, write: Any, **options: Any) -> Any:
        if self._worker == 0 and not spooling.is_set():
            spooling.set()
            assert go_on.wait(30)
        return original(self, drafts, write, **options)

    monkeypatch.setattr(OfflineTrust, "spool", paused)
    return spooling, go_on


async def test_a_portal_whose_uninstall_may_yet_commit_is_judged_by_nobody_offline(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin, paused_spool: tuple[threading.Event, threading.Event],
) -> None:
    """Worker 0's uninstall holds the turn when its COMMIT stalls; the committer gives up and
    spools it, and the COMMIT lands when the stall ends. The turn was let go at the give-up:
    worker 1, offline, judged the portal before worker 0's spool wrote the uninstall's entry —
    a delivery under the token that was ending answered 202, stored after the uninstall. Now
    the journal stays locked from the turn to that spool, whose entry stands for the commit
    (the delivery is refused), and which records the portal in doubt: its installs and
    uninstalls are answered 503 offline — judged again on drain by PostgreSQL's trust, which
    may hold a commit the offline judgement did not — until worker 0 has drained the
    uninstall (found stored: it did commit); judged by that after. (No worker settles the
    doubt sooner here — each would end the stalled COMMIT: test_offline_doubt.py.)"""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=0,
                              append_timeout_seconds=0.5, trust_refresh_seconds=3600)
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(settings_for(worker=1))
    await install_sample_portal(online)
    await allow_sample_portal(online)  # for the reinstall to come
    await known_everywhere(online, cut_off)
    await relay.cut()
    spooling, go_on = paused_spool

    async with commits_stalled(admin):
        uninstalling = asyncio.create_task(post(online, sample("onappuninstall-1")))
        await eventually(spooling.is_set)
        assert await committing(admin)
        assert journal_held_elsewhere(direct)  # from the turn to the spool: nobody between
        judging = asyncio.create_task(
            refused(cut_off, sample("onimbotjoinchat-1"), 403, "portal_uninstalled"))
        go_on.set()
        status, answer = await uninstalling
        assert (status, answer.get("status")) == (202, "spooled"), answer
        await judging
        await refused(cut_off, reinstall(), 503, "lifecycle_in_doubt")
        await refused(online, reinstall(), 503, "lifecycle_in_doubt")
    await drained(online)  # the COMMIT landed; its spooled copy is found stored: settled
    await spooled(cut_off, reinstall())
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]


async def test_an_uninstall_whose_connection_is_lost_in_its_commit_is_in_doubt_until_drained(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin, paused_spool: tuple[threading.Event, threading.Event],
) -> None:
    """The same doubt when worker 0's connection is lost while its COMMIT is in flight (a
    terminated backend): PostgreSQL may have committed it or not. Here it did not — the
    drain stores the spooled copy, and the portal is judged by that after."""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=0)
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(settings_for(worker=1))
    await install_sample_portal(online)
    await allow_sample_portal(online)
    await known_everywhere(online, cut_off)
    await relay.cut()
    spooling, go_on = paused_spool

    async with commits_stalled(admin):
        uninstalling = asyncio.create_task(post(online, sample("onappuninstall-1")))
        await eventually(lambda: committing(admin))
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
            "application_name = 'ledger' AND wait_event_type = 'Lock' "
            "AND wait_event = 'advisory'")
        await eventually(spooling.is_set)
        assert journal_held_elsewhere(direct)
        go_on.set()
        status, answer = await uninstalling
        assert (status, answer.get("status")) == (202, "spooled"), answer
        await refused(cut_off, reinstall(), 503, "lifecycle_in_doubt")
    await drained(online)
    await spooled(cut_off, reinstall())
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]


async def test_an_append_cancelled_while_its_share_is_written_lets_the_share_finish(
    database: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On shutdown the loop cancels an append while a thread writes its share into the
    journal: the append's `finally` closed the journal under that thread — the share was cut
    off, and the other workers never learned of the committed install offline."""
    pool = await create_pool(database.service_dsn, size=2)
    try:
        worker = _Worker(pool, tmp_path / "trust")
        await change_trust(worker.process.store, TrustChange.ALLOWED, member_id=MEMBER_ID,
                           actor="test")
        await worker.offline.start(worker.process.store)
        writing, go_on = threading.Event(), threading.Event()
        original = OfflineTrust._share

        def slow(self: OfflineTrust, committed: Any, *held: Any) -> None:
            writing.set()
            assert go_on.wait(30)
            original(self, committed, *held)

        monkeypatch.setattr(OfflineTrust, "_share", slow)
        appending = asyncio.create_task(
            worker.appender.append([_draft(settings, sample("onappinstall-1"))]))
        await eventually(writing.is_set)
        appending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await appending
        go_on.set()
        journal = tmp_path / "trust" / "journal.log"
        await eventually(lambda: b'"stored"' in journal.read_bytes())
        await eventually(lambda: not journal_held(journal))  # and then let go of
    finally:
        await pool.close()


async def test_the_snapshot_is_saved_after_the_turn_is_let_go_of(
    database: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An install's append holds the journal until its share is written; the snapshot after it
    is this worker's own file — saved (an fsync) with the journal still held, every other
    worker's offline judgement waited that much longer."""
    pool = await create_pool(database.service_dsn, size=2)
    try:
        worker = _Worker(pool, tmp_path / "trust")
        await change_trust(worker.process.store, TrustChange.ALLOWED, member_id=MEMBER_ID,
                           actor="test")
        await worker.offline.start(worker.process.store)
        held_while_saving: list[bool] = []
        original = OfflineTrust._save_snapshot
        journal = tmp_path / "trust" / "journal.log"

        def saving(self: OfflineTrust, **options: Any) -> None:
            held_while_saving.append(journal_held(journal))
            original(self, **options)

        monkeypatch.setattr(OfflineTrust, "_save_snapshot", saving)
        (outcome,) = await worker.appender.append([_draft(settings, sample("onappinstall-1"))])
        assert isinstance(outcome, Stored), outcome
        assert held_while_saving == [False]
    finally:
        await pool.close()


async def test_an_online_worker_spools_behind_another_workers_lifecycle_without_waiting(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin,
) -> None:
    """Worker 1, cut off, spooled an uninstall; worker 0, online, gets a delivery for that
    portal. It waited for worker 1's drain (up to twice LEDGER_SPOOL_RETRY_SECONDS) before
    spooling it behind — and every delivery of every portal at worker 0 waited with it, while
    other workers judged later deliveries of the same portals: a first install held so was
    judged after the uninstall and reinstall that followed it (bench.churn: 150 genuine
    deliveries never stored in one run). Now it is judged on the journal at once."""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=30, spool_dir=tmp_path / "spool", worker=0,
                              append_timeout_seconds=60)
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(settings_for(worker=1))
    await install_sample_portal(online)
    await known_everywhere(online, cut_off)
    await relay.cut()
    await spooled(cut_off, sample("onappuninstall-1"))
    await asyncio.wait_for(
        refused(online, sample("onimbotjoinchat-1"), 403, "portal_uninstalled"), 10)
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]


async def test_a_batch_in_doubt_is_spooled_past_the_spools_limit(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin,
) -> None:
    """Worker 0's uninstall is given up on mid-COMMIT while its spool is full. Refused by
    the spool (503 spool_full), the batch took its doubt with it: the journal was let go with
    no entry and no doubt, and worker 1, offline, answered 202 to a delivery under the token
    the uninstall ended — the COMMIT landed when the stall ended, and the drain refused the
    acknowledged delivery. A batch whose append may have committed is spooled past the limit
    (one batch a doubt): its entry stands for the commit, its drain settles the doubt."""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=0,
                              append_timeout_seconds=0.5, spool_max_bytes=1024)
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(settings_for(worker=1))
    await install_sample_portal(online)
    await allow_sample_portal(online)
    await known_everywhere(online, cut_off)
    await relay.cut()

    async with commits_stalled(admin):
        status, answer = await asyncio.wait_for(post(online, sample("onappuninstall-1")), 15)
        assert await committing(admin)  # the given-up COMMIT may still land
        await refused(cut_off, sample("onimbotjoinchat-1"), 403, "portal_uninstalled")
        assert (status, answer.get("status")) == (202, "spooled"), answer
        await refused(cut_off, reinstall(), 503, "lifecycle_in_doubt")
    await drained(online)
    await spooled(cut_off, reinstall())
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]


async def test_a_worker_that_reaches_postgresql_settles_a_doubt_and_judges_the_portal(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin,
) -> None:
    """Worker 0's uninstall is given up on mid-COMMIT, and worker 0 is then cut off: its
    COMMIT lands, but the doubt stayed until worker 0 drained. Worker 1 reaches PostgreSQL,
    yet a reinstall there waited on worker 0's spooled entry (`_after_other_workers`):
    spooled behind it, it met the doubt — 503, which Bitrix24 does not resend. Now worker 1
    settles the doubt first: the transaction is over and the uninstall stored, so the spooled
    entry is settled at its position and the reinstall judged by PostgreSQL at once; worker
    0's drain then finds its spooled uninstall stored (one uninstall in the ledger)."""
    relay, settings_for = outage
    cut_off: Client = await make_client(settings_for(worker=0, append_timeout_seconds=0.5,
                                                     trust_refresh_seconds=3600))
    online: Client = await make_client(
        settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=1,
                         trust_refresh_seconds=3600))
    await install_sample_portal(online)
    await allow_sample_portal(online)
    await known_everywhere(online, cut_off)

    await uninstall_landed_after_cut(cut_off, relay, admin)
    status, answer = await post(online, reinstall())
    assert (status, answer.get("status")) == (200, "stored"), answer
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]


async def stored_uninstall(admin: Admin) -> bool:
    return "ONAPPUNINSTALL" in await stored_types(admin)


async def uninstall_landed_after_cut(client: Client, relay: Any, admin: Admin) -> None:
    """The sample portal's uninstall given up on mid-COMMIT at `client`, PostgreSQL then cut
    off from it — and the COMMIT landed after all: a doubt whose answer is "committed"."""
    async with commits_stalled(admin):
        await spooled(client, sample("onappuninstall-1"))
        await relay.cut()
    await eventually(lambda: stored_uninstall(admin))
