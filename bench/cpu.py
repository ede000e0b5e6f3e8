"""Server CPU per delivery, trees side by side: which change to the intake pays, in µs.

    python -m bench.cpu --tree main=/tmp/main-ledger --tree branch=. [--deliveries 3000]
    python -m bench.cpu --tree a=DIR,LEDGER_PROJECTOR_GATHER_MS=100 --tree b=DIR,...=1000

Each `--tree` is a directory holding a `ledger` package (`git archive <commit> ledger | tar -x
-C DIR`), optionally followed by `,NAME=VALUE` settings for its server. For every round and
tree, in interleaved order, a fresh `ledger serve` (1 worker, that tree's code first on
PYTHONPATH) on one PostgreSQL gets the same simulated bot events (made unique) from
`--concurrency` client connections in this process; the CPU the serving process used (user +
system, all its threads, from /proc) is divided by the deliveries it answered. On a shared
machine only ratios taken in one run mean anything: each tree is reported as the median over
rounds and as µs saved against the first tree. A projector child's CPU (trees that run the
projector in a process of its own) is reported apart: that is the point of moving it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg

from bench.common import OUT, Cluster, wait_healthy
from bench.intake import corpus, provision
from ledger.simulation import Traffic

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


async def load(url: str, bodies: list[str], start: int, count: int, concurrency: int) -> int:
    """POST `count` bodies (each made unique by its sequence number); returns the 2xx count."""
    ok = 0
    next_index = start
    end = start + count

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok, next_index
        while next_index < end:
            index = next_index
            next_index += 1
            body = bodies[index % len(bodies)].replace("__SEQ__", str(index))
            async with session.post(url, data=body, headers={
                    "Content-Type": "application/x-www-form-urlencoded"}) as response:
                await response.read()
                ok += 200 <= response.status < 300

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ok


async def projected(dsn: str, seconds: float = 120) -> None:
    """Until the registry's checkpoint has reached the chain's head."""
    connection = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(seconds):
            while True:
                if await connection.fetchval(
                    "SELECT c.position = h.position FROM projections.checkpoints c, "
                    "ledger.stream_heads h WHERE c.projection = 'registry' "
                    "AND h.stream = 'events'"
                ):
                    return
                await asyncio.sleep(0.1)
    finally:
        await connection.close()


def measure(
    tree: Path, settings: dict[str, str], dsn: str, port: int, bodies: list[str], offset: int,
    args: argparse.Namespace,
) -> tuple[float, float]:
    """(server CPU µs per delivery, projector child CPU µs per delivery) for one tree."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "LEDGER_DATABASE_URL": dsn,
           "LEDGER_LOG_LEVEL": args.log_level, "LEDGER_DATA_DIR": str(OUT / f"data-{port}"),
           **settings}
    log = (OUT / f"cpu-server-{port}.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "ledger", "serve", "--port", str(port)],
                               env=env, stdout=log, stderr=log, cwd=tree)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", 60)
        url = f"http://127.0.0.1:{port}/bitrix24/events"
        asyncio.run(load(url, bodies, offset, args.warmup, args.concurrency))
        asyncio.run(projected(dsn))  # a projector child has started and caught up
        kids = children(process.pid)
        before = cpu_seconds(process.pid)
        kids_before = {k: cpu_seconds(k) for k in kids}
        ok = asyncio.run(load(url, bodies, offset + args.warmup, args.deliveries,
                              args.concurrency))
        used = cpu_seconds(process.pid) - before
        kids_used = sum(cpu_seconds(k) - v for k, v in kids_before.items()
                        if Path(f"/proc/{k}").exists())
        if ok != args.deliveries:
            raise SystemExit(f"{tree}: only {ok} of {args.deliveries} deliveries answered 2xx")
        return used / ok * 1e6, kids_used / ok * 1e6
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="append", required=True, help="name=DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log-level", default="INFO",
                        help="LEDGER_LOG_LEVEL of the servers (INFO: the default's log cost)")
    args = parser.parse_args()
    trees: list[tuple[str, Path, dict[str, str]]] = []
    for spec in args.tree:
        name, rest = spec.split("=", 1)
        path, *pairs = rest.split(",")
        trees.append((name, Path(path), dict(p.split("=", 1) for p in pairs)))
    cluster = Cluster()
    traffic = Traffic(seed=42, portals=20, churn=False)
    tokens = {p.member_id: p.token for p in traffic.portals}
    bodies = corpus(traffic, 5000).read_text().splitlines()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in trees}
    try:
        database = asyncio.run(cluster.fresh_database("bench_cpu", migrate=True))
        service = cluster.dsn(database, user="ledger_app")
        asyncio.run(provision(service, tokens))
        offset = 0
        for round_ in range(args.rounds):
            order = trees if round_ % 2 == 0 else trees[::-1]
            for index, (name, tree, settings) in enumerate(order):
                results[name].append(measure(tree, settings, service, 9300 + index, bodies,
                                             offset, args))
                offset += args.warmup + args.deliveries
                print(f"round {round_ + 1} {name}: {results[name][-1][0]:.1f} µs/delivery "
                      f"(+{results[name][-1][1]:.1f} in children)", flush=True)
    finally:
        cluster.stop()
    base = statistics.median(r[0] for r in results[trees[0][0]])
    print(f"\nserver CPU per delivery, median of {args.rounds} rounds, "
          f"{args.deliveries} deliveries, {args.concurrency} connections:")
    for name, _, _ in trees:
        server = statistics.median(r[0] for r in results[name])
        kids = statistics.median(r[1] for r in results[name])
        print(f"  {name:24} {server:7.1f} µs  ({server / base:.2f}x of {trees[0][0]}, "
              f"{base - server:+.1f} µs saved); children {kids:.1f} µs")


if __name__ == "__main__":
    main()
