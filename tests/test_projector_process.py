"""The projector as a process of its own (issue #15): `ledger serve` starts exactly one, restarts
it when it dies, stops it on exit; readiness judges it from the database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from ledger.api import TREES
from ledger.settings import Settings
from ledger.storage.store import backend_here, on_this_machine
from ledger.storage.tree_store import EVENTS_LOG
from ledger.supervision import Supervisor
from tests.conftest import FORM, MEMBER_ID, TOKEN, ClientFactory, Database, sample
from tests.helpers import PROJECTOR, install_sample_portal, post
from tests.servers import free_port, serving, stop, wait_ready
from tests.test_operability import _serve_pid, cli, service_env


def _projectors(parent: int) -> set[int]:
    """Live `ledger project --follow` children of `parent`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        match = re.search(r"^PPid:\s+(\d+)$", status, re.M)
        zombie = re.search(r"^State:\s+Z", status, re.M) is not None
        if (match is not None and int(match.group(1)) == parent and not zombie
                and b"project" in command and b"--follow" in command):
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return re.search(r"^State:\s+Z", status, re.M) is None


async def _until(condition: Callable[[], Any], seconds: float = 60) -> Any:
    """Poll `condition` until it returns something truthy, within `seconds`."""
    async with asyncio.timeout(seconds):
        while True:
            if found := condition():
                return found
            await asyncio.sleep(0.05)


async def _projected(admin: asyncpg.Connection[Any], seconds: float = 30) -> int:
    """Until the registry's checkpoint reaches the chain's head (the database's condition)."""
    async with asyncio.timeout(seconds):
        while True:
            row = await admin.fetchrow(
                "SELECT c.position, h.position FROM projections.checkpoints c, "
                "ledger.stream_heads h WHERE c.projection = 'registry' AND h.stream = 'events'"
            )
            assert row is not None
            checkpoint, head = row[0], row[1]
            if head > 0 and checkpoint == head:
                return int(head)
            await asyncio.sleep(0.05)


async def _deliver(base: str, session: aiohttp.ClientSession, n: int) -> None:
    body = sample("onimbotmessageadd-1").replace(b"MESSAGE_ID%5D=", f"MESSAGE_ID%5D={n}".encode())
    async with session.post(f"{base}/bitrix24/events", data=body,
                            headers={"Content-Type": FORM}) as response:
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_runs_one_projector_restarts_it_after_kill_9_and_leaves_no_child(
    workers: int, database: Database, admin: asyncpg.Connection[Any], tmp_path: Path
) -> None:
    env = {**service_env(database), "LEDGER_DATA_DIR": str(tmp_path),
           "LEDGER_LOG_LEVEL": "WARNING", "LEDGER_PROJECTOR_POLL_SECONDS": "60",
           "LEDGER_TASK_RESTART_SECONDS": "0.1"}
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    trusted = await asyncio.to_thread(
        cli, env, "portals", "trust", "--member-id", MEMBER_ID, "--token-file", str(token_file)
    )
    assert trusted.exit_code == 0, trusted.output
    port = free_port()
    async with serving(env, "--workers", str(workers), port=port, cwd=tmp_path) as base, \
            aiohttp.ClientSession() as session:
        parent = _serve_pid(port)
        (first,) = await _until(lambda: _projectors(parent))
        # niced (LEDGER_PROJECTOR_NICE, 10): its bursts wait for the intake, not the reverse
        niced = min(19, os.getpriority(os.PRIO_PROCESS, parent) + 10)
        await _until(lambda: os.getpriority(os.PRIO_PROCESS, first) == niced)
        # and batch-scheduled: woken by every NOTIFY, it never preempts the intake on waking
        await _until(lambda: os.sched_getscheduler(first) == os.SCHED_BATCH)
        await _deliver(base, session, 1)
        await _projected(admin)  # woken by NOTIFY: the poll is 60 s away
        if on_this_machine(database.service_dsn):  # and so are its backends, ours to renice
            backends = [r["pid"] for r in await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE usename = 'ledger_projector' "
                "AND application_name = 'ledger' AND datname = current_database()")]
            assert backends
            assert all(os.getpriority(os.PRIO_PROCESS, pid) >= 10 for pid in backends)
            assert all(os.sched_getscheduler(pid) == os.SCHED_BATCH for pid in backends)

        os.kill(first, signal.SIGKILL)
        (second,) = await _until(lambda: _projectors(parent) - {first} or None)
        await _deliver(base, session, 2)
        head = await _projected(admin)
        assert head >= 3
        assert _projectors(parent) == {second}  # one, never two
        # it grows the Merkle tree too (serve's own processes leave it to it: _serving)
        async with asyncio.timeout(30):
            while True:
                if await admin.fetchval(
                        "SELECT size FROM ledger.tree_logs WHERE log_id = 'events'") == head:
                    break
                await asyncio.sleep(0.05)
    assert not _alive(second), "serve's exit left its projector running"


async def test_a_projector_whose_serve_was_killed_stops_by_itself(
    database: Database, tmp_path: Path
) -> None:
    env = {**service_env(database), "LEDGER_DATA_DIR": str(tmp_path),
           "LEDGER_LOG_LEVEL": "WARNING"}
    port = free_port()
    async with serving(env, port=port, cwd=tmp_path):
        parent = _serve_pid(port)
        (projector,) = await _until(lambda: _projectors(parent))
        os.kill(parent, signal.SIGKILL)
        await _until(lambda: not _alive(projector), seconds=15)


async def test_readiness_reports_a_projector_that_does_not_keep_up(
    make_client: ClientFactory, settings_factory: Callable[..., Settings]
) -> None:
    """The app runs no projector: with one expected and none folding, events wait unfolded
    and /readyz names the stall; folding them makes it ready again."""
    client = await make_client(settings_factory(run_projector=True, projector_stall_seconds=0.3))
    await install_sample_portal(client)
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200

    async def stalled() -> dict[str, Any]:
        async with asyncio.timeout(15):
            while True:
                response = await client.get("/readyz")
                body: dict[str, Any] = await response.json()
                if response.status == 503:
                    return body
                await asyncio.sleep(0.05)

    body = await stalled()
    lag = body["projector"]["lag"]
    assert lag >= 2, body  # the install and the join at least
    assert body["checks"]["projector"].startswith(f"stalled: {lag} events behind"), body
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 200, body
    assert body["projector"] == {"checkpoint": lag, "lag": 0}


async def test_the_projector_stops_when_cancelled_as_it_is_woken(
    make_client: ClientFactory, settings: Settings
) -> None:
    """Found by the intake bench: a worker did not exit on SIGTERM. On Python 3.11
    `asyncio.wait_for` returns the result instead of raising when the awaited event is set in
    the same step as the cancellation — a NOTIFY arriving as shutdown cancels the projector —
    and its loop went on for ever while the shutdown waited for it."""
    client = await make_client(settings)
    assert client.app is not None
    projector = client.app[PROJECTOR]
    task = asyncio.create_task(projector.run(poll_seconds=60))
    async with asyncio.timeout(10):  # until it waits to be woken
        while True:
            if getattr(projector._wake, "_waiters", None):
                break
            await asyncio.sleep(0.01)
    projector.wake()
    task.cancel()
    await asyncio.wait({task}, timeout=5)  # not `await task`: that would cancel it again
    assert task.cancelled(), "the cancellation was lost: the projector runs on"


async def test_stopping_a_task_that_loses_its_cancellation_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task whose loop swallows one cancellation is cancelled again; one that swallows
    every cancellation is abandoned after `stop_seconds`, with an error — a shutdown never
    waits for ever on a background task."""
    supervisor = Supervisor(stop_seconds=1.0)
    swallowed = 0

    async def swallows_once() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 1:
                    raise

    stubborn = asyncio.Event()

    async def swallows_all() -> None:
        while not stubborn.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await stubborn.wait()

    supervisor.start("once", swallows_once)
    supervisor.start("always", swallows_all)
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await supervisor.stop("once")
        await supervisor.stop("always")
    assert swallowed == 2
    assert "always did not stop within 1s" in caplog.text
    stubborn.set()
    await asyncio.sleep(0.01)  # the abandoned task ends now


async def test_sigterm_under_load_stops_two_workers_and_the_projector_promptly(
    database: Database, admin: asyncpg.Connection[Any], tmp_path: Path
) -> None:
    """Found by the intake bench: `serve --workers 2`, SIGTERM right after a load, did not exit
    within 30 s (a worker's shutdown waited for ever on a background task that had lost its
    cancellation). Now: exit 0 within the bound, and every delivery acknowledged is stored."""
    env = {**service_env(database), "LEDGER_DATA_DIR": str(tmp_path),
           "LEDGER_LOG_LEVEL": "WARNING", "LEDGER_PROJECTOR_POLL_SECONDS": "0.05"}
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    trusted = await asyncio.to_thread(
        cli, env, "portals", "trust", "--member-id", MEMBER_ID, "--token-file", str(token_file)
    )
    assert trusted.exit_code == 0, trusted.output
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger", "serve", "--port", str(port), "--workers", "2",
        env={**os.environ, **env}, cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    stored: list[int] = []
    try:
        await wait_ready(f"{base}/readyz", process)
        parent = _serve_pid(port)
        await _until(lambda: _projectors(parent))
        sent = 0

        async def sender(session: aiohttp.ClientSession) -> None:
            nonlocal sent
            while process.returncode is None:
                sent += 1
                n = sent
                body = sample("onimbotmessageadd-1").replace(
                    b"MESSAGE_ID%5D=", f"MESSAGE_ID%5D=9{n}".encode())
                try:
                    async with session.post(f"{base}/bitrix24/events", data=body,
                                            headers={"Content-Type": FORM}) as response:
                        answer = await response.json()
                        if response.status == 200 and answer["status"] == "stored":
                            stored.append(answer["position"])
                except (TimeoutError, aiohttp.ClientError):
                    await asyncio.sleep(0.01)  # refused while stopping: not acknowledged

        connector = aiohttp.TCPConnector(limit=32, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            senders = [asyncio.create_task(sender(session)) for _ in range(32)]
            await _until(lambda: len(stored) >= 300)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):  # the bound: shutdown timeout plus task bounds
                code = await process.wait()
            await asyncio.gather(*senders)
    finally:
        await stop(process)
    assert code == 0
    assert not _projectors(parent)
    rows = await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE position = ANY($1::bigint[])", stored)
    assert rows == len(stored) == len(set(stored))


def test_serve_leaves_the_merkle_tree_to_the_projector_process() -> None:
    """A serving process's gathered tree catch-up held the intake's event loop: most of its p99
    at a fixed 1000/s (bench.latency, variant no-tree). With the projector process running, it
    grows the tree; without one, the serving process still does."""
    from ledger.cli.service import _serving, _sidecars
    from ledger.storage.target import DatabaseTarget

    target = DatabaseTarget(service_dsn="postgresql://x@/db", admin_dsn="postgresql://x@/db",
                            embedded=None)
    both = Settings(database_url="postgresql://x@/db")
    (projector, _) = _sidecars(both, target)
    assert "--tree" in projector._argv
    assert _serving(both).run_tree_follower is False
    alone = Settings(database_url="postgresql://x@/db", run_projector=False)
    assert _serving(alone).run_tree_follower is True


async def test_readiness_reports_a_merkle_tree_the_projector_process_does_not_grow(
    make_client: ClientFactory, settings_factory: Callable[..., Settings]
) -> None:
    """A serving process of `ledger serve` leaves the tree to the projector process: with none
    growing it, events wait outside the tree and /readyz names the stall; growing it makes it
    ready again."""
    client = await make_client(settings_factory(
        run_projector=False, run_tree_follower=False, tree_in_projector_process=True,
        projector_stall_seconds=0.3))
    await install_sample_portal(client)
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200
    async with asyncio.timeout(15):
        while True:
            response = await client.get("/readyz")
            body: dict[str, Any] = await response.json()
            if response.status == 503:
                break
            await asyncio.sleep(0.05)
    assert body["checks"]["tree"].startswith("stalled: "), body
    assert client.app is not None
    await client.app[TREES].catch_up(EVENTS_LOG)
    response = await client.get("/readyz")
    assert response.status == 200, await response.json()


async def test_only_a_backend_seen_serving_our_role_and_database_is_reniced(
    database: Database, admin: asyncpg.Connection[Any], service_connection: Any
) -> None:
    """A server behind a shared Unix socket in another PID namespace reports pids that name
    other processes here: reniced blindly, some other process (another server's backend) would
    be slowed. Only a process whose title shows it serves our role on our database counts."""
    if not on_this_machine(database.service_dsn):
        pytest.skip("PostgreSQL is not a process of this machine")
    pid = service_connection.get_server_pid()
    database_name = await admin.fetchval("SELECT current_database()")
    assert backend_here(pid, "ledger_app", database_name)
    assert not backend_here(pid, "ledger_projector", database_name)  # another role's backend
    assert not backend_here(pid, "ledger_app", "postgres")  # another database's
    assert not backend_here(os.getpid(), "ledger_app", database_name)  # not a backend at all
    assert not backend_here(admin.get_server_pid(), "ledger_app", database_name)
