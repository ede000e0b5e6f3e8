"""Attacks on lifecycle-doubt settlement and the offline trust journal (breaksettle).

The journal (`<trust_dir>/journal.log`) is read by every worker before every offline judgement,
every online append that may wait on another worker, every drain and every settlement: a line
there that is not what this version writes must cost nothing but that line, and the lines of
deliveries that change no trust must not outlive them. A doubt is settled by keys whichever
worker settles it, and one doubt PostgreSQL cannot answer must not keep the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest

from ledger.errors import DatabaseUnavailable
from ledger.offline import _read
from ledger.settings import TrustPolicy
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustState
from ledger.web import OFFLINE, STORE
from tests.conftest import MEMBER_ID, ClientFactory, Database, sample
from tests.helpers import Client, drained, install_sample_portal, post
from tests.test_intake import forge
from tests.test_offline_failover import _Worker
from tests.test_offline_turn import commits_stalled, committing, uninstall_landed_after_cut
from tests.test_trust_outage import known_everywhere, refused, reinstall, spooled, stored_types

Admin: TypeAlias = "asyncpg.Connection[Any]"

ENTRY = (b'{"seq":0,"worker":1,"member_id":"elsewhere","cause":"","effect":'
         b'{"change":"established","member_id":"elsewhere","token_sha256":"00"}}')
# lines no version of the ledger writes: each used to raise out of every read of the journal
BAD_LINES = [
    b"{}", b"[]", b"123", b'"settled"', b"null", b"\x00\x00\x00\x00",
    b'{"settled":0,"position":"x","at":1}',  # compared with positions: a TypeError in _view
    b'{"settled":"x","position":1,"at":1}',
    b'{"doubt":[["elsewhere","zz"]],"worker":0,"txn":["1",2,"2026-01-01 00:00:00+00"]}',
    b'{"doubt":5,"worker":0}', b'{"resolved":[[1]],"worker":0}',
    b'{"seq":1,"worker":1,"member_id":5,"cause":"","effect":[]}',
    b'{"seq":"1","worker":1,"member_id":"m","cause":"","effect":{"change":"ended"}}',
    b'{"x":"' + b"a" * (2 << 20) + b'"}',  # a huge line
]


async def test_a_bad_journal_line_costs_only_that_line_and_is_logged_once(
    make_client: ClientFactory, outage: Any, admin: Admin, caplog: pytest.LogCaptureFixture,
) -> None:
    """One line of garbage in the journal (a `{}`, a wrong type, a huge line) raised out of
    every read of it: every delivery of every portal at every worker was answered 503
    not_stored — online and offline — for as long as the line stayed. Now each such line is
    passed over with one ERROR saying what to do, and a torn last line (a crash mid-write)
    silently, as before."""
    relay, settings_for = outage
    settings = settings_for(worker=0, trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    journal = settings.trust_dir / "journal.log"
    with journal.open("ab") as handle:
        handle.write(b"".join(line + b"\n" for line in [ENTRY, *BAD_LINES]))
        handle.write(b'{"doubt":[["torn"')  # torn by a crash: never acknowledged

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ledger.offline"):
        status, answer = await post(client, sample("onimbotjoinchat-1"))
        assert status == 200, answer
        await relay.cut()
        await spooled(client, sample("onimbotmessageadd-1"))
        await spooled(client, sample("onappuninstall-1"))
        await relay.start()
        await drained(client)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT",
                                         "ONIMBOTMESSAGEADD", "ONAPPUNINSTALL"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(BAD_LINES), errors  # once each, however often it was read
    assert all("passed over" in e and "one version everywhere" in e for e in errors), errors
    assert all(str(journal) in e for e in errors), errors


async def test_installs_nobody_trusts_do_not_grow_the_journal(
    make_client: ClientFactory, settings_factory: Any, tmp_path: Path,
) -> None:
    """Every append of an install or uninstall writes an intent into the journal before its
    COMMIT and resolves it after: two lines — also for forged installs refused 403. The
    journal was emptied only once it held trust entries, so with none it grew by ~400 bytes a
    forged install, for good, and every worker read it whole at every change. Then a journal
    that held only resolved intents was emptied as any settled one; now an append whose plan
    changes no trust (these, refused) writes no intent at all (`JournalTurn.intend`)."""
    settings = settings_factory(spool_dir=tmp_path / "spool", worker=0,
                                trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    for number in range(5):
        status, answer = await post(client, forge("onappinstall-1", member_id=f"{number:032x}"))
        assert status == 403, answer
    journal = settings.trust_dir / "journal.log"
    assert journal.read_bytes() == b""  # on the version before: ten lines, two an install
    assert client.app is not None
    await client.app[OFFLINE].refresh(client.app[STORE])  # a periodic refresh
    assert len(journal.read_bytes().splitlines()) <= 1
    with journal.open("rb") as handle:
        assert not _read(handle).doubts


@asynccontextmanager
async def all_commits_stalled(admin: Admin) -> AsyncIterator[None]:
    """`commits_stalled`, also for a COMMIT that stores only rejections (a refused batch)."""
    async with commits_stalled(admin):
        await admin.execute("""
            CREATE CONSTRAINT TRIGGER stall_rejection AFTER INSERT ON ledger.rejections
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                EXECUTE FUNCTION public.stall_commit()""")
        yield


async def test_a_forged_install_cut_off_mid_commit_puts_its_portal_in_no_doubt(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin,
) -> None:
    """Anyone may send an install naming a trusted portal (member_ids are no secret) with a
    token of their own: refused 403 online, its COMMIT stores a rejection and moves no trust.
    But its intent named the portal, and given up on mid-COMMIT (PostgreSQL stalling, then
    cut off) it put the portal in doubt — with nothing spooled standing for it, *every*
    delivery of the genuine portal was answered 503 by every worker offline until a worker
    reached PostgreSQL again (Bitrix24 does not resend a 503). A batch's portals are in doubt
    only when its COMMIT may move their trust (the plan's trust changes)."""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=0,
                              append_timeout_seconds=0.5, trust_refresh_seconds=3600)
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(settings_for(worker=1, trust_refresh_seconds=3600))
    await install_sample_portal(online)
    await known_everywhere(online, cut_off)
    await relay.cut()
    async with all_commits_stalled(admin):
        await asyncio.wait_for(
            refused(online, reinstall(), 403, "token_replacement_refused"), 15)
        assert await committing(admin)
        await spooled(cut_off, sample("onimbotjoinchat-1"))
        await spooled(cut_off, sample("onappuninstall-1"))
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT", "ONAPPUNINSTALL"]


async def test_a_doubt_postgresql_cannot_answer_does_not_keep_the_others(
    make_client: ClientFactory, settings_factory: Any, tmp_path: Path, admin: Admin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two doubts: one whose intent PostgreSQL refuses to be asked about (its backend start is
    no time: a damaged line, another version's), one over and not committed. The first raised
    out of `settle_doubts`, and the second — a genuine portal, its installs and uninstalls
    answered 503 offline — was never settled: by no refresh, and by no online batch of its
    portal (spooled behind the doubt, 503 again). Now each doubt is settled on its own; the
    one that cannot be is logged once, with what to do."""
    settings = settings_factory(spool_dir=tmp_path / "spool", worker=0,
                                trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    over = await admin.fetchrow(  # a transaction that is over (committed, nothing stored)
        "SELECT pg_current_xact_id()::text AS xid, pg_backend_pid() AS pid, "
        "(SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()) AS at")
    assert over is not None
    with (settings.trust_dir / "journal.log").open("ab") as handle:
        handle.write(orjson.dumps({"doubt": [["poisoned", "aa"]], "worker": 7,
                                   "txn": ["1", 1, "no time"], "at": 1}) + b"\n")
        handle.write(orjson.dumps({"doubt": [[MEMBER_ID, "bb"]], "worker": 8,
                                   "txn": [over["xid"], over["pid"], over["at"]], "at": 1})
                     + b"\n")
    assert client.app is not None
    offline, store = client.app[OFFLINE], client.app[STORE]
    with caplog.at_level(logging.ERROR, logger="ledger.offline"):
        assert await offline.settle_doubts(store) == frozenset({"poisoned"})
        assert await offline.settle_doubts(store) == frozenset({"poisoned"})
    with (settings.trust_dir / "journal.log").open("rb") as handle:
        assert set(_read(handle).doubts) == {(7, "poisoned", "aa")}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "worker 7's lifecycle doubt (portal(s) poisoned" in errors[0], errors
    assert "cannot be settled" in errors[0], errors


async def test_settling_ends_nothing_but_the_doubtful_transaction(
    make_client: ClientFactory, settings_factory: Any, tmp_path: Path,
    service_connection: Admin, admin: Admin,
) -> None:
    """pid reuse: the intent's pid is, at settle time, a live backend of the service's own role
    running another transaction, or the pid of an earlier backend (another start: a restarted
    server) whose xid is this server's transaction in progress now — nothing is terminated,
    and each doubt is decided by keys ("did not commit": none stored). Or a backend of another
    role, which the service role may not see the start of: it was taken for gone, and its
    transaction, in progress, decided "did not commit" — a worker settling with another role
    than the one that appended (a role rotation) decided a COMMIT in flight had failed. Such
    a doubt now waits for the transaction (not ended either: another role's). Ids of another
    history (in this server's future or distant past), their backend gone: decided by keys."""
    settings = settings_factory(spool_dir=tmp_path / "spool", worker=0,
                                trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    identity = ("SELECT pg_current_xact_id()::text AS xid, pg_backend_pid() AS pid, "
                "(SELECT backend_start::text FROM pg_stat_activity "
                "WHERE pid = pg_backend_pid()) AS at")
    finished = await service_connection.fetchrow(identity)  # its own transaction: committed
    assert finished is not None
    own = service_connection.transaction()
    await own.start()
    running = await service_connection.fetchrow(identity)  # in progress, with an xid
    stranger = admin.transaction()
    await stranger.start()
    superuser = await admin.fetchrow(identity)
    assert running is not None
    assert superuser is not None
    doubts = [  # (portal, transaction)
        ("reused", [finished["xid"], running["pid"], running["at"]]),
        ("restarted", [running["xid"], running["pid"], "2000-01-01 00:00:00+00"]),
        ("foreign", [superuser["xid"], superuser["pid"], superuser["at"]]),
        # another history's ids: this server's future (pg_xact_status raises), its distant
        # past (NULL once pg_xact is truncated; here: long over)
        ("future", [str(1 << 62), running["pid"], "2000-01-01 00:00:00+00"]),
        ("ancient", ["3", running["pid"], "2000-01-01 00:00:00+00"]),
    ]
    with (settings.trust_dir / "journal.log").open("ab") as handle:
        for number, (portal, txn) in enumerate(doubts):
            handle.write(orjson.dumps({"doubt": [[portal, f"{number:064x}"]], "worker": 9,
                                       "txn": txn, "at": 1}) + b"\n")
    assert client.app is not None
    remaining = await client.app[OFFLINE].settle_doubts(client.app[STORE])
    # the superuser's transaction is in progress and its backend out of the service role's
    # sight: not known to be over, so not decided (and not ended: another role's)
    assert remaining == frozenset({"foreign"})
    assert await service_connection.fetchval("SELECT pg_current_xact_id()::text") == \
        running["xid"]  # still in the same transaction: not terminated
    assert await admin.fetchval("SELECT 1") == 1
    await stranger.rollback()
    await own.rollback()


async def test_two_settlers_and_the_drain_at_once_settle_a_doubt_once(
    make_client: ClientFactory, outage: Any, database: Database, tmp_path: Path, admin: Admin,
) -> None:
    """Tried (it holds): worker 0's uninstall given up on mid-COMMIT, which then landed; two
    other workers settle the doubt at the same moment as worker 0, reconnected, drains its
    batch. The uninstall is stored once, its journal entry settled once, its trust change
    shared at most once, the doubt resolved — and every worker judges the portal ended."""
    relay, settings_for = outage
    settings = settings_for(worker=0, append_timeout_seconds=0.5, trust_refresh_seconds=3600)
    cut_off: Client = await make_client(settings)
    await install_sample_portal(cut_off)
    await uninstall_landed_after_cut(cut_off, relay, admin)
    pool = await create_pool(database.service_dsn, size=4)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
        settlers = [_Worker(pool, settings.trust_dir, number=n).offline for n in (1, 2)]
        for settler in settlers:
            await settler.start(store)
        await relay.start()
        remaining = await asyncio.gather(*(s.settle_doubts(store) for s in settlers),
                                         drained(cut_off))
        assert remaining[:2] == [frozenset(), frozenset()]
    finally:
        await pool.close()
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]
    with (settings.trust_dir / "journal.log").open("rb") as handle:
        records = [orjson.loads(line) for line in handle.read().splitlines()]
        journal = _read(handle)
    assert not journal.doubts
    spooled_entries = [r for r in records if r.get("cause")]
    assert len(spooled_entries) == 1, records
    uninstall = spooled_entries[0]
    assert [r["settled"] for r in records if "settled" in r].count(uninstall["seq"]) == 1
    shared = [r for r in records if r.get("stored") and r["stored"][0] == uninstall["cause"]]
    assert len(shared) <= 1, records
    assert cut_off.app is not None
    for settler in [*settlers, cut_off.app[OFFLINE]]:
        facts, _ = await asyncio.to_thread(settler.view)
        assert facts.portals[MEMBER_ID].state == TrustState.ENDED


async def test_a_settle_cut_off_midway_leaves_the_doubt_whole(
    make_client: ClientFactory, outage: Any, admin: Admin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tried (it holds): worker 0 settles its own doubt (a COMMIT stalled for good), ends the
    stalled transaction, and loses PostgreSQL before it reads what was stored: the settle
    raises DatabaseUnavailable and the journal is as it was (the doubt whole, nothing
    settled); back online, it is settled and the uninstall is stored once."""
    relay, settings_for = outage
    settings = settings_for(worker=0, append_timeout_seconds=0.5, trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    assert client.app is not None
    offline, store = client.app[OFFLINE], client.app[STORE]
    journal = settings.trust_dir / "journal.log"
    asked = 0
    original = EventStore._transaction_over

    async def flapping(connection: Any, transaction: Any) -> bool:
        nonlocal asked
        asked += 1
        if asked == 2:  # after the stalled transaction was ended
            await relay.cut()
        return await original(connection, transaction)

    async with commits_stalled(admin):
        await spooled(client, sample("onappuninstall-1"))
        assert await committing(admin)
        before = journal.read_bytes()
        with journal.open("rb") as handle:
            (doubtful,) = {t for t in _read(handle).doubts.values() if t is not None}
        monkeypatch.setattr(EventStore, "_transaction_over", staticmethod(flapping))
        with pytest.raises(DatabaseUnavailable):
            await offline.settle_doubts(store)
        # ended, not committed (the COMMIT stalled now is the drain's, let through by it)
        assert await admin.fetchval("SELECT pg_xact_status($1::text::xid8)",
                                    str(doubtful.xid)) == "aborted"
        assert journal.read_bytes() == before
        monkeypatch.undo()
    await relay.start()
    assert await offline.settle_doubts(store) == frozenset()
    await drained(client)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]


async def test_a_share_torn_by_a_crash_holds_nobody_back(
    make_client: ClientFactory, settings_factory: Any, tmp_path: Path, admin: Admin,
) -> None:
    """A committed trust change is shared as two lines in one write: the entry, then its
    settlement. A crash mid-write (a power loss, a `kill -9` at a page boundary) kept the
    entry and tore the settlement, which the next write cut off: an entry of worker 1 that
    no spool stands for, open for good — worker 0 spooled every install and uninstall of the
    portal behind it (202 instead of stored) and could never drain them, and the journal was
    never emptied again. Such an entry (a shared commit, never spooled) without its
    settlement is passed over: its change is in PostgreSQL, which the next refresh reads."""
    settings = settings_factory(spool_dir=tmp_path / "spool", worker=0,
                                trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    with (settings.trust_dir / "journal.log").open("ab") as handle:
        handle.write(orjson.dumps({
            "seq": 7, "worker": 1, "member_id": MEMBER_ID, "cause": "",
            "effect": {"change": "allowed", "member_id": MEMBER_ID}}) + b"\n"
            + b'{"settled":7,"posi')
    status, answer = await post(client, sample("onappuninstall-1"))
    assert status == 200, answer
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]
