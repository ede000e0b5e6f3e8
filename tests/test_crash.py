"""`kill -9` under load and SIGTERM: every acknowledged delivery is stored exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeAlias

import aiohttp
import asyncpg
import pytest

from ledger.operations import change_trust
from ledger.settings import TrustPolicy
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange
from tests.conftest import FORM, MEMBER_ID, Database, sample
from tests.helpers import distinct_messages
from tests.servers import free_port, stop

Admin: TypeAlias = "asyncpg.Connection[Any]"


async def start_server(
    database: Database, port: int, directory: Path, extra: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    env = {**os.environ, "LEDGER_DATABASE_URL": database.service_dsn,
           "LEDGER_LOG_LEVEL": "WARNING", "LEDGER_DATA_DIR": str(directory), **(extra or {})}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger", "serve", "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            while True:  # poll the condition (it answers) until the deadline; no other signal
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                        if response.status == 200:
                            return process
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
    except BaseException:
        await stop(process)
        raise


@pytest.fixture
async def reaper() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Servers a test started, stopped when it ends (also when it fails)."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        await stop(process)


bodies = distinct_messages


async def test_kill_9_under_load_loses_no_acknowledged_delivery(
    database: Database, admin: Admin, tmp_path: Path,
    reaper: list[asyncio.subprocess.Process],
) -> None:
    port = free_port()
    server = await start_server(database, port, tmp_path)
    reaper.append(server)
    url = f"http://127.0.0.1:{port}/bitrix24/events"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=sample("onappinstall-1"),
                                headers={"Content-Type": FORM}) as response:
            assert response.status == 403  # not allowed yet: allow and retry
        pool = await create_pool(database.service_dsn, size=2)
        await change_trust(EventStore(pool, policy=TrustPolicy.ALLOWLIST), TrustChange.ALLOWED,
                           member_id=MEMBER_ID, actor="test")
        await pool.close()
        async with session.post(url, data=sample("onappinstall-1"),
                                headers={"Content-Type": FORM}) as response:
            assert response.status == 200

        acknowledged: dict[bytes, int] = {}
        sent = bodies(400)
        killed = asyncio.Event()

        async def deliver(body: bytes) -> None:
            try:
                async with session.post(url, data=body,
                                        headers={"Content-Type": FORM}) as response:
                    if response.status == 200:
                        acknowledged[hashlib.sha256(body).digest()] = (
                            await response.json())["position"]
            except aiohttp.ClientError:
                pass  # the server died under this request: not acknowledged
            if len(acknowledged) >= 100 and not killed.is_set():
                killed.set()
                server.send_signal(signal.SIGKILL)

        await asyncio.gather(*(deliver(b) for b in sent))
        await server.wait()
        assert server.returncode == -signal.SIGKILL
        assert len(acknowledged) >= 100

    restarted = await start_server(database, port, tmp_path)
    reaper.append(restarted)
    restarted.send_signal(signal.SIGTERM)
    assert await restarted.wait() == 0  # graceful shutdown exits 0

    stored = {bytes(r["body_sha256"]): r["position"] for r in await admin.fetch(
        "SELECT body_sha256, position FROM ledger.events WHERE body_sha256 IS NOT NULL")}
    for digest, position in acknowledged.items():
        assert stored[digest] == position
    counts = await admin.fetch(
        "SELECT count(*) AS n FROM ledger.events WHERE body_sha256 IS NOT NULL "
        "GROUP BY body_sha256 HAVING count(*) > 1"
    )
    assert counts == []  # nothing stored twice
