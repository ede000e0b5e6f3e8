"""Never lose an acknowledged delivery: the outage spool, its format, and a real outage."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from ledger import drafts
from ledger.errors import SpoolFull
from ledger.models import EventDraft, RejectionDraft
from ledger.settings import Settings
from ledger.spool import Spool, decode, encode
from ledger.trust import TrustChange
from ledger.web import COMMITTER, SPOOL
from tests.conftest import ClientFactory, Database, sample
from tests.helpers import Client, SocketProxy, install_sample_portal, post
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


async def drained(client: Client) -> None:
    """Until the app's spool is empty — woken by each committed batch, bounded in time."""
    assert client.app is not None
    spool, committer = client.app[SPOOL], client.app[COMMITTER]
    async with asyncio.timeout(20):
        while spool.has_pending():
            committer.progressed.clear()
            await committer.progressed.wait()


@pytest.fixture
async def proxy(database: Database) -> Any:
    query = parse_qs(urlsplit(database.service_dsn).query)
    socket_dir, port = query["host"][0], int(query.get("port", ["5432"])[0])
    directory = tempfile.mkdtemp(prefix="pgproxy-")
    relay = SocketProxy(f"{socket_dir}/.s.PGSQL.{port}", directory, port)
    await relay.start()
    yield relay, database.service_dsn.replace(socket_dir, directory)
    if relay._server is not None:
        await relay.cut()


@pytest.fixture
def outage(proxy: Any, settings_factory: Any, tmp_path: Path) -> Any:
    """The relay, and settings for an app that reaches PostgreSQL only through it."""
    relay, dsn = proxy

    def settings(**extra: Any) -> Settings:
        made: Settings = settings_factory(database_url=dsn, spool_retry_seconds=0.1,
                                          spool_dir=tmp_path / "spool", **extra)
        return made

    return relay, settings


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
