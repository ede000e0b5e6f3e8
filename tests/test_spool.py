"""Never lose an acknowledged delivery: the outage spool, its format, and a real outage."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest

from ledger import drafts
from ledger.errors import SpoolFull, SpoolUnwritable
from ledger.models import EventDraft, RejectionDraft
from ledger.spool import Spool, any_pending, decode, encode
from ledger.trust import TrustChange
from tests.conftest import ClientFactory, Database, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, Disk, drained, install_sample_portal, post
from tests.test_intake import forge

Admin: TypeAlias = "asyncpg.Connection[Any]"


def some_drafts(count: int) -> list[EventDraft | RejectionDraft]:
    now = datetime.now(UTC)
    made: list[EventDraft | RejectionDraft] = [
        drafts.operator_action(TrustChange.PROVISIONED, member_id=f"m{i}", domain="d.example",
                               token="t" * 32, actor="test", received_at=now)
        for i in range(count)
    ]
    made.append(drafts.rejection_draft(
        received_at=now, status=401, reason="missing_auth", detail="x", peer="1.2.3.4",
        content_type="text/plain", body=b"a=1", claim=drafts.claim_of_text(b"a=1", 100),
    ))
    return made


def test_drafts_survive_the_spool_format_unchanged() -> None:
    for draft in some_drafts(2):
        assert decode(encode(draft)) == draft


def test_records_are_durable_and_drained_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    written = some_drafts(5)
    spool.append(written[:3])
    spool.append(written[3:])
    first = spool.read(2)
    assert first.drafts == written[:2]
    spool.mark_drained(first)
    reopened = Spool(tmp_path, max_bytes=1 << 20)  # as after a restart
    assert reopened.read(100).drafts == written[2:]
    reopened.mark_drained(reopened.read(100))
    assert not Spool(tmp_path, max_bytes=1 << 20).has_pending()


def test_any_pending_sees_every_workers_spool_also_a_stopped_ones(tmp_path: Path) -> None:
    """What the offline trust journal's compaction asks (a dead worker's spool may hold drafts
    that depend on its entries): read from the files alone, partly drained counts as pending."""
    assert not any_pending(tmp_path)
    Spool(tmp_path / "worker-0", max_bytes=1 << 20)  # empty
    spool = Spool(tmp_path / "worker-1", max_bytes=1 << 20)
    spool.append(some_drafts(3))
    del spool  # stopped: only its files are left
    assert any_pending(tmp_path)
    reopened = Spool(tmp_path / "worker-1", max_bytes=1 << 20)
    reopened.mark_drained(reopened.read(2))
    assert any_pending(tmp_path)
    reopened.mark_drained(reopened.read(100))
    assert not any_pending(tmp_path)


def test_a_torn_tail_is_set_aside_and_reported_never_stored(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    written = some_drafts(3)
    spool.append(written)
    log = tmp_path / "spool.log"
    log.write_bytes(log.read_bytes()[:-7])  # power loss in the middle of the last record
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.read(100).drafts == written[:-1]
    (aside,) = reopened.corrupt_found
    assert aside.exists()
    assert aside.stat().st_size > 0


def test_a_full_spool_refuses_instead_of_growing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2048)
    with pytest.raises(SpoolFull, match="LEDGER_SPOOL_MAX_BYTES"):
        spool.append(some_drafts(20))
    assert not spool.has_pending()


async def test_an_outage_loses_no_acknowledged_delivery(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    relay, settings_for = outage
    settings = settings_for()
    client: Client = await make_client(settings)
    await install_sample_portal(client)

    await relay.cut()  # PostgreSQL is gone
    outage_started = datetime.now(UTC)
    spooled = []
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotmessageadd-1"]:
        status, answer = await post(client, sample(name))
        assert (status, answer["status"]) == (202, "spooled")
        spooled.append(answer)
    status, answer = await post(client, forge("onimbotdelete-1", application_token="0" * 32))
    assert (status, answer["error"]) == (401, "invalid_application_token")  # cached trust
    ready = await (await client.get("/readyz")).json()
    assert ready["spool"]["records"] == 4  # three deliveries and one rejection record

    restored_at = datetime.now(UTC)
    await relay.start()  # PostgreSQL is back
    await drained(client)

    rows = await admin.fetch(
        "SELECT event_type, received_at FROM ledger.events WHERE origin = 'bitrix24' "
        "AND received_at >= $1 ORDER BY position", outage_started,
    )
    assert [r["event_type"] for r in rows] == ["ONIMBOTJOINCHAT", "ONIMBOTMESSAGEADD"]
    assert all(r["received_at"] < restored_at for r in rows)  # when received, not drained
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 1
    assert await admin.fetchval(
        "SELECT reason FROM ledger.rejections ORDER BY position DESC LIMIT 1"
    ) == "invalid_application_token"
    positions = [r["position"] for r in await admin.fetch(
        "SELECT position FROM ledger.events ORDER BY position")]
    assert positions == list(range(1, len(positions) + 1))
    status, answer = await post(client, sample("onimbotmessageadd-2"))
    assert (status, answer["status"]) == (200, "stored")  # straight to PostgreSQL again


def test_spooled_received_at_is_the_original(tmp_path: Path) -> None:
    draft = some_drafts(1)[0]
    assert isinstance(draft, EventDraft)
    older = dataclasses.replace(draft, received_at=datetime(2026, 1, 1, tzinfo=UTC))
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([older])
    (back,) = spool.read(1).drafts
    assert back.received_at == datetime(2026, 1, 1, tzinfo=UTC)


def test_a_crash_between_truncation_and_marker_never_skips_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(some_drafts(2))
    (tmp_path / "drained").write_text("999999")  # a marker left past the end of the log
    (tmp_path / "spool.log").write_bytes(b"")
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    written = some_drafts(2)
    reopened.append(written)
    assert reopened.read(100).drafts == written


async def test_starting_while_postgresql_is_down_spools_with_the_saved_trust(
    make_client: ClientFactory, outage: Any, admin: Admin, tmp_path: Path
) -> None:
    relay, settings_for = outage
    settings = settings_for()
    first: Client = await make_client(settings)
    await install_sample_portal(first)  # the trust this process saw is saved beside the spool
    await first.close()

    await relay.cut()
    client: Client = await make_client(settings)  # a restart in the middle of the outage
    status, answer = await post(client, sample("onimbotjoinchat-1"))
    assert (status, answer["status"]) == (202, "spooled")
    status, answer = await post(client, forge("onimbotdelete-1", application_token="0" * 32))
    assert status == 401
    ready = await client.get("/readyz")
    assert ready.status == 503  # the database check fails, and says so

    await relay.start()
    await drained(client)
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE event_type = 'ONIMBOTJOINCHAT'"
    ) == 1
    assert (tmp_path / "spool" / "trust" / "snapshot.json").stat().st_mode & 0o777 == 0o600


async def test_a_backend_lost_during_the_start_up_schema_check_is_an_outage_not_an_exit(
    make_client: ClientFactory, outage: Any, admin: Admin, database: Database
) -> None:
    """A worker restarted (after a crash, or by `serve --workers`) while its backend is killed
    or PostgreSQL restarts must come up spooling: an exception here made the worker exit with
    an 'explained' failure, and `serve` then stopped every worker."""
    _, settings_for = outage
    settings = settings_for(connect_timeout_seconds=60)  # a loaded machine connects slowly
    first: Client = await make_client(settings)
    await install_sample_portal(first)
    await first.close()

    locker = await asyncpg.connect(database.admin_dsn)  # not `admin`: its transaction would
    lock = locker.transaction()                          # see pg_stat_activity frozen
    await lock.start()
    await locker.execute("LOCK TABLE public.alembic_version IN ACCESS EXCLUSIVE MODE")
    starting = asyncio.ensure_future(make_client(settings))
    try:
        await eventually(lambda: admin.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
            "application_name = 'ledger' AND wait_event_type = 'Lock'"))
    finally:
        await lock.rollback()
        await locker.close()
    client: Client = await starting
    status, answer = await post(client, sample("onimbotjoinchat-1"))
    assert status in (200, 202), answer
    await drained(client)
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE event_type = 'ONIMBOTJOINCHAT'"
    ) == 1


async def test_a_postgresql_too_slow_to_answer_is_an_outage_too(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    relay, settings_for = outage
    settings = settings_for(append_timeout_seconds=0.5)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    relay.stall()
    async with asyncio.timeout(10):
        status, answer = await post(client, sample("onimbotjoinchat-1"))
    assert (status, answer["status"]) == (202, "spooled")  # after the timeout, not a minute
    relay.resume()  # the stalled append may commit now; draining must not store it twice
    await drained(client)
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE event_type = 'ONIMBOTJOINCHAT'"
    ) == 1


# ---- a failed write is never acknowledged ---------------------------------------------------


def record_size(draft: EventDraft | RejectionDraft) -> int:
    return 12 + len(encode(draft))  # magic, length, CRC, body


def test_a_write_failing_at_any_byte_is_undone_refused_and_never_read_back(
    tmp_path: Path,
) -> None:
    first, failed, after = some_drafts(3)[:3]
    for short in (False, True):
        for fail_at in range(record_size(failed)):
            directory = tmp_path / f"{short}-{fail_at}"
            disk = Disk()
            spool = Spool(directory, max_bytes=1 << 20, files=disk.files())
            spool.append([first])
            disk.fail_at, disk.short = fail_at, short
            with pytest.raises(SpoolUnwritable):
                spool.append([failed])
            assert spool.health() is not None  # readiness says the last write failed
            disk.fail_at = None
            spool.append([after])  # the next acknowledged record
            assert spool.health() is None
            reopened = Spool(directory, max_bytes=1 << 20)  # a restart
            assert reopened.read(100).drafts == [first, after], (short, fail_at)
            assert reopened.corrupt_found == []  # nothing acknowledged was set aside


def test_a_failed_fsync_is_undone_and_refused(tmp_path: Path) -> None:
    first, failed, after = some_drafts(3)[:3]
    disk = Disk()
    spool = Spool(tmp_path, max_bytes=1 << 20, files=disk.files())
    spool.append([first])
    disk.fsync_fails = True
    with pytest.raises(SpoolUnwritable):
        spool.append([failed])
    disk.fsync_fails = False
    spool.append([after])
    assert Spool(tmp_path, max_bytes=1 << 20).read(100).drafts == [first, after]


def test_a_spool_whose_failed_write_cannot_be_undone_accepts_nothing_until_repaired(
    tmp_path: Path,
) -> None:
    first, failed, refused, after = some_drafts(4)[:4]
    disk = Disk()
    spool = Spool(tmp_path, max_bytes=1 << 20, files=disk.files())
    spool.append([first])
    disk.fail_at, disk.truncate_fails = 10, True
    with pytest.raises(SpoolUnwritable):
        spool.append([failed])
    disk.fail_at = None  # writing works again, truncating does not
    with pytest.raises(SpoolUnwritable, match="accepts nothing"):
        spool.append([refused])
    reason = spool.health()
    assert reason is not None
    assert "could not be truncated" in reason
    disk.truncate_fails = False  # repaired (space freed, disk fixed)
    assert spool.health() is None
    spool.append([after])
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.read(100).drafts == [first, after]
    assert reopened.corrupt_found == []


def test_spool_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        directory = tmp_path / "spool" / "worker-0"
        spool = Spool(directory, max_bytes=1 << 20)
        written = some_drafts(3)
        spool.append(written)
        spool.mark_drained(spool.read(1))
        spool.quarantine(spool.read(1), "test")
        log = directory / "spool.log"
        log.write_bytes(log.read_bytes()[:-5])  # a torn tail, set aside on the next start
        reopened = Spool(directory, max_bytes=1 << 20)
    finally:
        os.umask(previous)
    assert reopened.corrupt_found
    names = {p.name.split("-")[0] for p in directory.iterdir()}
    assert {"spool.log", "drained", "spool.refused", "spool.corrupt"} <= names
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (directory, directory.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


# ---- the record format -----------------------------------------------------------------------


def format_1(draft: EventDraft | RejectionDraft) -> bytes:
    """A record body exactly as the spool wrote it before records carried a version."""
    fields: dict[str, Any] = {"kind": "event" if isinstance(draft, EventDraft) else "rejection"}
    for f in dataclasses.fields(draft):
        value = getattr(draft, f.name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, TrustChange):
            value = value.value
        fields[f.name] = value
    return orjson.dumps(fields)


def test_records_written_before_the_upgrade_are_read_back_unchanged(tmp_path: Path) -> None:
    old = some_drafts(3)
    (tmp_path / "spool.log").write_bytes(b"".join(Spool._record(format_1(d)) for d in old))
    spool = Spool(tmp_path, max_bytes=1 << 20)
    new = some_drafts(1)
    spool.append(new)
    assert spool.read(100).drafts == [*old, *new]
    assert orjson.loads(encode(new[0]))["v"] == 3


def test_a_format_2_record_not_accepted_offline_is_never_stored_as_judged_offline() -> None:
    """Before format 3 the offline judge spooled deliveries it refused (judged on drain): such a
    record must not count as an offline acceptance (`OfflineTrust.held` looks at offline_seen)."""
    first = some_drafts(1)[0]
    assert isinstance(first, EventDraft)
    draft = dataclasses.replace(first, offline_seen=7)
    old = orjson.loads(encode(draft)) | {"v": 2}
    assert decode(orjson.dumps(old)) == dataclasses.replace(draft, offline_seen=None)
    accepted = dataclasses.replace(draft, offline_accepted=True)
    old = orjson.loads(encode(accepted)) | {"v": 2}
    assert decode(orjson.dumps(old)) == accepted  # accepted on settled trust: as it was
    assert decode(encode(draft)) == draft  # format 3: as written


def test_an_intact_record_of_an_unknown_format_is_set_aside_not_guessed_at(
    tmp_path: Path,
) -> None:
    draft, later = some_drafts(2)[:2]
    alien = orjson.loads(encode(draft)) | {"v": 99}
    (tmp_path / "spool.log").write_bytes(Spool._record(orjson.dumps(alien)))
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([later])
    pending = spool.read(100)
    assert pending.drafts == []
    assert pending.unreadable is not None
    aside = spool.quarantine(pending, pending.unreadable)
    assert orjson.loads(aside.read_bytes()[12:])["v"] == 99  # kept byte for byte
    assert spool.read(100).drafts == [later]
