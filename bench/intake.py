"""Intake throughput: aiohttp hello-world vs a naive one-INSERT intake vs ledger, one run.

    python -m bench.intake [--seconds 10] [--connections 64]

Same machine, same PostgreSQL, same payload mix (simulated bot events, each made unique), load
from `wrk` (apt-get install wrk). Prints events/s, p50/p99/p99.9 and the ratios, and appends them
to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import OUT, Cluster, record, wait_healthy
from ledger import wire
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.operations import change_trust
from ledger.settings import TrustPolicy
from ledger.simulation import Traffic
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange

LUA = Path(__file__).parent / "post.lua"


def corpus(traffic: Traffic, size: int) -> Path:
    """Bot events (trust is provisioned up front), each with a __SEQ__ slot."""
    path = OUT / "bodies.txt"
    lines: list[str] = []
    while len(lines) < size:
        delivery = traffic.next()
        if delivery.document["event"] in (INSTALL, UNINSTALL, UPDATE):
            continue
        body = wire.http_build_query(delivery.document).decode()
        lines.append(body + "&data%5BBENCH_SEQ%5D=__SEQ__")
    path.write_text("\n".join(lines) + "\n")
    return path


async def provision(dsn: str, tokens: dict[str, str]) -> None:
    pool = await create_pool(dsn, size=2)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    for member_id, token in tokens.items():
        await change_trust(store, TrustChange.PROVISIONED, member_id=member_id, token=token,
                           actor="bench")
    await pool.close()


def run_wrk(url: str, bodies: Path, seconds: int, connections: int) -> dict[str, float]:
    threads = "2"
    command = ["wrk", "-t", threads, "-c", str(connections), "-d", f"{seconds}s",
               "--timeout", "10s", "-s", str(LUA), url, "--", str(bodies)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    result["rate"] = (result["requests"] - result["non_2xx"]) / result["seconds"]
    return result


def serve(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    log = (OUT / f"server-{port}.log").open("wb")
    process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log)
    wait_healthy(f"http://127.0.0.1:{port}/healthz")
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    cluster = Cluster()
    traffic = Traffic(seed=42, portals=20, churn=False)
    tokens = {p.member_id: p.token for p in traffic.portals}
    bodies = corpus(traffic, 20_000)
    python = sys.executable
    results: dict[str, dict[str, float]] = {}
    try:
        for name, port in (("hello-world", 9101), ("naive intake", 9102),
                           ("ledger", 9103), ("ledger, projector off", 9104),
                           ("ledger, 2 workers", 9105)):
            env: dict[str, str] = {}
            if name == "hello-world":
                argv = [python, "-m", "bench.servers", "hello", "--port", str(port)]
            elif name == "naive intake":
                database = asyncio.run(cluster.fresh_database("bench_naive", migrate=False))
                argv = [python, "-m", "bench.servers", "naive", "--port", str(port),
                        "--dsn", cluster.dsn(database)]
            else:
                database = asyncio.run(cluster.fresh_database("bench_ledger", migrate=True))
                service = cluster.dsn(database, user="ledger_app")
                asyncio.run(provision(service, tokens))
                workers = "2" if "2 workers" in name else "1"
                argv = [python, "-m", "ledger", "serve", "--port", str(port),
                        "--workers", workers]
                env = {"LEDGER_DATABASE_URL": service, "LEDGER_LOG_LEVEL": "WARNING",
                       "LEDGER_RUN_PROJECTOR": "false" if "off" in name else "true"}
            process = serve(argv, env, port)
            try:
                url = f"http://127.0.0.1:{port}/bitrix24/events"
                run_wrk(url, bodies, 2, args.connections)  # warm-up
                results[name] = run_wrk(url, bodies, args.seconds, args.connections)
            finally:
                stop(process)
    finally:
        cluster.stop()

    hello, naive = results["hello-world"], results["naive intake"]
    ledger = max((r for n, r in results.items() if n.startswith("ledger")),
                 key=lambda r: r["rate"])
    lines = [
        f"`python -m bench.intake --seconds {args.seconds} --connections {args.connections}`; "
        "wrk -t2, bodies: 20k simulated bot events (v1/v2 messages, edits, commands, joins, "
        "deletions), each made unique.",
        "",
        "| server | events/s | p50 ms | p99 ms | p99.9 ms | non-2xx |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['rate']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['p999_ms']:.2f} | {r['non_2xx']:.0f} |")
    lines += [
        "",
        "Ratios use the best ledger configuration above.",
        f"- ledger / hello-world ceiling: **{ledger['rate'] / hello['rate']:.2f}x** "
        "(target >= 0.8x)",
        f"- ledger / naive intake: **{ledger['rate'] / naive['rate']:.2f}x** (target >= 3x)",
        f"- ledger p99: **{ledger['p99_ms']:.1f} ms** (target <= 10 ms)",
    ]
    record("Intake throughput", lines)


if __name__ == "__main__":
    main()
