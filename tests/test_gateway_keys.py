"""Gateway mode: the outbox key and the forwarder's fairness. A lost or rotated key never
leaves forwards unreadable for good nor stops other outboxes; one flooding portal never gets
another's forwards given up; forwards waiting for an unknown route are counted and settled."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest
from prometheus_client import generate_latest

from ledger.errors import OutboxError
from ledger.gateway.forwarder import outbox_key
from ledger.gateway.outbox import KEY_NAME, OutboxReader, OutboxWriter, frames
from ledger.settings import Settings
from tests.conftest import MEMBER_ID, ClientFactory, Database
from tests.gateway_helpers import Destination, Forwarders, eventually
from tests.test_gateway import outbox_record, readiness, routed_client

Admin: TypeAlias = "asyncpg.Connection[Any]"
OTHER_PORTAL = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def destination() -> AsyncIterator[Destination]:
    dest = Destination()
    await dest.start()
    yield dest
    await dest.stop()


@pytest.fixture
async def forwarders(make_client: ClientFactory) -> AsyncIterator[Forwarders]:
    running = Forwarders()
    yield running
    await running.close()


@pytest.fixture
def gateway_settings(settings_factory: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return settings_factory(**({
            "forward_plain_http_hosts": "127.0.0.1", "forward_retry_initial_seconds": 0.02,
            "forward_retry_max_seconds": 0.1, "forward_poll_seconds": 0.01,
            "forward_status_seconds": 0.05,
        } | overrides))

    return make


def sealed(directory: Path, key: bytes, route_id: str, *positions: int) -> None:
    writer = OutboxWriter(directory, key)
    writer.append([outbox_record(route_id, p) for p in positions])
    writer.close()


async def forwards_recorded(database: Database) -> int:
    """Rows in audit.forwards, read as the admin."""
    connection = await asyncpg.connect(database.admin_dsn)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM audit.forwards"))
    finally:
        await connection.close()


def test_a_lost_key_is_never_replaced_while_the_outbox_holds_records(
    database: Database, settings_factory: Callable[..., Settings],
) -> None:
    """Found last session: a lost `keys/outbox.key` made the next start create a new key
    silently, and the forwarder then refused every old record at each restart, forever."""
    settings = settings_factory()
    key = outbox_key(settings)
    sealed(settings.outbox_root / "worker-0", key, "rt_a", 1, 2)
    (settings.keys_dir / KEY_NAME).unlink()  # lost
    with pytest.raises(OutboxError) as refused:
        outbox_key(settings)
    assert "--give-up-unreadable" in str(refused.value)
    assert "restore the key file" in str(refused.value).lower()
    assert not (settings.keys_dir / KEY_NAME).exists()  # none made behind the operator's back
    from tests.test_cli import run

    served = run(database, "serve")  # refused in one line, before anything starts
    assert served.exit_code == 1
    assert "is missing, but 1 outbox segment(s)" in served.output
    assert not (settings.keys_dir / KEY_NAME).exists()
    empty = settings_factory(outbox_dir=settings.data_dir / "elsewhere")
    assert len(outbox_key(empty)) == 32  # an outbox with nothing sealed: a key is made


def test_a_rotated_key_still_opens_what_it_sealed(
    settings_factory: Callable[..., Settings],
) -> None:
    from click.testing import CliRunner

    from ledger.cli.app import main
    from ledger.gateway.forwarder import outbox_keys

    settings = settings_factory()
    old = outbox_key(settings)
    sealed(settings.outbox_root / "worker-0", old, "rt_a", 1)
    rotated = CliRunner().invoke(main, ["forward", "--rotate-key"])
    assert rotated.exit_code == 0, rotated.output
    new, retired = outbox_keys(settings)
    assert new != old
    assert retired == [old]
    assert (settings.keys_dir / KEY_NAME).stat().st_mode & 0o777 == 0o600
    (kept,) = settings.keys_dir.glob("outbox-retired-*.key")
    assert kept.stat().st_mode & 0o777 == 0o400  # read only
    sealed(settings.outbox_root / "worker-0", new, "rt_a", 2)
    reader = OutboxReader(settings.outbox_root / "worker-0", new, retired=retired)
    reader.open()
    assert [r.body for r in reader.poll()] == [b"n=1", b"n=2"]
    assert reader.unreadable == {}
    reader.close()


async def test_an_outbox_under_another_key_stops_only_itself_and_is_reported(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found last session: one directory under another key raised out of the forwarder's
    poll, so no directory forwarded at all. Now it is set aside and reported (/readyz, a
    metric, one log line saying what to do); the others keep forwarding."""
    settings = gateway_settings()
    key = outbox_key(settings)
    client, forwarder, route_id = await routed_client(
        make_client, forwarders, settings, destination.url)
    foreign_key = os.urandom(32)
    await asyncio.to_thread(sealed, settings.outbox_root / "worker-7", foreign_key, route_id, 5)
    await asyncio.to_thread(sealed, settings.outbox_root / "worker-8", key, route_id, 6, 7)
    await destination.wait_until(lambda d: len(d.delivered) == 2)
    assert [r.body for r in destination.delivered] == [b"n=6", b"n=7"]
    await eventually(lambda: "worker-7" in forwarder.unreadable)
    await asyncio.to_thread(sealed, settings.outbox_root / "worker-8", key, route_id, 8)
    await destination.wait_until(lambda d: len(d.delivered) == 3)  # and it goes on
    metrics = generate_latest(forwarder.registry).decode()
    assert 'ledger_forward_outbox_unreadable{directory="worker-7"} 1.0' in metrics
    forwarder.publish()
    _, ready = await readiness(client)
    assert set(ready["forwarder"]["unreadable_outboxes"]) == {"worker-7"}
    assert "--give-up-unreadable" in ready["forwarder"]["unreadable_outboxes"]["worker-7"]
    said = [r for r in caplog.records if "worker-7" in r.getMessage()
            and "sealed under a key" in r.getMessage()]
    assert len(said) == 1  # once, not at every poll
    assert foreign_key.hex() not in caplog.text


def test_forwards_no_key_opens_are_given_up_on_record_and_set_aside(
    database: Database, settings_factory: Callable[..., Settings],
) -> None:
    """`ledger forward --give-up-unreadable --yes`: the operator's way out when the key is
    gone for good. Each record no key opens is recorded as given up (`outbox_key_lost`), the
    segments are moved aside, and the next start makes a new key."""
    from tests.test_cli import run

    settings = settings_factory()
    key = outbox_key(settings)
    sealed(settings.outbox_root / "worker-0", key, "rt_a", 1, 2, 3)
    (settings.keys_dir / KEY_NAME).unlink()
    listed = run(database, "forward", "--give-up-unreadable")
    assert listed.exit_code == 0, listed.output
    assert "3 record(s)" in listed.output
    assert "--yes" in listed.output
    assert list((settings.outbox_root / "worker-0").glob("seg-*"))  # nothing changed
    done = run(database, "forward", "--give-up-unreadable", "--yes")
    assert done.exit_code == 0, done.output
    async def forwards() -> list[Any]:
        connection = await asyncpg.connect(database.admin_dsn)
        try:
            return list(await connection.fetch(
                "SELECT route_id, outcome, error, position FROM audit.forwards"))
        finally:
            await connection.close()

    rows = asyncio.run(forwards())
    assert [tuple(r) for r in rows] == [("unknown", "given_up", "outbox_key_lost", None)] * 3
    assert not list((settings.outbox_root / "worker-0").glob("seg-*"))
    assert list((settings.outbox_root / "given-up" / "worker-0").glob("seg-*"))
    assert len(outbox_key(settings)) == 32  # nothing unreadable left: a new key


def test_forwards_are_never_given_up_from_under_a_running_writer(
    database: Database, settings_factory: Callable[..., Settings],
) -> None:
    """Found by breakgw2: `--give-up-unreadable --yes` with a `serve` still running (its key
    file deleted under it) counted the live segment's records, recorded them given up and
    renamed the file — while the writer, whose descriptor follows the rename, went on
    appending to it: each forward sealed after the count was stored, never forwarded and
    recorded nowhere (and those already forwarded were recorded given up as well). Now it
    refuses, changing nothing, while a writer of such a directory (or a forwarder) runs."""
    from tests.test_cli import run

    settings = settings_factory()
    key = outbox_key(settings)
    writer = OutboxWriter(settings.outbox_root / "worker-0", key)  # a running intake
    try:
        writer.append([outbox_record("rt_a", 1)])
        (settings.keys_dir / KEY_NAME).unlink()
        done = run(database, "forward", "--give-up-unreadable", "--yes")
        writer.append([outbox_record("rt_a", 2)])  # sealed after the count
    finally:
        writer.close()
    assert done.exit_code == 1, done.output
    assert "worker-0" in done.output
    assert "Stop `ledger serve`" in done.output
    assert not (settings.outbox_root / "given-up").exists()
    (segment,) = (settings.outbox_root / "worker-0").glob("seg-*")
    assert len(frames(segment)) == 2  # both still where the forwarder reads them

    assert asyncio.run(forwards_recorded(database)) == 0


def test_the_key_file_still_opens_what_it_sealed_once_outbox_key_overrides_it(
    settings_factory: Callable[..., Settings],
) -> None:
    """Found by breakgw2: setting LEDGER_OUTBOX_KEY (a move to a secret store) over an
    existing keys/outbox.key left every record that file sealed unreadable — set aside, and
    listed by `--give-up-unreadable` for giving up — with its key beside them."""
    import base64

    from ledger.gateway.forwarder import outbox_keys, unreadable_outbox

    settings = settings_factory()
    file_key = outbox_key(settings)
    sealed(settings.outbox_root / "worker-0", file_key, "rt_a", 1)
    configured = settings_factory(outbox_key=base64.b64encode(os.urandom(32)).decode())
    key, retired = outbox_keys(configured)
    assert key != file_key
    assert file_key in retired
    assert unreadable_outbox(configured) == []
    reader = OutboxReader(settings.outbox_root / "worker-0", key, retired=retired)
    reader.open()
    assert [r.body for r in reader.poll()] == [b"n=1"]
    assert reader.unreadable == {}
    reader.close()
    (settings.keys_dir / KEY_NAME).write_text("not a key\n")  # garbage beside the setting
    assert outbox_keys(configured)[0] == key


def test_giving_up_interrupted_midway_records_each_forward_once(
    database: Database, settings_factory: Callable[..., Settings],
) -> None:
    """Found by breakgw2: `--give-up-unreadable --yes` interrupted between recording a
    segment's forwards and moving it (a full disk, a kill) recorded them all again at the
    next run: each given up twice in audit.forwards."""
    from unittest import mock

    from tests.test_cli import run

    settings = settings_factory()
    key = outbox_key(settings)
    sealed(settings.outbox_root / "worker-0", key, "rt_a", 1, 2, 3)
    (settings.keys_dir / KEY_NAME).unlink()
    with mock.patch.object(Path, "rename", side_effect=OSError(28, "No space left")):
        interrupted = run(database, "forward", "--give-up-unreadable", "--yes")
    assert interrupted.exit_code != 0
    assert list((settings.outbox_root / "worker-0").glob("seg-*"))  # not moved
    done = run(database, "forward", "--give-up-unreadable", "--yes")
    assert done.exit_code == 0, done.output

    assert asyncio.run(forwards_recorded(database)) == 3


async def test_a_flooding_portal_never_gets_another_portals_forwards_given_up(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """Found last session: `LEDGER_FORWARD_MAX_PENDING` bounded a route as a whole, so one
    portal's flood got every other portal's forwards given up `backlog_full`. Now a portal
    under its share of the bound gets room from the one holding most."""
    settings = gateway_settings(forward_max_pending=6)
    destination.gate = asyncio.Event()  # the destination hangs: everything stays pending
    _, forwarder, route_id = await routed_client(
        make_client, forwarders, settings, destination.url)
    key = outbox_key(settings)

    def record(member_id: str, position: int) -> tuple[dict[str, Any], bytes]:
        header, body = outbox_record(route_id, position)
        return header | {"member_id": member_id}, body

    writer = OutboxWriter(settings.outbox_root / "worker-3", key)
    try:
        await asyncio.to_thread(writer.append, [record(MEMBER_ID, p) for p in range(1, 21)])
        await eventually(lambda: b'reason="backlog_full"' in generate_latest(forwarder.registry))
        await asyncio.to_thread(writer.append, [record(OTHER_PORTAL, p) for p in (21, 22)])
        lanes = forwarder._states[route_id].lanes
        await eventually(lambda: OTHER_PORTAL in lanes and len(lanes[OTHER_PORTAL].items) == 2)
        assert forwarder._states[route_id].pending <= 6
        destination.gate.set()
        await destination.wait_until(
            lambda d: {21, 22} <= {r.position for r in d.delivered})
        flooded = [r.position for r in destination.delivered if r.position and r.position <= 20]
        assert flooded == sorted(flooded)  # what the flooder kept went out in order
    finally:
        writer.close()


async def test_forwards_waiting_for_an_unknown_route_are_counted_and_given_up_once_too_old(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """Found last session: forwards for a route the forwarder did not know (yet) were missing
    from the backlog gauge, and while the routes could not be read they were kept past their
    age. Now they are counted, and given up (`expired`) like any forward that old."""
    from ledger.gateway.forwarder import _item

    settings = gateway_settings(forward_max_age_seconds=60.0)
    _, forwarder, _ = await routed_client(make_client, forwarders, settings, destination.url)
    reader = next(iter(forwarder._outboxes.values()), None) or OutboxReader(
        settings.outbox_path, outbox_key(settings))
    header, _ = outbox_record("rt_gone", 9)
    forwarder._park("rt_gone", _item(reader, (1, 0), header, None))
    assert forwarder.backlog()["rt_gone"][0] == 1
    assert 'ledger_forward_backlog{route="rt_gone"} 1.0' in generate_latest(
        forwarder.registry).decode()
    old = _item(reader, (1, 1), header | {"accepted_at": time.time() - 120}, None)
    forwarder._unrouted["rt_gone"].insert(0, old)
    forwarder._expire_parked()
    assert [i.accepted_at for i in forwarder._unrouted["rt_gone"]] == [header["accepted_at"]]
    assert b'reason="expired",route="rt_gone"' in generate_latest(forwarder.registry)
