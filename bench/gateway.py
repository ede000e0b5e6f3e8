"""Gateway mode's cost to intake: ledger without routes vs with one route, same run.

    python -m bench.gateway [--seconds 10] [--connections 64] [--rounds 2] [--baseline-src DIR]

Both configurations serve the same bodies from `wrk` on the same PostgreSQL; the route forwards
every delivery to an aiohttp hello-world destination on 127.0.0.1 (answering 200 at once).
Rounds alternate (without, with, without, with…) so that a noisy machine hurts both alike;
the ratio of the medians is what to read. CPU is read from /proc with the shared meter
(`bench.proc`): serve's whole process tree (intake, forwarder child, projector…) and the
PostgreSQL cluster, per event stored; the forwarder process is also shown apart. Each measured
interval starts once the server and cluster have settled after the warm-up. `--baseline-src`
(a checkout of another revision, e.g. `git archive main | tar -x -C DIR`) adds that code's
configurations, in the same rounds. Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
from pathlib import Path

import orjson

from bench.common import OUT, Cluster, record
from bench.intake import corpus, provision, run_wrk, serve, stop
from bench.proc import CpuMeter, postmaster_pid, tree_cpu_seconds
from ledger.gateway import admin as routes_admin
from ledger.settings import Settings, TrustPolicy
from ledger.simulation import Traffic
from ledger.storage.store import EventStore, create_pool

DESTINATION_PORT = 9121


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
        return tree_cpu_seconds(pid)
    except (OSError, ValueError, KeyError):
        return 0.0


def preemptions(pid: int) -> float:
    """How often the intake's event loop (serve's main thread, one worker) was preempted so
    far: the forwarder and the destination compete with it for the cores."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return float(line.split()[1])
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
    postmaster = asyncio.run(postmaster_pid(cluster.admin_dsn))
    unsettled = 0
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
                # the baseline's own children too: serve starts its sidecars (the forwarder)
                # with `python -m ledger`, which imports from the current directory first
                process = serve([*command, "serve", "--port", str(port)], env, port, cwd=source)
                try:
                    url = f"http://127.0.0.1:{port}/bitrix24/events"
                    run_wrk(url, bodies, 2, args.connections)  # warm-up
                    meter = CpuMeter(process.pid, postmaster)
                    unsettled += not meter.settle()
                    before = meter.sample()
                    before_forwarder = forwarder_cpu_seconds(data_dir)
                    before_preempted = preemptions(process.pid)
                    result = run_wrk(url, bodies, args.seconds, args.connections)
                    spent = meter.sample() - before
                    stored = max(1.0, result["requests"] - result["non_2xx"])
                    result["cpu_ms"] = spent.server * 1000 / stored
                    result["forwarder_ms"] = (
                        forwarder_cpu_seconds(data_dir) - before_forwarder) * 1000 / stored
                    result["pg_ms"] = (spent.postgres or 0.0) * 1000 / stored
                    result["preempted"] = (
                        preemptions(process.pid) - before_preempted) * 1000 / stored
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
        "| ledger | round | events/s | p50 ms | p99 ms | non-2xx | server CPU ms/event "
        "| of it forwarder | PostgreSQL CPU ms/event | forwards pending at the end "
        "| intake preempted per 1k events |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in rates.items():
        for i, r in enumerate(runs):
            lines.append(f"| {name} | {i + 1} | {r['rate']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['non_2xx']:.0f} | {r['cpu_ms']:.3f} | "
                         f"{r['forwarder_ms']:.3f} | {r['pg_ms']:.3f} | {r['backlog']:.0f} | "
                         f"{r['preempted']:.0f} |")
    cpu = {n: statistics.median(r["cpu_ms"] for r in runs) for n, runs in rates.items()}
    both = {n: statistics.median(r["cpu_ms"] + r["pg_ms"] for r in runs)
            for n, runs in rates.items()}
    lines += [
        "",
        f"- one route / no route, throughput (medians): "
        f"**{median['one route'] / median['no route']:.2f}x** (target >= 0.85x)",
        f"- server CPU per event (intake, forwarder and every other child), one route / no "
        f"route (medians): **{cpu['one route'] / cpu['no route']:.2f}x**; with PostgreSQL's: "
        f"**{both['one route'] / both['no route']:.2f}x** (the destination and wrk, on the "
        "same cores here, are not counted)",
    ]
    if "one route, baseline" in median:
        lines.append(
            f"- baseline revision ({args.baseline_src.name}), one route / no route: throughput "
            f"**{median['one route, baseline'] / median['no route, baseline']:.2f}x**, "
            f"server CPU per event "
            f"**{cpu['one route, baseline'] / cpu['no route, baseline']:.2f}x**"
        )
    if postmaster is None:
        lines.append("- PostgreSQL CPU not measured: its postmaster is not visible from here")
    if unsettled:
        lines.append(f"- {unsettled} measured interval(s) began before the server and "
                     "PostgreSQL had settled (15 s at most): their CPU includes that catch-up")
    record("Gateway mode: intake with one route", lines)


if __name__ == "__main__":
    main()
