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
from pathlib import Path
from typing import IO, Any, TypeAlias

import asyncpg
import pytest

from ledger.offline import Appender, OfflineTrust
from ledger.settings import Settings
from tests.conftest import ClientFactory, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, allow_sample_portal, drained, install_sample_portal, post
from tests.test_intake import forge
from tests.test_offline_cache import stored
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
    """Whether some open description of the journal holds its lock (flock is per description:
    this probe's own is a new one, so the test process's other holders count)."""
    with (settings.trust_dir / "journal.log").open("rb") as probe:
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

    def paused(self: OfflineTrust, committed_: Any, held: IO[bytes] | None = None) -> None:
        if self._worker == 0:  # committed in PostgreSQL; the journal does not have it yet
            committed.set()
            assert share.wait(30)
        original(self, committed_, held)

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
