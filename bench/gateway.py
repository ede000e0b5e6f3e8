"""Gateway mode's cost to intake: ledger without routes vs with one route, same run.

    python -m bench.gateway [--seconds 10] [--connections 64] [--rounds 2]

Both configurations serve the same bodies from `wrk` on the same PostgreSQL; the route forwards
every delivery to an aiohttp hello-world destination on 127.0.0.1 (answering 200 at once).
Rounds alternate (without, with, without, with…) so that a noisy machine hurts both alike;
the ratio of the medians is what to read. Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench.common import OUT, Cluster, record
from bench.intake import corpus, provision, run_wrk, serve, stop
from ledger.gateway import admin as routes_admin
from ledger.settings import Settings, TrustPolicy
from ledger.simulation import Traffic
from ledger.storage.store import EventStore, create_pool

DESTINATION_PORT = 9121


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def add_route(dsn: str, port: int) -> None:
    pool = await create_pool(dsn, size=2)
    try:
        settings = Settings(port=port, forward_plain_http_hosts="127.0.0.1")
        await routes_admin.add_route(
            EventStore(pool, policy=TrustPolicy.ALLOWLIST), settings, member_id=None,
            url=f"http://127.0.0.1:{DESTINATION_PORT}/bitrix24/events", actor="bench",
        )
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    cluster = Cluster()
    traffic = Traffic(seed=42, portals=20, churn=False)
    tokens = {p.member_id: p.token for p in traffic.portals}
    bodies = corpus(traffic, 20_000)
    python = sys.executable
    destination = serve([python, "-m", "bench.servers", "hello", "--port",
                         str(DESTINATION_PORT)], {}, DESTINATION_PORT)
    rates: dict[str, list[dict[str, float]]] = {"no route": [], "one route": []}
    try:
        for round_ in range(args.rounds):
            for name, port in (("no route", 9122), ("one route", 9123)):
                database = asyncio.run(cluster.fresh_database(f"bench_gw_{port}", migrate=True))
                service = cluster.dsn(database, user="ledger_app")
                asyncio.run(provision(service, tokens))
                if name == "one route":
                    asyncio.run(add_route(service, port))
                data_dir = OUT / f"gateway-{port}-{round_}"
                shutil.rmtree(data_dir, ignore_errors=True)
                env = {"LEDGER_DATABASE_URL": service, "LEDGER_LOG_LEVEL": "WARNING",
                       "LEDGER_DATA_DIR": str(data_dir),
                       "LEDGER_FORWARD_PLAIN_HTTP_HOSTS": "127.0.0.1"}
                process = serve([python, "-m", "ledger", "serve", "--port", str(port)], env,
                                port)
                try:
                    url = f"http://127.0.0.1:{port}/bitrix24/events"
                    run_wrk(url, bodies, 2, args.connections)  # warm-up
                    before = cpu_seconds(process.pid)
                    result = run_wrk(url, bodies, args.seconds, args.connections)
                    stored = result["requests"] - result["non_2xx"]
                    result["cpu_ms"] = (cpu_seconds(process.pid) - before) * 1000 / stored
                    rates[name].append(result)
                finally:
                    stop(process)
    finally:
        stop(destination)
        cluster.stop()

    median = {n: statistics.median(r["rate"] for r in runs) for n, runs in rates.items()}
    lines = [
        f"`python -m bench.gateway --seconds {args.seconds} --connections {args.connections} "
        f"--rounds {args.rounds}`; wrk -t2, the intake benchmark's bodies; rounds alternate. "
        "The machine is shared with other jobs: read the ratio, not the absolute numbers.",
        "",
        "| ledger | round | events/s | p50 ms | p99 ms | non-2xx | ledger CPU ms/event |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in rates.items():
        for i, r in enumerate(runs):
            lines.append(f"| {name} | {i + 1} | {r['rate']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['non_2xx']:.0f} | {r['cpu_ms']:.2f} |")
    cpu = {n: statistics.median(r["cpu_ms"] for r in runs) for n, runs in rates.items()}
    lines += [
        "",
        f"- one route / no route, throughput (medians): "
        f"**{median['one route'] / median['no route']:.2f}x** (target >= 0.85x)",
        f"- ledger process CPU per event, one route / no route (medians): "
        f"**{cpu['one route'] / cpu['no route']:.2f}x** (the destination, on the same two "
        "cores here, is not counted)",
    ]
    record("Gateway mode: intake with one route", lines)


if __name__ == "__main__":
    main()
