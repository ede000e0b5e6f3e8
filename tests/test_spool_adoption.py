"""A spool whose worker number no process runs is adopted and drained by a running worker.

A worker's spool used to be drained only by a worker of the same number: after `serve --workers`
was lowered (or a worker number stopped running for any reason) the deliveries it had answered
202 stayed in a spool nobody drained — acknowledged, never stored. Now every worker adopts, one
pass at a time under the spool's lock, the spools no process holds (`ledger.adoption`), drains
them as their own worker would (journal order, that worker's entries and doubts settled), and
reports them (/readyz, `ledger_spool_absent_bytes`) until they are empty. Also here: a spooled
lifecycle entry whose record is set aside unread is settled (it stayed provisional for good), and
a thread waiting on the journal's lock gives up at a bound (a stalled holder kept it for ever).
Worker 1 reaches PostgreSQL through a relay the tests cut, unless said otherwise.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import zlib
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest

from ledger import offline as offline_module
from ledger.errors import SpoolBusy
from ledger.offline import _read
from ledger.settings import Settings
from ledger.spool import _HEADER, MAGIC, claim_own, undrained
from ledger.web import ADOPTER, OFFLINE, SPOOL
from tests.conftest import MEMBER_ID, ClientFactory, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, drained, install_sample_portal, post
from tests.test_offline_doubt import no_doubt
from tests.test_trust_outage import spooled, stored_types

Admin: TypeAlias = "asyncpg.Connection[Any]"


def journal_of(settings: Settings) -> Any:
    with (settings.trust_dir / "journal.log").open("rb") as handle:
        return _read(handle)


def open_entries(settings: Settings) -> list[Any]:
    journal = journal_of(settings)
    return [e for e in journal.entries if e.seq not in journal.settled]


async def test_a_spool_whose_worker_no_longer_runs_is_adopted_drained_and_reported(
    make_client: ClientFactory, outage: Any, admin: Admin,
) -> None:
    """Worker 1, cut off, spools a delivery and an uninstall (a journal entry of its own, and
    a doubt about it as a version before the intent recorded one: no transaction) and stops —
    `serve --workers 1` from now on. Worker 0 starts while PostgreSQL is still away: it keeps
    what it has, and reports worker 1's spool absent. Once PostgreSQL is back it drains that
    spool, settles worker 1's entry and its doubt, and the report empties."""
    relay, settings_for = outage
    gone_settings = settings_for(worker=1, trust_refresh_seconds=3600)
    gone: Client = await make_client(gone_settings)
    await install_sample_portal(gone)
    await relay.cut()
    await spooled(gone, sample("onimbotjoinchat-1"))
    await spooled(gone, sample("onappuninstall-1"))
    (entry,) = open_entries(gone_settings)
    with (gone_settings.trust_dir / "journal.log").open("ab") as handle:  # an older version's
        handle.write(orjson.dumps({"doubt": [[MEMBER_ID, entry.cause]], "worker": 1,
                                   "at": time.time()}) + b"\n")
    assert not no_doubt(gone_settings)
    await gone.close()
    directory = gone_settings.spool_path
    assert undrained(directory)[0] > 0

    staying: Client = await make_client(settings_for(worker=0, trust_refresh_seconds=3600))
    assert staying.app is not None
    adopter = staying.app[ADOPTER]
    await adopter.look()  # PostgreSQL away: a pass drains nothing, loses nothing
    assert undrained(directory)[0] > 0
    assert [(a.worker, a.bytes > 0) for a in adopter.absent.values()] == [(1, True)]
    ready = await (await staying.get("/readyz")).json()
    (absent,) = ready["spool"]["absent_workers"]
    assert absent["worker"] == 1
    assert absent["bytes"] > 0
    assert absent["oldest_seconds"] >= 0
    scraped = await (await staying.get("/metrics")).text()
    assert f"ledger_spool_absent_bytes {float(absent['bytes'])}" in scraped

    await relay.start()
    await eventually(lambda: undrained(directory)[0] == 0)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT", "ONAPPUNINSTALL"]
    assert no_doubt(gone_settings)  # an older version's doubt, settled by the adoption
    assert open_entries(gone_settings) == []
    await eventually(lambda: adopter.absent == {})
    ready = await (await staying.get("/readyz")).json()
    assert ready["spool"]["absent_workers"] == []


async def test_a_running_workers_spool_is_left_to_it_and_a_returning_one_drains_nothing_twice(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin,
) -> None:
    """Worker 1 is cut off with deliveries spooled; worker 0 reaches PostgreSQL. While worker 1
    runs its spool is its own: worker 0 neither drains nor reports it. Worker 1 stops: worker 0
    drains it. Worker 1 comes back (its spool's lock is free again): nothing left to drain, and
    nothing is stored twice. One process at a time holds a spool: a second one waiting for it
    gives up with a message saying what to stop."""
    relay, settings_for = outage
    cut_settings = settings_for(worker=1, trust_refresh_seconds=3600)
    cut_off: Client = await make_client(cut_settings)
    online: Client = await make_client(settings_factory(
        spool_retry_seconds=3600, spool_dir=tmp_path / "spool", worker=0,
        trust_refresh_seconds=3600))
    assert online.app is not None
    await install_sample_portal(online)
    await relay.cut()
    for name in ("onimbotjoinchat-1", "onimbotmessageadd-1"):
        await spooled(cut_off, sample(name))
    directory = cut_settings.spool_path
    pending = undrained(directory)[0]
    adopter = online.app[ADOPTER]
    await adopter.look()
    assert adopter.absent == {}
    assert undrained(directory)[0] == pending  # not drained behind its worker's back
    with pytest.raises(SpoolBusy, match="second `ledger serve`"):
        await claim_own(directory, worker=1, seconds=0.2)

    await cut_off.close()
    await adopter.look()
    assert undrained(directory)[0] == 0
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT", "ONIMBOTMESSAGEADD"]

    await relay.start()
    back: Client = await make_client(cut_settings)
    assert back.app is not None
    assert not back.app[SPOOL].has_pending()
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 0
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONIMBOTJOINCHAT", "ONIMBOTMESSAGEADD"]


async def test_a_spooled_uninstall_set_aside_unread_is_no_longer_provisional(
    make_client: ClientFactory, outage: Any,
) -> None:
    """A spooled record that cannot be read back is set aside for an operator; its journal
    entry (an uninstall's) stayed open — the portal provisional, judged offline on an
    uninstall PostgreSQL never got — for good. It is settled as refused now."""
    relay, settings_for = outage
    settings = settings_for(worker=0, trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    assert client.app is not None
    await install_sample_portal(client)
    await relay.cut()
    await spooled(client, sample("onappuninstall-1"))
    assert [e.member_id for e in open_entries(settings)] == [MEMBER_ID]
    log_path = settings.spool_path / "spool.log"
    record = log_path.read_bytes()
    _, length, _ = _HEADER.unpack(record[:_HEADER.size])
    assert len(record) == _HEADER.size + length  # the one record
    body = orjson.dumps({"v": 99, "kind": "event"}).ljust(length)  # intact, not readable here
    log_path.write_bytes(_HEADER.pack(MAGIC, length, zlib.crc32(body)) + body)

    await relay.start()
    await drained(client)
    assert list(settings.spool_path.glob("spool.refused-*"))
    assert open_entries(settings) == []
    assert client.app[OFFLINE].view()[1] == set()  # not provisional


async def test_a_thread_waiting_on_a_stalled_journal_holder_gives_up_as_an_outage(
    make_client: ClientFactory, outage: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process holds the trust journal and stalls (stopped, a hung disk). Every wait
    for it was a blocking `flock` in a thread: an uninstall's append waited without end, and
    each one given up on left a thread behind. The wait is bounded now, and ends as an outage
    would: the delivery is answered 503 (not taken), the thread is gone, and once the holder
    lets go the next delivery is stored."""
    monkeypatch.setattr(offline_module, "LOCK_WAIT_SECONDS", 0.3)
    _, settings_for = outage
    settings = settings_for(worker=0, trust_refresh_seconds=3600, append_timeout_seconds=5)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    fd = os.open(settings.trust_dir / "journal.log", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the stalled holder
    try:
        for _ in range(3):
            status, answer = await asyncio.wait_for(post(client, sample("onappuninstall-1")), 10)
            assert (status, answer.get("error")) == (503, "lock_wait_timeout"), answer
    finally:
        os.close(fd)
    status, answer = await post(client, sample("onappuninstall-1"))
    assert status == 200, answer
