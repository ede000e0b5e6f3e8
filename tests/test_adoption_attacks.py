"""Attacks on spool adoption, the settling of lost spool records and the bounded journal wait.

Each test here names what it attacks; the ones that found a defect fail without its fix (the
docstring says what they saw), the others show that what they attack holds.
Worker 1 reaches PostgreSQL through a relay the tests cut, unless said otherwise.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import offline as offline_module
from ledger.offline import OfflineTrust
from ledger.spool import _HEADER, MAGIC, Spool, undrained
from ledger.web import ADOPTER, OFFLINE
from tests.conftest import ClientFactory, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, drained, install_sample_portal
from tests.test_spool_adoption import open_entries
from tests.test_trust_outage import spooled, stored_types

Admin: TypeAlias = "asyncpg.Connection[Any]"


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
    assert len(open_entries(settings)) == 1

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
