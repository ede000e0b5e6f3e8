"""Attacks on spool adoption, the settling of lost spool records and the bounded journal wait.

Each test here names what it attacks; the ones that found a defect fail without its fix (the
docstring says what they saw), the others show that what they attack holds.
Worker 1 reaches PostgreSQL through a relay the tests cut, unless said otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tracemalloc
import zlib
from hashlib import sha256
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import offline as offline_module
from ledger.committer import GroupCommitter
from ledger.models import Draft
from ledger.offline import OfflineTrust
from ledger.spool import _HEADER, MAGIC, Spool, undrained
from ledger.web import ADOPTER, COMMITTER, OFFLINE, SPOOL, SUPERVISOR
from tests.conftest import ClientFactory, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, allow_sample_portal, drained, install_sample_portal, post
from tests.test_planner import delivery
from tests.test_spool_adoption import journal_of, open_entries
from tests.test_trust_outage import (
    NEW_TOKEN,
    bot_events,
    known_everywhere,
    reinstall,
    spooled,
    stored_types,
    trusted_digest,
)

Admin: TypeAlias = "asyncpg.Connection[Any]"


async def uninstalled_at(admin: Admin) -> set[int]:
    """The positions of the (one) stored uninstall and of the trust event it made: its journal
    entry is settled at the second, or — found stored by a later drain — at the first; one
    commit holds both, so every refresh sees both or neither and either settles it alike."""
    row = await admin.fetchrow(
        "SELECT u.position AS event, (SELECT min(position) FROM ledger.events "
        "WHERE event_type = 'LEDGER.TRUST_CHANGED' AND position > u.position) AS trust "
        "FROM ledger.events u WHERE event_type = 'ONAPPUNINSTALL'")
    assert row is not None
    return {row["event"], row["trust"]}


async def test_a_drains_settle_cut_short_by_a_stalled_journal_holder_is_made_again(
    make_client: ClientFactory, outage: Any, admin: Admin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A spooled uninstall drains (committed); settling its journal entry then waits on a
    journal holder that stalls past the bound (`LockWaitTimeout`, new with the bound: before,
    the settle waited for the holder). The error was logged ("the next refresh catches up"),
    the record marked drained — and the entry stayed open for good: the refresh does not
    settle entries, so the portal stayed provisional and every other worker's spooled delivery
    of it (and all behind it in that spool) waited on it for ever. Now the batch stays in the
    spool and the next drain finds it stored and settles it — stored once."""
    monkeypatch.setattr(offline_module, "LOCK_WAIT_SECONDS", 0.3)
    relay, settings_for = outage
    settings = settings_for(worker=0, trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    assert client.app is not None
    await install_sample_portal(client)
    await relay.cut()
    await spooled(client, sample("onappuninstall-1"))
    (entry,) = open_entries(settings)

    settle = OfflineTrust.settle
    stalled: list[bool] = []

    def settle_behind_a_stalled_holder(self: OfflineTrust, *args: Any, **kwargs: Any) -> None:
        if stalled:
            return settle(self, *args, **kwargs)
        stalled.append(True)
        fd = os.open(settings.trust_dir / "journal.log", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # stalls for longer than the bound, then resumes
        try:
            return settle(self, *args, **kwargs)
        finally:
            os.close(fd)

    monkeypatch.setattr(OfflineTrust, "settle", settle_behind_a_stalled_holder)
    await relay.start()
    await drained(client)
    assert stalled
    await eventually(lambda: open_entries(settings) == [], within=10)
    assert journal_of(settings).settled[entry.seq] in await uninstalled_at(admin)
    assert client.app[OFFLINE].view()[1] == set()  # the portal is not provisional
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 0


def test_opening_a_huge_spool_reads_it_a_record_at_a_time(tmp_path: Path) -> None:
    """A worker adopting an absent worker's spool opens it every pass (`ledger.adoption`), and
    opening checked every undrained record from the whole log read into memory: a 1 GiB spool
    (the default limit — and an adopted one may be larger, written under another limit) cost
    each adopting worker 1 GiB more, pass after pass. Opening (and moving a torn tail aside)
    now reads one record at a time: here a 24 MiB spool opens within 2 MiB of memory."""
    directory = tmp_path / "worker-1"
    directory.mkdir(mode=0o700)
    body = b'{"v": 99, "kind": "event", "pad": "' + b"x" * 8000 + b'"}'
    record = _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body
    count = 24 * 1024 * 1024 // len(record)
    with (directory / "spool.log").open("wb") as handle:
        for _ in range(count):
            handle.write(record)
        handle.write(record[:100])  # and a torn tail
    tracemalloc.start()
    try:
        spool = Spool(directory, max_bytes=1024)  # an adopter's limit may be smaller
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak
    assert spool.records == count
    assert spool.size == count * len(record)
    (aside,) = spool.corrupt_found
    assert aside.read_bytes() == record[:100]
    assert (directory / "spool.log").stat().st_size == spool.size
    assert undrained(directory)[0] == spool.size


def test_looking_for_the_lost_records_of_a_huge_spool_keeps_only_what_it_looks_for(
    tmp_path: Path,
) -> None:
    """A record set aside unread (or a torn tail) makes the drain settle the journal entries
    whose delivery is no longer spooled; to know which, it collected the portal and dedup key
    of every undrained record of the spool (`undrained_causes`) — for an adopted spool of
    any size, a set as large as the spool's record count (~5 MB here, for 20,000 records).
    Now it is asked only about the open entries' deliveries (`held_among`), keeps only those,
    and reads nothing when the worker has none."""
    directory = tmp_path / "worker-1"
    spool = Spool(directory, max_bytes=1024**3)
    drafts = [delivery("ONIMBOTMESSAGEADD", "token", ts=ts) for ts in range(20_000)]
    for start in range(0, len(drafts), 1000):
        spool.append(list[Draft](drafts[start:start + 1000]))
    wanted = {(drafts[7].member_id, drafts[7].dedup_key.hex()), ("another", "00" * 32)}
    tracemalloc.start()
    try:
        found = spool.held_among(wanted)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == {(drafts[7].member_id, drafts[7].dedup_key.hex())}
    assert peak < 1024 * 1024, peak


async def test_two_adopters_at_once_and_one_dying_after_its_commit_store_everything_once(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker 1, cut off, spools messages and an uninstall and stops. Workers 0 and 2 both
    reach PostgreSQL and look for absent spools at the same moment, again and again; the first
    pass dies right after its COMMIT, before the drained marker (as a `kill -9` there: its lock
    let go, nothing of it noted). Holds: one adopter a pass, the other reports it as drained by
    the first; the dead pass's batch is found stored by the next one — every delivery stored
    once, no redelivery recorded, and worker 1's uninstall entry settled at the position of
    its event in PostgreSQL (the dead pass's commit)."""
    relay, settings_for = outage
    gone_settings = settings_for(worker=1, trust_refresh_seconds=3600)
    gone: Client = await make_client(gone_settings)
    await install_sample_portal(gone)
    await relay.cut()
    names = ["onimbotjoinchat-1", "onimbotmessageadd-1", "onappuninstall-1"]
    for name in names:
        await spooled(gone, sample(name))
    (entry,) = open_entries(gone_settings)
    await gone.close()
    directory = gone_settings.spool_path

    adopters = []
    for number in (0, 2):
        client: Client = await make_client(settings_factory(
            spool_retry_seconds=3600, spool_dir=tmp_path / "spool", worker=number,
            trust_refresh_seconds=3600))
        assert client.app is not None
        adopters.append(client.app[ADOPTER])

    mark_drained = Spool.mark_drained
    died: list[int] = []

    def dies_after_commit(self: Spool, pending: Any) -> None:
        if not died:
            died.append(len(pending.drafts))
            raise OSError("killed after COMMIT, before the drained marker")
        mark_drained(self, pending)

    monkeypatch.setattr(Spool, "mark_drained", dies_after_commit)
    reports: list[Any] = []
    for _ in range(20):
        results = await asyncio.gather(*(a.look() for a in adopters), return_exceptions=True)
        assert all(r is None or isinstance(r, OSError) for r in results), results
        reports.extend(a.absent.get(1) for a in adopters)
        if undrained(directory)[0] == 0:
            break
    assert died
    assert undrained(directory)[0] == 0
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT", "ONIMBOTMESSAGEADD",
                                         "ONAPPUNINSTALL"]
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 0
    assert journal_of(gone_settings).settled[entry.seq] in await uninstalled_at(admin)
    assert {r.drained_by for r in reports if r is not None} <= {0, 2, None}


async def test_an_adopted_uninstall_is_not_overtaken_by_the_adopters_own_later_deliveries(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin,
) -> None:
    """Worker 1, cut off, spools a portal's uninstall and stops. Worker 0 reaches PostgreSQL
    and, before it has adopted that spool, takes a bot message under the old token, then the
    reinstall and a message under the new one. Holds: judged after the orphan's uninstall
    (spooled behind it), the old token's message is refused at once (not 202), and worker 0's
    own drain waits for the adoption; then the lifecycle is stored in the order it happened,
    the new token's message stored after it, nothing accepted and refused on drain."""
    relay, settings_for = outage
    gone_settings = settings_for(worker=1, trust_refresh_seconds=3600)
    gone: Client = await make_client(gone_settings)
    await install_sample_portal(gone)
    await allow_sample_portal(gone)  # for the reinstall to come
    await relay.cut()
    await spooled(gone, sample("onappuninstall-1"))
    await gone.close()

    staying: Client = await make_client(settings_factory(
        spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=0,
        trust_refresh_seconds=3600))
    assert staying.app is not None
    await staying.app[SUPERVISOR].stop("spool-adoption")  # adopted below, when the test says
    await known_everywhere(staying)
    status, answer = await post(staying, sample("onimbotmessageadd-1"))
    assert status in (401, 403), (status, answer)  # judged after the uninstall
    await spooled(staying, reinstall())
    join, _ = bot_events(NEW_TOKEN)
    await spooled(staying, join)
    assert staying.app[SPOOL].has_pending()
    committer = staying.app[COMMITTER]
    for _ in range(3):  # its own drain tries, and waits on worker 1's uninstall
        committer.progressed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await committer.progressed.wait()
    assert await stored_types(admin) == ["ONAPPINSTALL"]

    await staying.app[ADOPTER].look()
    await drained(staying)
    assert undrained(gone_settings.spool_path)[0] == 0
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL",
                                         "ONIMBOTJOINCHAT"]
    assert await trusted_digest(admin) == sha256(NEW_TOKEN.encode()).digest()
    refusals = await admin.fetch("SELECT reason FROM ledger.rejections")
    assert len(refusals) == 1, refusals  # the old token's message, refused at intake


async def test_a_torn_orphan_spool_is_adopted_and_its_torn_uninstall_settled_as_refused(
    make_client: ClientFactory, outage: Any, admin: Admin,
) -> None:
    """Worker 1, cut off, spools a message and then an uninstall, and dies mid-write of the
    latter (its record torn). Holds: the adopter moves the torn tail aside, stores the
    message, and settles worker 1's uninstall entry as refused — the portal is not left
    provisional on an uninstall nothing will ever drain."""
    relay, settings_for = outage
    gone_settings = settings_for(worker=1, trust_refresh_seconds=3600)
    gone: Client = await make_client(gone_settings)
    await install_sample_portal(gone)
    await relay.cut()
    await spooled(gone, sample("onimbotjoinchat-1"))
    await spooled(gone, sample("onappuninstall-1"))
    assert len(open_entries(gone_settings)) == 1
    await gone.close()
    log_path = gone_settings.spool_path / "spool.log"
    os.truncate(log_path, log_path.stat().st_size - 10)

    await relay.start()
    staying: Client = await make_client(settings_for(worker=0, trust_refresh_seconds=3600))
    assert staying.app is not None
    await staying.app[SUPERVISOR].stop("spool-adoption")  # looked below, when the test says
    await staying.app[ADOPTER].look()
    assert undrained(gone_settings.spool_path)[0] == 0
    assert list(gone_settings.spool_path.glob("spool.corrupt-*"))
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT"]
    assert open_entries(gone_settings) == []
    assert staying.app[OFFLINE].view()[1] == set()  # not provisional


async def test_a_worker_number_back_while_its_spool_is_adopted_waits_for_the_pass(
    make_client: ClientFactory, outage: Any, admin: Admin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker 1's spool is being adopted by worker 0 (the pass held open by the test) when
    worker 1 starts again. Holds: worker 1 waits for the spool's lock, starts once the pass
    lets go, and finds the drained marker the pass wrote — nothing stored twice."""
    relay, settings_for = outage
    gone_settings = settings_for(worker=1, trust_refresh_seconds=3600)
    gone: Client = await make_client(gone_settings)
    await install_sample_portal(gone)
    await relay.cut()
    for name in ("onimbotjoinchat-1", "onimbotmessageadd-1"):
        await spooled(gone, sample(name))
    await gone.close()
    await relay.start()

    staying: Client = await make_client(settings_for(worker=0, trust_refresh_seconds=3600))
    assert staying.app is not None
    await staying.app[SUPERVISOR].stop("spool-adoption")
    drain_adopted = GroupCommitter.drain_adopted
    entered, release = asyncio.Event(), asyncio.Event()

    async def held_open(self: GroupCommitter, spool: Spool, seconds: float) -> None:
        entered.set()
        await release.wait()
        await drain_adopted(self, spool, seconds)

    monkeypatch.setattr(GroupCommitter, "drain_adopted", held_open)
    adopting = asyncio.create_task(staying.app[ADOPTER].look())
    await entered.wait()
    async def start_again() -> Client:
        started: Client = await make_client(gone_settings)
        return started

    back = asyncio.create_task(start_again())
    done, _ = await asyncio.wait({back}, timeout=0.5)
    assert not done  # waiting for the adopter's pass
    release.set()
    await adopting
    returned: Client = await back
    assert returned.app is not None
    assert not returned.app[SPOOL].has_pending()
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT", "ONIMBOTMESSAGEADD"]
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 0


async def test_an_orphan_spool_that_cannot_be_adopted_stops_no_other_and_no_worker(
    make_client: ClientFactory, outage: Any, admin: Admin,
) -> None:
    """Two absent workers' spools; the first cannot be opened (its drained marker is not a
    number: a disk error, an operator's edit). Its error raised out of the adoption task:
    every worker's adoption crash-looped on it (readiness failing everywhere once it loops)
    and the second spool — deliveries answered 202 — was never drained. Now the broken one is
    logged, reported with its error in /readyz and left as it is; the other is drained."""
    relay, settings_for = outage
    broken_settings = settings_for(worker=1, trust_refresh_seconds=3600)
    gone_settings = settings_for(worker=2, trust_refresh_seconds=3600)
    broken: Client = await make_client(broken_settings)
    gone: Client = await make_client(gone_settings)
    await install_sample_portal(gone)
    await relay.cut()
    await spooled(broken, sample("onimbotjoinchat-1"))
    await spooled(gone, sample("onimbotmessageadd-1"))
    await broken.close()
    await gone.close()
    (broken_settings.spool_path / "drained").write_text("not a number")

    await relay.start()
    staying: Client = await make_client(settings_for(worker=0, trust_refresh_seconds=3600))
    assert staying.app is not None
    await staying.app[SUPERVISOR].stop("spool-adoption")  # looked below, when the test says
    adopter = staying.app[ADOPTER]
    await adopter.look()
    assert undrained(gone_settings.spool_path)[0] == 0
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTMESSAGEADD"]
    ready = await (await staying.get("/readyz")).json()
    (absent,) = ready["spool"]["absent_workers"]
    assert absent["worker"] == 1
    assert "ValueError" in absent["error"], ready
    assert "spool-adoption" not in ready["checks"]["tasks"]
