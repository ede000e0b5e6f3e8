"""Attacks on lifecycle-doubt settlement and the offline trust journal (breaksettle).

The journal (`<trust_dir>/journal.log`) is read by every worker before every offline judgement,
every online append that may wait on another worker, every drain and every settlement: a line
there that is not what this version writes must cost nothing but that line, and the lines of
deliveries that change no trust must not outlive them. A doubt is settled by keys whichever
worker settles it, and one doubt PostgreSQL cannot answer must not keep the others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger.offline import _read
from ledger.web import OFFLINE, STORE
from tests.conftest import ClientFactory, sample
from tests.helpers import Client, drained, install_sample_portal, post
from tests.test_intake import forge
from tests.test_trust_outage import spooled, stored_types

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
    forged install, for good, and every worker read it whole at every change. Now a journal
    that holds only resolved intents is emptied as any settled one."""
    settings = settings_factory(spool_dir=tmp_path / "spool", worker=0,
                                trust_refresh_seconds=3600)
    client: Client = await make_client(settings)
    for number in range(5):
        status, answer = await post(client, forge("onappinstall-1", member_id=f"{number:032x}"))
        assert status == 403, answer
    journal = settings.trust_dir / "journal.log"
    assert len(journal.read_bytes().splitlines()) == 10
    assert client.app is not None
    await client.app[OFFLINE].refresh(client.app[STORE])  # a periodic refresh
    assert len(journal.read_bytes().splitlines()) <= 1
    with journal.open("rb") as handle:
        assert not _read(handle).doubts
