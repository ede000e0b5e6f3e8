"""The forwarder process's CPU per forward, in-process: this revision against another one.

    python -m bench.forwarder [--forwards 5000] [--rounds 3] [--rate N] [--baseline-src DIR]
                              [--profile]

Each run is a child process that seals `--forwards` simulated deliveries (the intake
benchmark's bodies, 20 portals, so 20 lanes) into an outbox for one route, then starts the
forwarder as `ledger forward` would (its event loop too) and counts this process's CPU time
(`time.process_time`), and PostgreSQL's (/proc), until every forward is delivered and its
attempt recorded. The destination is an aiohttp hello world in a process of its own (not
counted), as in `bench.gateway`. Runs of this revision and of `--baseline-src` (a checkout of
another revision: `git archive main | tar -x -C DIR`) alternate; read the ratio of the medians.
`--rate N` appends N forwards a second while the forwarder runs (as a serving intake does: each
poll finds a few, lanes go idle between) instead of all before; the appending thread's CPU is
not counted. `--profile` prints a cProfile of one run of this revision instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

DESTINATION_PORT = 9191


async def _child(
    dsn: str, outbox_dir: Path, forwards: int, rate: float, profiler: cProfile.Profile | None,
    postmaster: int,
) -> dict[str, float]:
    from bench.proc import tree_cpu_seconds
    from ledger import wire
    from ledger.gateway import admin as routes_admin
    from ledger.gateway.forwarder import Forwarder, outbox_key
    from ledger.gateway.outbox import OutboxWriter
    from ledger.settings import Settings, TrustPolicy
    from ledger.simulation import Traffic
    from ledger.storage.gateway_store import GatewayStore
    from ledger.storage.store import EventStore, create_pool

    settings = Settings(database_url=dsn, outbox_dir=outbox_dir, data_dir=outbox_dir.parent,
                        forward_plain_http_hosts="127.0.0.1", port=1)
    pool = await create_pool(dsn, size=2)
    try:
        route_id, _ = await routes_admin.add_route(
            EventStore(pool, policy=TrustPolicy.ALLOWLIST), settings, member_id=None,
            url=f"http://127.0.0.1:{DESTINATION_PORT}/bitrix24/events", actor="bench")
        key = outbox_key(settings)
        traffic = Traffic(seed=42, portals=20, churn=False)
        writer = OutboxWriter(settings.outbox_path, key)
        records: list[tuple[dict[str, Any], bytes]] = []
        for position in range(1, forwards + 1):
            delivery = traffic.next()
            records.append(({
                "routes": [route_id], "member_id": delivery.portal.member_id,
                "event_type": str(delivery.document["event"]), "position": position,
                "event_hash": f"{position:064x}", "dedup_key": f"{position:032x}",
                "content_type": "application/x-www-form-urlencoded",
                "raw_query": delivery.query, "accepted_at": time.time(),
            }, wire.http_build_query(delivery.document)))
        appending_cpu = [0.0]
        appending = threading.Thread(target=_append,
                                     args=(writer, records, rate, appending_cpu))
        if not rate:
            _append(writer, records, 0.0, appending_cpu)
        forwarder = Forwarder(settings, GatewayStore(pool), key)
        if profiler is not None:
            profiler.enable()
        began, began_cpu = time.perf_counter(), time.process_time()
        began_pg = tree_cpu_seconds(postmaster) if postmaster else 0.0
        await forwarder.start()
        if rate:
            appending.start()
        deadline = time.monotonic() + 600
        while _delivered(forwarder, route_id) < forwards or forwarder._records:
            if time.monotonic() > deadline:
                raise SystemExit("forwards not settled within 600 s")
            await asyncio.sleep(0.05)  # a poll: the forwarder offers no signal for this
        cpu, wall = time.process_time() - began_cpu, time.perf_counter() - began
        pg = (tree_cpu_seconds(postmaster) - began_pg) if postmaster else 0.0
        cpu -= appending_cpu[0] if rate else 0.0  # the intake's part, not the forwarder's
        if profiler is not None:
            profiler.disable()
        await forwarder.records_flushed()
        await forwarder.close()
        writer.close()
        outcomes: dict[str, int] = {r["outcome"]: r["count"] for r in await pool.fetch(
            "SELECT outcome, count(*) FROM ledger.forward_attempts GROUP BY outcome")}
        if outcomes.get("delivered") != forwards:
            raise SystemExit(f"{outcomes} of {forwards} forwards")
        return {"cpu_us": cpu * 1e6 / forwards, "wall_us": wall * 1e6 / forwards,
                "pg_us": pg * 1e6 / forwards,
                "failed": outcomes.get("failed", 0)}
    finally:
        await pool.close()


def _delivered(forwarder: Any, route_id: str) -> float:
    """Forwards delivered so far, by the forwarder's own metric."""
    return float(forwarder.registry.get_sample_value(
        "ledger_forward_attempts_total", {"route": route_id, "outcome": "delivered"}) or 0.0)


def _append(
    writer: Any, records: list[tuple[dict[str, Any], bytes]], rate: float, spent: list[float]
) -> None:
    """As the intake would: all at once, or `rate` records a second in 10 ms steps (adding
    this thread's CPU time to `spent`)."""
    if not rate:
        writer.append(records)
        return
    step = max(1, round(rate / 100))
    began = time.monotonic()
    for index in range(0, len(records), step):
        time.sleep(max(0.0, began + index / rate - time.monotonic()))  # the pace
        began_cpu = time.thread_time()
        writer.append(records[index : index + step])
        spent[0] += time.thread_time() - began_cpu


def _loop_factory() -> Any:
    """The event loop `ledger forward` runs on in the revision under test."""
    from ledger.cli import forwarding

    return getattr(forwarding, "new_event_loop", asyncio.new_event_loop)


def child(arguments: list[str]) -> None:
    dsn, outbox_dir, forwards, profile, rate, postmaster = (
        arguments[0], Path(arguments[1]), int(arguments[2]), arguments[3] == "1",
        float(arguments[4]), int(arguments[5]))
    profiler = cProfile.Profile() if profile else None
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        result = runner.run(_child(dsn, outbox_dir, forwards, rate, profiler, postmaster))
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    print(orjson.dumps(result).decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--forwards", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="append this many forwards a second while forwarding (as a "
                        "serving intake does), instead of all before")
    args = parser.parse_args()
    from bench.common import OUT, Cluster, record
    from bench.intake import serve, stop
    from bench.proc import postmaster_pid

    cluster = Cluster()
    postmaster = asyncio.run(postmaster_pid(cluster.admin_dsn))
    python = sys.executable
    destination = serve([python, "-m", "bench.servers", "hello", "--port",
                         str(DESTINATION_PORT)], {}, DESTINATION_PORT)
    revisions: list[tuple[str, Path | None]] = [("this revision", None)]
    if args.baseline_src is not None and not args.profile:
        revisions.append(("baseline", args.baseline_src.resolve()))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in revisions}
    try:
        for round_ in range(1 if args.profile else args.rounds):
            for name, source in revisions:
                database = asyncio.run(cluster.fresh_database("bench_forwarder", migrate=True))
                outbox_dir = OUT / f"forwarder-{round_}" / "outbox"
                shutil.rmtree(outbox_dir.parent, ignore_errors=True)
                path = [str(source)] if source is not None else []
                # this file by its path: the baseline's tree may have no bench.forwarder
                code = (f"import sys, runpy; sys.path[:0] = {path!r}; "
                        f"runpy.run_path({__file__!r})['child'](sys.argv[1:])")
                done = subprocess.run(
                    [python, "-c", code, cluster.dsn(database, user="ledger_app"),
                     str(outbox_dir), str(args.forwards), "1" if args.profile else "0",
                     str(args.rate), str(postmaster or 0)],
                    check=False, capture_output=True, text=True,
                    cwd=Path(__file__).parent.parent,
                )
                if done.returncode:
                    raise SystemExit(f"{name}, round {round_ + 1}: {done.stderr[-2000:]}")
                output = done.stdout
                if args.profile:
                    print(output)
                results[name].append(orjson.loads(output.strip().splitlines()[-1]))
    finally:
        stop(destination)
        cluster.stop()
    if args.profile:
        return
    cpu = {n: statistics.median(r["cpu_us"] for r in runs) for n, runs in results.items()}
    lines = [
        f"`python -m bench.forwarder --forwards {args.forwards} --rounds {args.rounds} "
        f"--rate {args.rate:g}`: the forwarder's own CPU per forward (process_time, "
        "in-process; the destination not counted) and PostgreSQL's (its processes, /proc), "
        "revisions alternating.",
        "",
        "| forwarder | round | CPU µs/forward | PostgreSQL CPU µs/forward | wall µs/forward "
        "| failed attempts |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        lines += [f"| {name} | {i + 1} | {r['cpu_us']:.1f} | {r['pg_us']:.1f} | "
                  f"{r['wall_us']:.1f} | "
                  f"{r['failed']:.0f} |" for i, r in enumerate(runs)]
    if "baseline" in cpu:
        lines += ["", f"- this revision / baseline, CPU per forward (medians): "
                  f"**{cpu['this revision'] / cpu['baseline']:.2f}x**"]
    record("Gateway mode: forwarder CPU per forward", lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
