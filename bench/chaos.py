"""Faults under load: three `kill -9`s of `ledger serve` and one PostgreSQL stop/start, while
simulated deliveries keep coming. Afterwards every acknowledged delivery (200 stored/duplicate or
202 spooled) must be in the store exactly once, and nothing stored twice.

    python -m bench.chaos [--seconds 24] [--concurrency 32]

Uses the embedded PostgreSQL (it stops and restarts it); not for LEDGER_BENCH_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import asyncpg

from bench.common import OUT, Cluster, record
from bench.intake import provision
from ledger import wire
from ledger.embedded import EmbeddedHandle
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.simulation import Traffic

PORT = 9301
URL = f"http://127.0.0.1:{PORT}"


def postgres(handle: EmbeddedHandle | None, action: str) -> None:
    """Stop or start the embedded server the way its owner would (pg_ctl as its user)."""
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    assert handle is not None, "needs the embedded PostgreSQL"
    server: Any = handle.server._server  # type: ignore[attr-defined]
    if action == "stop":
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    else:
        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {handle.socket_dir}", "-l", str(server.log),
                "start"], pgdata=server.pgdata, user=server.system_user)


async def start_ledger(dsn: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "LEDGER_DATABASE_URL": dsn, "LEDGER_LOG_LEVEL": "WARNING",
           "LEDGER_DATA_DIR": str(OUT / "chaos"), "LEDGER_SPOOL_RETRY_SECONDS": "0.2"}
    log = (OUT / "chaos-serve.log").open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger", "serve", "--port", str(PORT), env=env,
        stdout=log, stderr=log,
    )
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{URL}/healthz") as response:
                    if response.status == 200:
                        return process
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise SystemExit("ledger serve did not come up")


async def run(seconds: float, concurrency: int) -> None:
    cluster = Cluster()
    traffic = Traffic(seed=21, portals=10, churn=False)
    tokens = {p.member_id: p.token for p in traffic.portals}
    database = await cluster.fresh_database("bench_chaos", migrate=True)
    dsn = cluster.dsn(database, user="ledger_app")
    await provision(dsn, tokens)
    statuses: Counter[int] = Counter()
    acknowledged: dict[bytes, tuple[int, str, float]] = {}
    duplicates: set[int] = set()  # positions answered as already stored
    stop = asyncio.Event()
    server = await start_ledger(dsn)
    events: list[str] = []

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            async def worker() -> None:
                while not stop.is_set():
                    delivery = traffic.next()
                    if delivery.document["event"] in (INSTALL, UNINSTALL, UPDATE):
                        continue
                    body = wire.http_build_query(delivery.document)
                    try:
                        async with session.post(f"{URL}/bitrix24/events", data=body,
                                                headers={"Content-Type": wire.FORM}) as answer:
                            statuses[answer.status] += 1
                            if answer.status == 200 and (await answer.json())["duplicate"]:
                                # the simulator can repeat an occurrence (same bot, chat, ts)
                                duplicates.add((await answer.json())["position"])
                            elif answer.status in (200, 202):
                                acknowledged[hashlib.sha256(body).digest()] = (
                                    answer.status, delivery.document["event"],
                                    round(time.monotonic() - began, 2))
                    except aiohttp.ClientError:
                        statuses[0] += 1  # the server was down: Bitrix24 would log a failure
                        await asyncio.sleep(0.02)
            await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def faults() -> None:
        nonlocal server
        step = seconds / 6
        for n in range(3):
            await asyncio.sleep(step)
            server.send_signal(signal.SIGKILL)
            await server.wait()
            events.append(f"kill -9 #{n + 1} at {time.monotonic() - began:.1f}s")
            server = await start_ledger(dsn)
            if n == 1:
                await asyncio.sleep(step / 2)
                await asyncio.to_thread(postgres, cluster._handle, "stop")
                events.append(f"PostgreSQL stopped at {time.monotonic() - began:.1f}s")
                await asyncio.sleep(step)
                await asyncio.to_thread(postgres, cluster._handle, "start")
                events.append(f"PostgreSQL started at {time.monotonic() - began:.1f}s")
        await asyncio.sleep(step)
        stop.set()

    began = time.monotonic()
    await asyncio.gather(load(), faults())
    async with aiohttp.ClientSession() as session:  # wait for the spool to drain
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with session.get(f"{URL}/readyz") as response:
                if (await response.json())["spool"]["records"] == 0:
                    break
            await asyncio.sleep(0.2)
    server.send_signal(signal.SIGTERM)
    exit_code = await server.wait()

    connection = await asyncpg.connect(cluster.dsn(database))
    try:
        rows = await connection.fetch(
            "SELECT position, body_sha256 FROM ledger.events WHERE body_sha256 IS NOT NULL")
        stored = Counter(bytes(r["body_sha256"]) for r in rows)
        missing_originals = duplicates - {r["position"] for r in rows}
    finally:
        await connection.close()
        cluster.stop()
    lost = [d for d in acknowledged if stored[d] == 0] + sorted(missing_originals)
    for item in lost:
        print("lost:", item if isinstance(item, int) else acknowledged[item])
    twice = [d for d, n in stored.items() if n > 1]
    record("Chaos: kill -9 x3 and a PostgreSQL stop/start under load", [
        f"`python -m bench.chaos --seconds {seconds:g} --concurrency {concurrency}`: "
        + "; ".join(events) + ".",
        f"Answers {dict(sorted(statuses.items()))} (0 = connection refused while the server "
        f"was down); acknowledged {len(acknowledged)} (+{len(duplicates)} answered as "
        f"duplicates of stored events); stored {sum(stored.values())}; "
        f"**lost {len(lost)}, stored twice {len(twice)}**; SIGTERM exit code {exit_code}.",
    ])
    if lost or twice or statuses[500] or statuses[503]:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=24)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.concurrency))


if __name__ == "__main__":
    main()
