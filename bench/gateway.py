"""Gateway mode's cost to intake: ledger without routes vs with one route, same run.

    python -m bench.gateway [--seconds 10] [--connections 64] [--rounds 2] [--baseline-src DIR]

Both configurations serve the same bodies from `wrk` on the same PostgreSQL; the route forwards
every delivery to an aiohttp hello-world destination on 127.0.0.1 (answering 200 at once).
Rounds alternate (without, with, without, with…) so that a noisy machine hurts both alike;
the ratio of the medians is what to read. CPU is read from /proc: the intake (serve's own
process) apart from the forwarder process. `--baseline-src` (a checkout of
another revision, e.g. `git archive main | tar -x -C DIR`) adds a third configuration, one route
served by that code, in the same rounds. Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
from pathlib import Path

import orjson

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


def forwarder_backlog(data_dir: Path) -> float:
    """Forwards pending, as serve's forwarder process last published it."""
    try:
        status = orjson.loads((data_dir / "outbox" / "forwarder.json").read_bytes())
        return float(sum(r["backlog"] for r in status["routes"]))
    except (OSError, ValueError, KeyError):
        return 0.0


def forwarder_cpu_seconds(data_dir: Path) -> float:
    """CPU time so far of serve's forwarder process (its pid from the status it publishes);
    0 for a revision without one."""
    try:
        pid = int(orjson.loads((data_dir / "outbox" / "forwarder.json").read_bytes())["pid"])
        return cpu_seconds(pid)
    except (OSError, ValueError, KeyError):
        return 0.0


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
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="another revision's source tree: one route served by it, too")
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
    configurations = [("no route", 9122, None), ("one route", 9123, None)]
    if args.baseline_src is not None:
        source = args.baseline_src.resolve()
        configurations += [("no route, baseline", 9125, source),
                           ("one route, baseline", 9124, source)]
    rates: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configurations}
    try:
        for round_ in range(args.rounds):
            for name, port, source in configurations:
                database = asyncio.run(cluster.fresh_database(f"bench_gw_{port}", migrate=True))
                service = cluster.dsn(database, user="ledger_app")
                asyncio.run(provision(service, tokens))
                if name.startswith("one route"):
                    asyncio.run(add_route(service, port))
                data_dir = OUT / f"gateway-{port}-{round_}"
                shutil.rmtree(data_dir, ignore_errors=True)
                env = {"LEDGER_DATABASE_URL": service, "LEDGER_LOG_LEVEL": "WARNING",
                       "LEDGER_DATA_DIR": str(data_dir),
                       "LEDGER_FORWARD_PLAIN_HTTP_HOSTS": "127.0.0.1"}
                command = [python, "-m", "ledger"]
                if source is not None:  # ahead of the current directory `-m` would search first
                    command = [python, "-c", f"import sys, runpy; sys.path.insert(0, "
                               f"{str(source)!r}); runpy.run_module('ledger', "
                               "run_name='__main__')"]
                    env |= {"PYTHONDONTWRITEBYTECODE": "1"}
                process = serve([*command, "serve", "--port", str(port)], env, port)
                try:
                    url = f"http://127.0.0.1:{port}/bitrix24/events"
                    run_wrk(url, bodies, 2, args.connections)  # warm-up
                    before = cpu_seconds(process.pid)
                    before_children = forwarder_cpu_seconds(data_dir)
                    result = run_wrk(url, bodies, args.seconds, args.connections)
                    stored = result["requests"] - result["non_2xx"]
                    result["cpu_ms"] = (cpu_seconds(process.pid) - before) * 1000 / stored
                    result["child_cpu_ms"] = (
                        forwarder_cpu_seconds(data_dir) - before_children) * 1000 / stored
                    result["backlog"] = forwarder_backlog(data_dir)
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
        "| ledger | round | events/s | p50 ms | p99 ms | non-2xx | intake CPU ms/event "
        "| + forwarder process | forwards pending at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in rates.items():
        for i, r in enumerate(runs):
            lines.append(f"| {name} | {i + 1} | {r['rate']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['non_2xx']:.0f} | {r['cpu_ms']:.3f} | "
                         f"{r['cpu_ms'] + r['child_cpu_ms']:.3f} | {r['backlog']:.0f} |")
    cpu = {n: statistics.median(r["cpu_ms"] for r in runs) for n, runs in rates.items()}
    both = {n: statistics.median(r["cpu_ms"] + r["child_cpu_ms"] for r in runs)
            for n, runs in rates.items()}
    lines += [
        "",
        f"- one route / no route, throughput (medians): "
        f"**{median['one route'] / median['no route']:.2f}x** (target >= 0.85x)",
        f"- intake process CPU per event, one route / no route (medians): "
        f"**{cpu['one route'] / cpu['no route']:.2f}x**; with the forwarder process: "
        f"**{both['one route'] / both['no route']:.2f}x** (the destination, on the same "
        "cores here, is not counted)",
    ]
    if "one route, baseline" in median:
        lines.append(
            f"- baseline revision ({args.baseline_src.name}), one route / no route: throughput "
            f"**{median['one route, baseline'] / median['no route, baseline']:.2f}x**, "
            f"intake CPU per event "
            f"**{cpu['one route, baseline'] / cpu['no route, baseline']:.2f}x**"
        )
    record("Gateway mode: intake with one route", lines)


if __name__ == "__main__":
    main()
