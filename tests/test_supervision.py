"""Nothing ends a background task: input JSON cannot hold, crashes from the inside, a failing
spool — the senders get answers, intake resumes, and `/readyz` tells the truth throughout."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import checkpoints, drafts
from ledger.committer import GroupCommitter
from ledger.errors import DeliveryNotStored
from ledger.hashing import sha256
from ledger.metrics import Metrics
from ledger.models import Draft, EventDraft, Spooled, Stored
from ledger.offline import Appender, OfflineTrust
from ledger.settings import Settings, TrustPolicy
from ledger.spool import Spool
from ledger.storage.store import EventStore, create_pool
from ledger.supervision import Supervisor
from ledger.trust import TrustChange
from ledger.web import METRICS, SPOOL, Seams, create_app
from tests.conftest import Database, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, Disk, drained, install_sample_portal, post

Admin: TypeAlias = "asyncpg.Connection[Any]"
SeamedClient: TypeAlias = "Callable[[Settings, Seams], Awaitable[Client]]"


@pytest.fixture
async def appender(database: Database, tmp_path: Path) -> Any:
    """The store as the group committer drives it (with an offline trust state of its own)."""
    pool = await create_pool(database.service_dsn, size=4)
    yield Appender(EventStore(pool, policy=TrustPolicy.ALLOWLIST),
                   OfflineTrust(tmp_path / "trust", worker=0, policy=TrustPolicy.ALLOWLIST))
    await pool.close()


@pytest.fixture
def seamed_client(database: Database, aiohttp_client: Any) -> SeamedClient:
    async def make(settings: Settings, seams: Seams) -> Client:
        client: Client = await aiohttp_client(create_app(settings, seams=seams))
        return client

    return make


def allowances(count: int) -> list[EventDraft]:
    now = datetime.now(UTC)
    return [
        drafts.operator_action(TrustChange.ALLOWED, member_id=f"m{i}", domain=None, token=None,
                               actor="test", received_at=now)
        for i in range(count)
    ]


def unserialisable(draft: EventDraft) -> EventDraft:
    """What a header byte 0xFF became before the edge escaped it: a lone surrogate that no
    JSON encoder will write (hashing and spooling both raise TypeError)."""
    return dataclasses.replace(
        draft, metadata={**draft.metadata, "content_type": "text/plain\udcff"},
        dedup_key=sha256(b"poison"),
    )


def failures(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_total", labels) or 0.0


# ---- the committer fails a batch, never itself ---------------------------------------------


async def test_a_draft_json_cannot_hold_fails_alone_and_the_committer_lives_on(
    appender: Appender,
) -> None:
    metrics = Metrics()
    committer = GroupCommitter(appender, max_events=64, max_delay=0.05, metrics=metrics)
    committer.start()
    good = allowances(5)
    batch: list[Draft] = [*good[:2], unserialisable(good[4]), *good[2:4]]
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(committer.submit(d) for d in batch),
                                       return_exceptions=True)
        assert isinstance(results[2], DeliveryNotStored)
        assert all(isinstance(r, Stored) for i, r in enumerate(results) if i != 2), results
        assert isinstance(await committer.submit(good[4]), Stored)  # it still commits
        await committer.close()
    assert failures(metrics, "ledger_batch_failures", stage="append") >= 1


async def test_a_draft_the_spool_cannot_hold_fails_alone_and_the_rest_is_spooled(
    appender: Appender, tmp_path: Path,
) -> None:
    async def postgresql_is_away() -> bool:
        return False

    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    metrics = Metrics()
    committer = GroupCommitter(appender, max_events=64, max_delay=0.05, metrics=metrics,
                               spool=spool, gate=postgresql_is_away)
    committer.start()
    good = allowances(4)
    batch: list[Draft] = [good[0], unserialisable(good[3]), *good[1:3]]
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(committer.submit(d) for d in batch),
                                       return_exceptions=True)
    assert isinstance(results[1], DeliveryNotStored)
    assert [type(r) for i, r in enumerate(results) if i != 1] == [Spooled] * 3
    spooled = spool.read(100).drafts  # exactly what was acknowledged, in order
    assert [d.dedup_key for d in spooled if isinstance(d, EventDraft)] == [
        d.dedup_key for d in good[:3]]
    assert len(spooled) == 3
    assert failures(metrics, "ledger_batch_failures", stage="spool") >= 1
    await committer.close()  # PostgreSQL stays away: the spooled three stay for the next start
    assert len(Spool(tmp_path / "spool", max_bytes=1 << 20).read(100).drafts) == 3


async def raw_post(client: Client, header: bytes, body: bytes) -> bytes:
    """Send what no HTTP client library would: a header value ending in byte 0xFF."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /bitrix24/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header
                 + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_a_header_byte_0xff_is_answered_and_intake_goes_on(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)
    for header, body in [
        (b"application/x-www-form-urlencoded\xff", sample("onimbotjoinchat-1")),
        (b"application/x-www-form-urlencoded\xff", b"x=1"),
        (b"application/x-www-form-urlencoded; charset=\xff", sample("onimbotjoinchat-1")),
    ]:
        async with asyncio.timeout(10):
            answer = await raw_post(client, b"Content-Type: " + header, body)
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), answer
        assert content.startswith(b"{"), answer  # an answer in JSON, whatever it says
        if b'"not_stored"' in content:  # it reached the committer: failed alone, and counted
            metrics = await (await client.get("/metrics")).text()
            assert 'ledger_batch_failures_total{stage="append"}' in metrics
    async with asyncio.timeout(1):  # a genuine delivery is stored within a second
        status, stored = await post(client, sample("onimbotmessageadd-1"))
    assert (status, stored["status"]) == (200, "stored")
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()


# ---- a crash from the inside: restarted, senders answered, readiness truthful ---------------


class Crash:
    """A fault that crashes the task at `step` once, when armed."""

    def __init__(self, step: str, *, armed: bool = False) -> None:
        self.step, self.armed = step, armed
        self.fired = asyncio.Event()

    def __call__(self, step: str) -> None:
        if step == self.step and self.armed:
            self.armed = False
            self.fired.set()
            raise RuntimeError(f"injected crash at {step}")


async def readiness(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    return response.status, await response.json()


async def until_ready(client: Client) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            status, body = await readiness(client)
            if status == 200:
                return body
            await asyncio.sleep(0.05)  # pacing the polls of a condition, bounded above


# the projector and its listener run in a process of their own (tests/test_projector_process.py)
TASKS = {"commit": "committer", "drain": "committer", "checkpoint": "checkpointer"}


@pytest.mark.parametrize("step", list(TASKS))
async def test_a_task_crashed_from_the_inside_restarts_and_intake_resumes(
    step: str, seamed_client: SeamedClient, outage: Any, admin: Admin, tmp_path: Path,
) -> None:
    relay, settings_for = outage
    task = TASKS[step]
    private, _ = checkpoints.generate_keys(tmp_path / "keys", "test")
    settings = settings_for(
        task_restart_seconds=1.5,
        checkpoint_dir=tmp_path / "checkpoints", checkpoint_key=private,
        checkpoint_every_events=1,
    )
    crash = Crash(step, armed=False)
    client = await seamed_client(settings, Seams(fault=crash))
    await install_sample_portal(client)

    in_flight: asyncio.Task[tuple[int, dict[str, Any]]] | None = None
    if step == "drain":
        await relay.cut()
        status, answer = await post(client, sample("onimbotjoinchat-1"))
        assert status == 202, answer
        crash.armed = True
        await relay.start()
    elif step == "commit":
        crash.armed = True
        in_flight = asyncio.create_task(post(client, sample("onimbotjoinchat-1")))
    else:
        await until_ready(client)
        crash.armed = True
        await post(client, sample("onimbotjoinchat-1"))  # wakes the checkpointer

    async with asyncio.timeout(10):
        await crash.fired.wait()
    status, body = await readiness(client)  # within the restart delay: the task is down
    assert status == 503, body
    assert task in body["checks"]["tasks"], body
    assert "injected crash" in body["checks"]["tasks"]
    if in_flight is not None:  # the sender whose batch was in hand is answered, not left
        async with asyncio.timeout(5):
            status, answer = await in_flight
        assert (status, answer["error"]) == (503, "store_unavailable")

    body = await until_ready(client)  # restarted
    assert body["checks"]["tasks"] == "ok"
    if step == "drain":
        await drained(client)
    async with asyncio.timeout(5):
        status, answer = await post(client, sample("onimbotmessageadd-1"))
    assert (status, answer["status"]) == (200, "stored"), answer
    if step == "drain":
        assert await admin.fetchval(
            "SELECT count(*) FROM ledger.events WHERE event_type = 'ONIMBOTJOINCHAT'") == 1
    assert client.app is not None
    assert failures(client.app[METRICS], "ledger_task_failures", task=task) == 1


async def test_the_supervisor_calls_the_hook_counts_and_restarts_until_the_task_returns() -> None:
    crashes: list[BaseException] = []
    runs = 0
    done = asyncio.Event()

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise ValueError(f"crash {runs}")
        done.set()

    metrics = Metrics()
    supervisor = Supervisor(metrics, first_backoff=0.01, max_backoff=0.02)
    supervisor.start("flaky", run, on_crash=crashes.append)
    async with asyncio.timeout(5):
        await done.wait()
    await supervisor.join("flaky")
    assert [str(c) for c in crashes] == ["crash 1", "crash 2", "crash 3", "crash 4"]
    assert failures(metrics, "ledger_task_failures", task="flaky") == 4
    assert supervisor.down() == {}


async def test_a_crash_looping_task_stays_named_while_it_runs_between_crashes() -> None:
    """Left over from the last session: readiness named a crashing task only during its
    backoff, so a task crashing every few seconds looked ready almost whenever probed."""
    release, running = asyncio.Event(), asyncio.Event()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise ValueError(f"crash {runs}")
        running.set()
        await release.wait()  # up and running, after three quick crashes

    supervisor = Supervisor(Metrics(), first_backoff=0.01, max_backoff=0.01, stable_after=0.5)
    supervisor.start("flaky", run)
    async with asyncio.timeout(5):
        await running.wait()
    assert "crash-looping: 3 crashes" in supervisor.down()["flaky"]
    assert "crash 3" in supervisor.down()["flaky"]
    # the window passes without a crash: ready again
    await eventually(lambda: supervisor.down() == {}, within=5)
    release.set()
    await supervisor.join("flaky")
    assert supervisor.down() == {}


async def test_two_crashes_in_the_window_are_not_a_loop() -> None:
    runs = 0
    running = asyncio.Event()

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ValueError(f"crash {runs}")
        running.set()
        await asyncio.Event().wait()

    supervisor = Supervisor(Metrics(), first_backoff=0.01, max_backoff=0.01, stable_after=60)
    supervisor.start("twice", run)
    async with asyncio.timeout(5):
        await running.wait()
    assert supervisor.down() == {}
    await supervisor.close()


# ---- readiness degrades with a reason, and recovers ----------------------------------------


async def test_readiness_fails_while_the_database_is_away(
    seamed_client: SeamedClient, outage: Any,
) -> None:
    relay, settings_for = outage
    client = await seamed_client(settings_for(), Seams())
    await until_ready(client)
    await relay.cut()
    status, body = await readiness(client)
    assert status == 503
    assert body["checks"]["database"] != "ok"
    await relay.start()
    await until_ready(client)


async def test_readiness_fails_while_the_schema_is_behind(client: Client, admin: Admin) -> None:
    await until_ready(client)
    current = await admin.fetchval("SELECT version_num FROM public.alembic_version")
    await admin.execute("UPDATE public.alembic_version SET version_num = '0001'")
    status, body = await readiness(client)
    assert status == 503
    assert "ledger migrate" in body["checks"]["database"]
    await admin.execute("UPDATE public.alembic_version SET version_num = $1", current)
    await until_ready(client)


async def test_readiness_fails_while_the_spool_is_nearly_full(
    seamed_client: SeamedClient, outage: Any,
) -> None:
    relay, settings_for = outage
    first = await seamed_client(settings_for(), Seams())
    await install_sample_portal(first)
    await relay.cut()
    status, _ = await post(first, sample("onimbotjoinchat-1"))
    assert status == 202
    assert first.app is not None
    size = first.app[SPOOL].size
    await first.close()  # the record stays spooled for the next start

    client = await seamed_client(settings_for(spool_max_bytes=max(1024, int(size / 0.95))),
                                 Seams())
    status, body = await readiness(client)
    assert status == 503
    assert body["checks"]["spool"].startswith("nearly full"), body
    await relay.start()
    await drained(client)
    body = await until_ready(client)
    assert body["checks"]["spool"] == "ok"


async def test_readiness_fails_while_the_spool_cannot_be_written(
    seamed_client: SeamedClient, outage: Any,
) -> None:
    relay, settings_for = outage
    disk = Disk()
    client = await seamed_client(settings_for(), Seams(spool_files=disk.files()))
    await install_sample_portal(client)
    await relay.cut()
    disk.fail_at = 0  # ENOSPC
    status, answer = await post(client, sample("onimbotjoinchat-1"))
    assert (status, answer["error"]) == (503, "store_unavailable")  # refused, not acknowledged
    status, body = await readiness(client)
    assert status == 503
    assert body["checks"]["spool"].startswith("unwritable"), body
    disk.fail_at = None  # space freed
    status, body = await readiness(client)
    assert body["checks"]["spool"] == "ok", body
    status, answer = await post(client, sample("onimbotmessageadd-1"))
    assert status == 202, answer
    await relay.start()
    await drained(client)
    await until_ready(client)

