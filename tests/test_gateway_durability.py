"""Gateway mode never loses a pending forward: the encrypted outbox, a PostgreSQL outage, and
`kill -9` of a real `ledger serve` — and no token is left anywhere but in the outbox, sealed."""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias
from unittest import mock

import aiohttp
import asyncpg
import pytest
from prometheus_client import generate_latest

from ledger import wire
from ledger.errors import DatabaseUnavailable
from ledger.gateway import admin as routes_admin
from ledger.gateway import status
from ledger.gateway.handoff import HANDOFF
from ledger.gateway.outbox import KEY_NAME, OutboxReader, OutboxWriter, load_key
from ledger.gateway.routes import Route
from ledger.identity import SECRET_KEYS
from ledger.operations import change_trust
from ledger.settings import Settings, TrustPolicy
from ledger.storage.store import EventStore, create_pool, on_this_machine
from ledger.trust import TrustChange
from ledger.web import INTAKE, STORE
from tests.conftest import FORM, MEMBER_ID, TOKEN, ClientFactory, Database, sample, sample_names
from tests.gateway_helpers import Destination, Forwarders, eventually
from tests.helpers import Client, distinct_messages, drained, install_sample_portal, post
from tests.servers import free_port
from tests.test_intake import _pg_dump

Admin: TypeAlias = "asyncpg.Connection[Any]"


def header(routes: list[str]) -> dict[str, Any]:
    return {"routes": routes, "member_id": "m", "event_type": "ONIMBOTMESSAGEADD",
            "position": 7, "event_hash": "ab", "dedup_key": "cd", "content_type": FORM,
            "raw_query": "", "accepted_at": 1.0}


def secrets_of_samples() -> set[bytes]:
    found: set[bytes] = {TOKEN.encode()}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.lower() in SECRET_KEYS and isinstance(value, str) and len(value) > 8:
                    found.add(value.encode())
                walk(value)

    for name in sample_names():
        walk(wire.parse_php_form(sample(name), max_fields=999, max_nesting=9))
    return found


def test_the_outbox_is_sealed_read_again_after_a_restart_and_deleted_once_settled(
    tmp_path: Path,
) -> None:
    key = load_key(tmp_path / "keys" / KEY_NAME, None)
    assert (tmp_path / "keys" / KEY_NAME).stat().st_mode & 0o777 == 0o600
    directory = tmp_path / "outbox"
    writer = OutboxWriter(directory, key)
    reader = OutboxReader(directory, key)
    reader.open()
    assert reader.poll() == []
    body = sample("onappinstall-1")
    writer.append([(header(["a", "b"]), body), (header(["a"]), b"x=1")])
    data = b"".join(p.read_bytes() for p in directory.glob("seg-*"))
    assert [s for s in secrets_of_samples() if s in data] == []
    assert b"ONAPPINSTALL" not in data  # nothing readable at all without the key
    first, second = reader.poll()
    assert (first.body, first.routes, second.routes) == (body, ["a", "b"], ["a"])
    assert reader.poll() == []  # read once
    reader.settle(first.location, "a", "delivered")
    reader.close()  # the forwarder process ends (or is killed after writing done.log)

    again = OutboxReader(directory, load_key(tmp_path / "keys" / KEY_NAME, None))
    again.open()
    found = again.poll()
    assert [(f.location, f.routes) for f in found] == [
        (first.location, ["b"]), (second.location, ["a"])]
    assert again.read(first.location) == body
    again.settle(first.location, "b", "given_up")
    again.settle(second.location, "a", "delivered")
    again.apply_settled()
    assert list(directory.glob("seg-*"))  # the writer's newest segment: kept while fresh
    writer.close()
    writer = OutboxWriter(directory, key)  # a restarted intake writes to a new segment
    writer.append([(header(["a"]), b"x=2")])
    (third,) = again.poll()
    assert third.body == b"x=2"
    again.apply_settled()
    assert len(list(directory.glob("seg-*"))) == 1  # the old one: nothing owed, deleted
    writer.close()
    again.close()


def test_a_segment_deleted_under_its_writer_loses_nothing(tmp_path: Path) -> None:
    """The forwarder deletes a settled segment its (live) writer was still appending to: the
    writer notices, starts a new one, and the record is read from there."""
    key = os.urandom(32)
    writer = OutboxWriter(tmp_path, key)
    reader = OutboxReader(tmp_path, key)
    reader.open()
    writer.append([(header(["a"]), b"x=1")])
    (first,) = reader.poll()
    reader.settle(first.location, "a", "delivered")
    with mock.patch("ledger.gateway.outbox.IDLE_SECONDS", 0.0):
        reader.apply_settled()
    assert list(tmp_path.glob("seg-*")) == []
    writer.append([(header(["a"]), b"x=2")])
    (second,) = reader.poll()
    assert second.body == b"x=2"
    assert second.location[0] > first.location[0]
    writer.close()
    reader.close()


@pytest.mark.parametrize("way", ["write_now", "write"])
@pytest.mark.parametrize("body_bytes", [2_000, 20_000], ids=["in-a-buffer", "past-a-buffer"])
def test_a_write_that_fails_part_way_leaves_the_outbox_readable_and_forwards_nothing_of_it(
    tmp_path: Path, way: str, body_bytes: int
) -> None:
    """The disk refuses a batch part-way (here EFBIG, from a file size limit; ENOSPC and EIO
    alike). The handoff records its forwards as lost; later batches go on. Before: a batch past
    the segment file's buffer left a torn frame between complete ones, and every later poll
    raised OutboxError (the writer's forwards stopped for good); a smaller one stayed in the
    buffer and was written, and forwarded, with the next batch."""
    key = os.urandom(32)
    writer = OutboxWriter(tmp_path, key)
    reader = OutboxReader(tmp_path, key)
    reader.open()

    def sealed(number: int) -> bytes:
        return writer.seal([({**header(["a"]), "n": number}, b"x" * body_bytes)])

    writer.write(sealed(1))
    (segment,) = tmp_path.glob("seg-*")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # CPython ignores SIGXFSZ: past the limit a write is cut short, then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size + 100, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            getattr(writer, way)(sealed(2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    if not writer.write_now(sealed(3)):
        writer.write(sealed(3))
    assert [r.header["n"] for r in reader.poll()] == [1, 3]
    writer.write(sealed(4))
    assert [r.header["n"] for r in reader.poll()] == [4]
    writer.close()
    reader.close()


def test_the_event_loop_writes_only_what_cannot_make_it_wait(tmp_path: Path) -> None:
    """`write_now` (the intake's loop) writes a batch only into an open segment nobody
    holds; otherwise it writes nothing and says so, and `write` (a thread) does: before the
    first segment, while the forwarder holds the segment's lock (to delete it), after the
    segment was deleted, while an fsync is under way."""
    key = os.urandom(32)
    writer = OutboxWriter(tmp_path, key)
    reader = OutboxReader(tmp_path, key)
    reader.open()

    def frames(body: bytes) -> bytes:
        return writer.seal([(header(["a"]), body)])

    assert not writer.write_now(frames(b"x=0"))  # no segment yet: it is made by `write`
    writer.write(frames(b"x=1"))
    assert writer.write_now(frames(b"x=2"))
    (segment,) = tmp_path.glob("seg-*")
    held = os.open(segment, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the reader does around deleting it
        assert not writer.write_now(frames(b"x=3"))
    finally:
        os.close(held)
    with writer._lock:  # as `sync` does around its fsync
        assert not writer.write_now(frames(b"x=4"))
    assert [f.body for f in reader.poll()] == [b"x=1", b"x=2"]  # nothing refused was written
    segment.unlink()  # as the reader deletes a settled segment
    assert not writer.write_now(frames(b"x=5"))
    writer.write(frames(b"x=6"))  # a new segment
    assert writer.write_now(frames(b"x=7"))
    assert [f.body for f in reader.poll()] == [b"x=6", b"x=7"]
    writer.close()
    reader.close()


def test_an_outbox_under_another_key_is_set_aside(tmp_path: Path) -> None:
    """Neither read on nor deleted (restore the key, or give it up: tests/test_gateway_keys);
    not raised either — that stopped every other outbox too."""
    writer = OutboxWriter(tmp_path, os.urandom(32))
    writer.append([(header(["a"]), b"x=1")])
    writer.close()
    reader = OutboxReader(tmp_path, os.urandom(32))
    reader.open()
    assert reader.poll() == []
    (segment,) = tmp_path.glob("seg-*")
    assert reader.unreadable == {int(segment.stem[4:]): segment.stat().st_size}
    assert not reader.settling
    reader.apply_settled()
    assert segment.exists()
    reader.close()


def test_a_damaged_record_is_skipped_and_the_records_around_it_still_forwarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """One record damaged on disk (a flipped bit) once stopped its outbox for good — and,
    raised out of the forwarder's poll, every other outbox too — under a message blaming the
    key. Only a record none of whose neighbours decrypts means another key."""
    key = os.urandom(32)
    writer = OutboxWriter(tmp_path, key)
    writer.append([(header(["a"]), b"x=1"), (header(["a"]), b"x=2"), (header(["a"]), b"x=3")])
    (segment,) = tmp_path.glob("seg-*")
    data = bytearray(segment.read_bytes())
    second = 8 + int.from_bytes(data[4:8], "big")
    data[second + 8 + 12 + 3] ^= 1  # in the second record's ciphertext
    segment.write_bytes(bytes(data))
    reader = OutboxReader(tmp_path, key)
    reader.open()
    assert [f.body for f in reader.poll()] == [b"x=1", b"x=3"]
    assert "does not decrypt while others do" in caplog.text
    writer.append([(header(["a"]), b"x=4")])
    assert [f.body for f in reader.poll()] == [b"x=4"]  # and the outbox goes on
    writer.close()
    reader.close()
    lone = tmp_path / "lone"
    writer = OutboxWriter(lone, os.urandom(32))
    writer.append([(header(["a"]), b"x=1"), (header(["a"]), b"x=2")])
    writer.close()
    reader = OutboxReader(lone, key)
    reader.open()
    assert reader.poll() == []  # none opens: another key, set aside
    assert len(reader.unreadable) == 1
    reader.close()


def test_damaged_framing_skips_only_up_to_the_next_record(tmp_path: Path) -> None:
    """Found by a break test: a damaged frame header (magic or length) in the middle of a
    segment was taken for a torn tail, and every acknowledged record after it in that segment
    was skipped unread. Records are authenticated, so reading resumes at the next one."""
    key = os.urandom(32)
    for damage in (slice(0, 4), slice(4, 8)):  # the magic, the length
        directory = tmp_path / str(damage.start)
        writer = OutboxWriter(directory, key)
        writer.append([(header(["a"]), b"x=1"), (header(["a"]), b"x=2"),
                       (header(["a"]), b"x=3")])
        (segment,) = directory.glob("seg-*")
        data = bytearray(segment.read_bytes())
        second = 8 + int.from_bytes(data[4:8], "big")
        data[second + damage.start : second + damage.stop] = b"\xff\xff\xff\x0f"
        segment.write_bytes(bytes(data))
        writer.close()
        restarted = OutboxWriter(directory, key)  # its writer moved on: no tail is coming
        restarted.append([(header(["a"]), b"x=4")])
        reader = OutboxReader(directory, key)
        reader.open()
        assert [f.body for f in reader.poll()] == [b"x=1", b"x=3", b"x=4"]
        restarted.close()
        reader.close()


def test_done_log_that_cannot_be_rewritten_once_is_written_down_after(tmp_path: Path) -> None:
    """Found by a break test: a failed rewrite of `done.log` (the disk full) left its handle
    closed, and every later `apply_settled` raised ValueError — out of the forwarder's poll,
    which then dropped each record it had read."""
    key = os.urandom(32)
    writer = OutboxWriter(tmp_path, key)
    writer.append([(header(["a"]), b"x=1")])
    writer.close()
    later = OutboxWriter(tmp_path, key)  # the first segment is no longer the newest
    later.append([(header(["a"]), b"x=2")])
    reader = OutboxReader(tmp_path, key)
    reader.open()
    first, second = reader.poll()
    (tmp_path / "done.tmp").mkdir()  # the rewrite cannot be written
    reader.settle(first.location, "a", "delivered")
    with pytest.raises(IsADirectoryError):
        reader.apply_settled()  # the first segment is deleted, done.log not rewritten
    (tmp_path / "done.tmp").rmdir()
    reader.settle(second.location, "a", "delivered")
    reader.apply_settled()
    assert f"{second.location[0]} {second.location[1]} a" in (
        tmp_path / "done.log").read_text()
    later.close()
    reader.close()


def test_a_torn_tail_is_skipped_once_its_writer_moved_on_and_never_forwarded(
    tmp_path: Path,
) -> None:
    key = os.urandom(32)
    writer = OutboxWriter(tmp_path, key)
    writer.append([(header(["a"]), b"x=1"), (header(["a"]), b"x=2")])
    writer.close()
    (segment,) = tmp_path.glob("seg-*")
    segment.write_bytes(segment.read_bytes()[:-5])  # killed mid-write
    reader = OutboxReader(tmp_path, key)
    reader.open()
    assert [f.body for f in reader.poll()] == [b"x=1"]  # the rest may still be coming
    restarted = OutboxWriter(tmp_path, key)
    restarted.append([(header(["a"]), b"x=3")])
    assert [f.body for f in reader.poll()] == [b"x=3"]  # the torn tail: skipped
    restarted.close()
    reader.close()


async def test_a_delivery_spooled_in_an_outage_is_forwarded_then_known_by_its_position(
    make_client: ClientFactory, outage: Any, admin: Admin,
) -> None:
    relay, settings_for = outage
    settings: Settings = settings_for(
        forward_plain_http_hosts="127.0.0.1", forward_retry_initial_seconds=0.02,
        forward_poll_seconds=0.01)
    destination = Destination()
    await destination.start()
    forwarders = Forwarders()
    try:
        client: Client = await make_client(settings)
        assert client.app is not None
        await routes_admin.add_route(client.app[STORE], settings, member_id=None,
                                     url=destination.url, actor="test")
        await client.app[HANDOFF].reload()
        forwarder = await forwarders.start(client)
        await install_sample_portal(client)
        # forwarded once found stored: before the outage (else it waits for PostgreSQL)
        await destination.wait_until(lambda d: len(d.delivered) == 1)
        await relay.cut()
        status, answer = await post(client, sample("onimbotmessageadd-1"))
        assert (status, answer["status"]) == (202, "spooled")
        await destination.wait_until(lambda d: len(d.delivered) == 2)
        spooled = destination.delivered[1]
        assert "X-Ledger-Position" not in spooled.headers
        spool_id = spooled.headers["X-Ledger-Spool-Id"]
        assert spooled.body == sample("onimbotmessageadd-1")

        await relay.start()
        await drained(client)
        await forwarder.records_flushed()  # held in memory while PostgreSQL was away
        row = await admin.fetchrow(
            "SELECT position, event_type, outcome FROM audit.forwards WHERE spool_id = $1",
            spool_id)
        stored = await admin.fetchval(
            "SELECT position FROM ledger.events WHERE event_type = 'ONIMBOTMESSAGEADD'")
        assert row is not None
        assert (row["position"], row["event_type"], row["outcome"]) == (
            stored, "ONIMBOTMESSAGEADD", "delivered")
        # its record ahead of the commit, found stored once drained, is not sent again
        await eventually(lambda: not forwarder._unresolved)
        _, later = await post(client, distinct_messages(1)[0])
        await destination.wait_until(
            lambda d: later["position"] in [r.position for r in d.delivered])
        assert [r.body for r in destination.delivered].count(
            sample("onimbotmessageadd-1")) == 1
    finally:
        await forwarders.close()
        await destination.stop()


async def test_a_spooled_delivery_whose_spooled_record_was_lost_is_forwarded_once_drained(
    make_client: ClientFactory, outage: Any, admin: Admin,
) -> None:
    """A `kill -9` right after the spool's fsync loses the spooled record (not waited for):
    the record written ahead of the commit still forwards the delivery once it is drained."""
    relay, settings_for = outage
    settings: Settings = settings_for(
        forward_plain_http_hosts="127.0.0.1", forward_retry_initial_seconds=0.02,
        forward_poll_seconds=0.01)
    destination = Destination()
    await destination.start()
    forwarders = Forwarders()
    try:
        client: Client = await make_client(settings)
        assert client.app is not None
        await routes_admin.add_route(client.app[STORE], settings, member_id=None,
                                     url=destination.url, actor="test")
        await client.app[HANDOFF].reload()
        await forwarders.start(client)
        await install_sample_portal(client)
        # forwarded once found stored: before the outage (else it waits for PostgreSQL)
        await destination.wait_until(lambda d: len(d.delivered) == 1)
        await relay.cut()
        intake = client.app[INTAKE]
        forward = intake._forward
        assert forward is not None

        def spooled_lost(accepted: Any) -> Any:
            if accepted.position is None and getattr(accepted, "stage", "spooled") == "spooled":
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                lost.set_result(None)
                return lost
            return forward(accepted)

        with mock.patch.object(intake, "_forward", spooled_lost):
            status, answer = await post(client, sample("onimbotmessageadd-1"))
        assert (status, answer["status"]) == (202, "spooled")
        await relay.start()
        await drained(client)
        stored = await admin.fetchval(
            "SELECT position FROM ledger.events WHERE event_type = 'ONIMBOTMESSAGEADD'")
        await destination.wait_until(lambda d: len(d.delivered) == 2)
        forwarded = destination.delivered[1]
        assert (forwarded.position, forwarded.body) == (stored, sample("onimbotmessageadd-1"))
    finally:
        await forwarders.close()
        await destination.stop()


@pytest.fixture
async def started() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`ledger serve` processes a test started: none outlives it, even when it fails."""
    processes: list[asyncio.subprocess.Process] = []
    yield processes
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def start_ledger(
    database: Database, port: int, directory: Path, log: Path,
    started: list[asyncio.subprocess.Process],
) -> asyncio.subprocess.Process:
    env = {**os.environ, "LEDGER_DATABASE_URL": database.service_dsn,
           "LEDGER_LOG_LEVEL": "INFO", "LEDGER_DATA_DIR": str(directory),
           "LEDGER_FORWARD_PLAIN_HTTP_HOSTS": "127.0.0.1",
           "LEDGER_FORWARD_RETRY_INITIAL_SECONDS": "0.05",
           "LEDGER_FORWARD_RETRY_MAX_SECONDS": "0.2"}
    stderr = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ledger", "serve", "--port", str(port), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )
    finally:
        os.close(stderr)
    started.append(process)
    async with asyncio.timeout(30), aiohttp.ClientSession() as session:
        while True:  # poll the condition (it answers) until the deadline; no other signal
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return process
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


async def forwarder_pid(port: int, *, other_than: int | None = None) -> int:
    """The pid of `serve`'s forwarder process, from /readyz, once it runs (and is not
    `other_than`)."""
    async with asyncio.timeout(60), aiohttp.ClientSession() as session:
        while True:  # poll the condition until the deadline; the service offers no signal
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                forwarder = (await response.json())["forwarder"]
            if forwarder["state"] == "running" and forwarder["pid"] != other_than:
                return int(forwarder["pid"])
            await asyncio.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text()


async def routed_ledger(
    database: Database, tmp_path: Path, started: list[asyncio.subprocess.Process],
    destination: Destination,
) -> tuple[asyncio.subprocess.Process, int, Path]:
    """A real `ledger serve` with one route to `destination` (its forwarder running)."""
    pool = await create_pool(database.service_dsn, size=2)
    port = free_port()
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
        await change_trust(store, TrustChange.ALLOWED, member_id=MEMBER_ID, actor="test")
        await routes_admin.add_route(
            store, Settings(port=port, forward_plain_http_hosts="127.0.0.1"), member_id=None,
            url=destination.url, actor="test")
    finally:
        await pool.close()
    log = tmp_path / "ledger.log"
    server = await start_ledger(database, port, tmp_path, log, started)
    return server, port, log


async def send_samples(port: int) -> list[int]:
    """Every sample, install first; the positions acknowledged."""
    url = f"http://127.0.0.1:{port}/bitrix24/events"
    others = [n for n in sample_names() if not n.startswith(("onappinstall", "onappuninstall"))]
    acknowledged: list[int] = []
    async with aiohttp.ClientSession() as session:
        for name in ["onappinstall-1", *others]:
            async with session.post(url, data=sample(name),
                                    headers={"Content-Type": FORM}) as response:
                assert response.status == 200, name
                acknowledged.append((await response.json())["position"])
    return acknowledged


async def niced_backend(admin: Admin) -> bool:
    """Whether the backend that wrote the forwarder's attempt records (by COPY: only the
    forwarder does) runs niced."""
    backends = [r["pid"] for r in await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE usename = 'ledger_app' "
        "AND datname = current_database() AND query LIKE 'COPY%forward_attempts%'")]
    return bool(backends) and all(os.getpriority(os.PRIO_PROCESS, pid) >= 10
                                  for pid in backends)


def first_seen_order(destination: Destination) -> list[int]:
    first_seen: list[int] = []
    for received in destination.delivered:
        if received.position not in first_seen:
            assert received.position is not None
            first_seen.append(received.position)
    return first_seen


async def test_kill_9_of_the_forwarder_process_loses_nothing_and_serve_starts_it_again(
    database: Database, admin: Admin, tmp_path: Path,
    started: list[asyncio.subprocess.Process],
) -> None:
    destination = Destination()
    destination.status = 503  # the bot is down
    await destination.start()
    try:
        server, port, _ = await routed_ledger(database, tmp_path, started, destination)
        pid = await forwarder_pid(port)
        acknowledged = await send_samples(port)
        await destination.wait_until(lambda d: len(d.requests) >= 3)  # it is being tried
        # niced and batch-scheduled (LEDGER_FORWARDER_NICE): intake first when CPU is short
        assert os.getpriority(os.PRIO_PROCESS, pid) >= 10
        assert os.sched_getscheduler(pid) == os.SCHED_BATCH
        if on_this_machine(database.service_dsn):  # its backend, writing the attempt records,
            await eventually(lambda: niced_backend(admin))  # is niced like it (the intake's not)
        os.kill(pid, signal.SIGKILL)
        again = await forwarder_pid(port, other_than=pid)  # serve started a new one
        assert gone(pid)
        async with aiohttp.ClientSession() as session, session.get(  # intake never stopped
            f"http://127.0.0.1:{port}/readyz"
        ) as response:
            assert response.status == 200
        destination.status = 200  # the bot is back
        await destination.wait_until(
            lambda d: {r.position for r in d.delivered} >= set(acknowledged))
        assert first_seen_order(destination) == sorted(acknowledged)
        server.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
        await eventually(lambda: gone(again))  # stopped with serve
    finally:
        await destination.stop()
    delivered = {r["position"] for r in await admin.fetch(
        "SELECT position FROM audit.forwards WHERE outcome = 'delivered'")}
    assert delivered == set(acknowledged)


async def test_kill_9_with_forwards_pending_loses_none_and_leaves_no_token_behind(
    database: Database, admin: Admin, tmp_path: Path,
    started: list[asyncio.subprocess.Process],
) -> None:
    destination = Destination()
    destination.status = 503  # the bot is down
    await destination.start()
    server, port, log = await routed_ledger(database, tmp_path, started, destination)
    child = await forwarder_pid(port)
    acknowledged = await send_samples(port)
    await destination.wait_until(lambda d: len(d.requests) >= 3)  # it is being tried
    server.send_signal(signal.SIGKILL)  # the intake (serve's own process)
    assert await server.wait() == -signal.SIGKILL
    await eventually(lambda: gone(child))  # its forwarder does not outlive it

    outbox = tmp_path / "outbox"
    sealed = b"".join(p.read_bytes() for p in outbox.rglob("seg-*"))
    assert sealed  # the pending forwards are there…
    assert [s for s in secrets_of_samples() if s in sealed] == []  # …sealed

    destination.status = 200  # the bot is back, then the ledger restarts
    restarted = await start_ledger(database, port, tmp_path, log, started)
    await destination.wait_until(
        lambda d: {r.position for r in d.delivered} >= set(acknowledged))
    assert first_seen_order(destination) == sorted(acknowledged)  # in order, at least once
    await eventually(lambda: not list(outbox.rglob("seg-*")))  # all settled: deleted
    restarted.send_signal(signal.SIGTERM)
    assert await restarted.wait() == 0
    await destination.stop()

    delivered = {r["position"] for r in await admin.fetch(
        "SELECT position FROM audit.forwards WHERE outcome = 'delivered'")}
    assert delivered == set(acknowledged)
    process = await asyncio.create_subprocess_exec(
        _pg_dump(), "--no-owner", database.admin_dsn, stdout=asyncio.subprocess.PIPE)
    dump, _ = await process.communicate()
    assert b"forward_attempts" in dump
    logged = log.read_bytes()
    assert b"position" in logged or b"route" in logged
    for place in (dump, logged):
        assert [s for s in secrets_of_samples() if s in place] == []


def test_a_large_backlog_is_read_a_piece_at_a_time(tmp_path: Path) -> None:
    key = os.urandom(32)
    writer = OutboxWriter(tmp_path, key, segment_bytes=1000)
    for i in range(5):
        writer.append([(header(["a"]), b"x" * 900 + str(i).encode())])  # a segment each
    writer.close()
    reader = OutboxReader(tmp_path, key)
    reader.open()
    pieces = [reader.poll(max_bytes=2000) for _ in range(4)]
    assert [len(p) for p in pieces] == [2, 2, 1, 0]
    assert [(r.body or b"")[-1:] for p in pieces for r in p] == [b"0", b"1", b"2", b"3", b"4"]
    reader.close()


async def test_with_postgresql_away_both_processes_start_from_the_saved_route_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The intake's handoff and the forwarder share one fallback: the routes they last saw."""
    route = Route("r1", MEMBER_ID, "ONIMBOT*", "https://bot.example/hook", False,
                  datetime(2026, 11, 26, tzinfo=UTC), "ops", 7)
    path = tmp_path / "routes.json"

    class Away:  # PostgreSQL refusing every query, as an outage does
        async def route_events(self, *_: Any) -> list[Any]:
            raise DatabaseUnavailable("PostgreSQL is unavailable (test)")

    heard: list[dict[str, Route]] = []

    def book() -> status.RouteBook:
        return status.RouteBook(Away(), path, on_change=heard.append)  # type: ignore[arg-type]

    first = book()
    await first.start()  # nothing saved yet: no routes
    assert (first.position, first.routes, heard) == (0, {}, [])
    status.save_routes(path, 9, [route])
    second = book()
    await second.start()
    assert (second.position, second.routes, heard) == (9, {"r1": route}, [{"r1": route}])
    path.write_bytes(b'{"position": 9, "routes": [{"route_id": 1}]}')  # damaged: none, logged
    third = book()
    await third.start()
    assert (third.position, third.routes) == (0, {})
    assert any("no saved routes usable" in r.getMessage() for r in caplog.records)


async def test_a_route_the_forwarder_does_not_know_yet_waits_for_the_routes_never_given_up(
    make_client: ClientFactory, outage: Any, admin: Admin,
) -> None:
    """The intake learned of a route the forwarder has not (it was added just before
    PostgreSQL went away from both): its forwards wait for the forwarder's next reload instead
    of being given up as `route_removed`, then go out in order."""
    relay, settings_for = outage
    settings: Settings = settings_for(
        forward_plain_http_hosts="127.0.0.1", forward_retry_initial_seconds=0.02,
        forward_poll_seconds=0.01, routes_reload_seconds=3600.0)  # reloads only when told
    destination = Destination()
    await destination.start()
    forwarders = Forwarders()
    try:
        client: Client = await make_client(settings)
        assert client.app is not None
        forwarder = await forwarders.start(client)  # no route yet
        await install_sample_portal(client)
        route_id, _ = await routes_admin.add_route(client.app[STORE], settings, member_id=None,
                                                   url=destination.url, actor="test")
        await client.app[HANDOFF].reload()  # the intake knows it; the forwarder does not
        await relay.cut()
        bodies = messages(3)
        for body in bodies:
            status, answer = await post(client, body)
            assert (status, answer["status"]) == (202, "spooled")
        await eventually(lambda: len(forwarder._unrouted.get(route_id, [])) == 3)
        assert b"route_removed" not in generate_latest(forwarder.registry)
        assert destination.requests == []

        await relay.start()
        await forwarder.reload()  # what the routes' follow loop does every few seconds
        await destination.wait_until(lambda d: len(d.delivered) == 3)
        assert [r.body for r in destination.delivered] == bodies
        await drained(client)
        await forwarder.records_flushed()
        outcomes = [r["outcome"] for r in await admin.fetch(
            "SELECT outcome FROM ledger.forward_attempts WHERE route_id = $1", route_id)]
        assert outcomes == ["delivered"] * 3
    finally:
        await forwarders.close()
        await destination.stop()


messages = distinct_messages  # distinct message deliveries of the sample portal
