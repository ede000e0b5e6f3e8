"""Genuine deliveries while hostile senders flood the intake, against a baseline, in one run.

    python -m bench.hostile [--seconds 10]

Starts a real `ledger serve` (one worker) on 127.0.0.1, then measures the latency of genuine
deliveries (simulated bot events, one sender, one at a time) first alone, then while two senders
post worst-case bodies back to back (the bodies that cost the decoder most before it refuses
them). Then sends 600 bodies with distinct 1 MB keys and reports the server's RSS before and
after. Appends the result to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp

from bench.common import Cluster, record
from bench.intake import provision, serve, stop
from ledger import wire
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.simulation import Traffic

PORT = 9131
URL = f"http://127.0.0.1:{PORT}/bitrix24/events"
FORM = "application/x-www-form-urlencoded"


def worst_bodies() -> list[tuple[str, bytes, str]]:
    """What costs the decoder most, each just under the 1 MiB body limit."""
    limit = 1024 * 1024 - 1
    return [
        ("10k keys, 31 levels each",
         "&".join("a" + "[]" * 31 + "=1" for _ in range(10_000)).encode()[:limit], FORM),
        ("unique 30-level keys",
         "&".join(f"k{i}" + "".join(f"[s{i}x{j}]" for j in range(30)) + "=1"
                  for i in range(10_000)).encode()[:limit], FORM),
        ("10k flat fields", "&".join(f"f{i}=v" for i in range(10_000)).encode(), FORM),
        ("JSON, 100k values",
         (b"{" + b",".join(b'"k%d":1' % i for i in range(100_000)) + b"}")[:limit] + b"}",
         "application/json"),
        ("JSON, 1000 levels", b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}", "application/json"),
    ]


def genuine(traffic: Traffic, count: int) -> list[bytes]:
    bodies: list[bytes] = []
    for n in itertools.count():
        if len(bodies) >= count:
            break
        document = traffic.next().document
        if document["event"] in (INSTALL, UNINSTALL, UPDATE):
            continue
        bodies.append(wire.http_build_query(document) + b"&data%5BBENCH_SEQ%5D=" + b"%d" % n)
    return bodies


async def measure(session: aiohttp.ClientSession, bodies: list[bytes],
                  seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds
    for body in itertools.cycle(bodies):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        async with session.post(URL, data=body, headers={"Content-Type": FORM}) as response:
            await response.read()
            failures += response.status != 200
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, failures


def flood(seconds: float) -> dict[str, int]:
    """One hostile sender (a process of its own, so that it does not slow the measuring one)."""
    return asyncio.run(_flood(time.monotonic() + seconds))


async def _flood(stop_at: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        for name, body, content_type in itertools.cycle(worst_bodies()):
            if time.monotonic() > stop_at:
                break
            async with session.post(URL, data=io.BytesIO(body),
                                    headers={"Content-Type": content_type}) as response:
                await response.read()
                key = f"{name}: {response.status}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def long_keys(session: aiohttp.ClientSession, count: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    for i in range(count):
        body = (b"%d" % i).ljust(1_000_000, b"k") + b"=1"
        async with session.post(URL, data=io.BytesIO(body),
                                headers={"Content-Type": FORM}) as response:
            await response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
    return statuses


async def run(seconds: float, pid: int) -> list[str]:
    traffic = Traffic(seed=7, portals=5, churn=False)
    bodies = genuine(traffic, 5000)
    async with aiohttp.ClientSession() as session:
        await measure(session, bodies[:200], 1)  # warm-up
        baseline, base_failures = await measure(session, bodies, seconds)
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(2) as senders:
            floods = [loop.run_in_executor(senders, flood, seconds) for _ in range(2)]
            flooded, flood_failures = await measure(session, bodies, seconds)
            counts: dict[str, int] = {}
            for done in await asyncio.gather(*floods):
                for key, value in done.items():
                    counts[key] = counts.get(key, 0) + value
        before = rss_mib(pid)
        statuses = await long_keys(session, 600)
        after = rss_mib(pid)
    return [
        f"`python -m bench.hostile --seconds {seconds:g}`: one genuine sender (simulated bot "
        "events, sequential), then the same while two senders post worst-case bodies back to "
        "back. A shared, noisy 2-core machine (other sessions were running): read the ratios.",
        "",
        "| genuine deliveries | n | p50 ms | p99 ms | non-200 |",
        "|---|---:|---:|---:|---:|",
        f"| alone | {len(baseline)} | {pct(baseline, .5):.1f} | {pct(baseline, .99):.1f} "
        f"| {base_failures} |",
        f"| during the flood | {len(flooded)} | {pct(flooded, .5):.1f} | "
        f"{pct(flooded, .99):.1f} | {flood_failures} |",
        "",
        f"- p50 ratio **{pct(flooded, .5) / pct(baseline, .5):.2f}x**, p99 ratio "
        f"**{pct(flooded, .99) / pct(baseline, .99):.2f}x** (flood / alone)",
        "- flood answers: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
        f"- 600 bodies with distinct 1 MB keys ({statuses}): server RSS {before:.0f} MiB "
        f"before, {after:.0f} MiB after (**{after - before:+.0f} MiB**)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    cluster = Cluster()
    traffic = Traffic(seed=7, portals=5, churn=False)
    tokens = {p.member_id: p.token for p in traffic.portals}
    try:
        database = asyncio.run(cluster.fresh_database("bench_hostile", migrate=True))
        service = cluster.dsn(database, user="ledger_app")
        asyncio.run(provision(service, tokens))
        process = serve([sys.executable, "-m", "ledger", "serve", "--port", str(PORT)],
                        {"LEDGER_DATABASE_URL": service, "LEDGER_LOG_LEVEL": "ERROR"}, PORT)
        try:
            lines = asyncio.run(run(args.seconds, process.pid))
        finally:
            stop(process)
    finally:
        cluster.stop()
    record("Hostile intake: genuine latency under a worst-case flood", lines)


if __name__ == "__main__":
    main()
