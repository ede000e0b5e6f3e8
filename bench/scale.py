"""At scale: read-API page latency, export memory, and append latency on a big store vs empty.

    python -m bench.scale [--events 1000000]

The store is filled quickly through the real append path (chain, dedup, trust) from one drafted
delivery varied per event — the intake's per-delivery decoding is measured by bench.intake.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import resource
import statistics
import time
from datetime import UTC, datetime

from aiohttp.test_utils import TestClient, TestServer

from bench.common import Cluster, record
from bench.intake import provision
from ledger import exports, wire
from ledger.audit import AuditService, new_token
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.hashing import sha256
from ledger.intake import Delivery, IntakeService
from ledger.models import EventDraft
from ledger.settings import Settings
from ledger.simulation import Traffic
from ledger.storage.audit_store import AuditStore, EventFilter
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, create_pool
from ledger.web import create_app


def templates(traffic: Traffic, settings: Settings, count: int) -> list[EventDraft]:
    intake = IntakeService(settings, committer=None)  # type: ignore[arg-type]  # drafts only
    made: list[EventDraft] = []
    while len(made) < count:
        delivery = traffic.next()
        if delivery.document["event"] in (INSTALL, UNINSTALL, UPDATE):
            continue
        body = wire.http_build_query(delivery.document)
        made.append(intake.draft(Delivery(body, wire.FORM, "", "10.0.0.1"), datetime.now(UTC)))
    return made


def vary(draft: EventDraft, n: int) -> EventDraft:
    payload = draft.payload[:-1] + b',"bench_seq":"' + str(n).encode() + b'"}'
    return dataclasses.replace(
        draft, payload=payload, payload_sha256=sha256(payload),
        dedup_key=sha256(draft.dedup_key + n.to_bytes(8, "big")),
        received_at=datetime.now(UTC),
    )


async def fill(store: EventStore, base: list[EventDraft], count: int) -> float:
    began, n = time.perf_counter(), 0
    while n < count:
        batch = [vary(base[(n + i) % len(base)], n + i) for i in range(min(2000, count - n))]
        await store.append(batch)
        n += len(batch)
        if n % 200_000 < 2000:
            print(f"  filled {n}", flush=True)
    return time.perf_counter() - began


async def append_latency(store: EventStore, base: list[EventDraft], start: int) -> list[float]:
    samples = []
    for i in range(300):
        draft = vary(base[i % len(base)], start + i)
        began = time.perf_counter()
        await store.append([draft])
        samples.append((time.perf_counter() - began) * 1000)
    return samples


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def run(events: int) -> None:
    cluster = Cluster()
    lines: list[str] = []
    try:
        traffic = Traffic(seed=9, portals=50, churn=False)
        tokens = {p.member_id: p.token for p in traffic.portals}
        empty_db = await cluster.fresh_database("bench_empty", migrate=True)
        big_db = await cluster.fresh_database("bench_big", migrate=True)
        for db in (empty_db, big_db):
            await provision(cluster.dsn(db, user="ledger_app"), tokens)
        settings = Settings(database_url=cluster.dsn(big_db, user="ledger_app"),
                            run_projector=False)
        base = templates(traffic, settings, 500)

        empty_pool = await create_pool(cluster.dsn(empty_db, user="ledger_app"), size=2)
        empty = await append_latency(EventStore(empty_pool, policy=settings.trust_policy),
                                     base, 0)
        await empty_pool.close()

        pool = await create_pool(settings.database_url.get_secret_value(), size=4)  # type: ignore[union-attr]
        store = EventStore(pool, policy=settings.trust_policy)
        seconds = await fill(store, base, events)
        big = await append_latency(store, base, events)
        lines += [
            f"`python -m bench.scale --events {events}`: filled {events} events in "
            f"{seconds:.0f}s ({events / seconds:.0f}/s through the append path).",
            "",
            "| single-event append | p50 ms | p99 ms |",
            "|---|---:|---:|",
            f"| empty store | {pct(empty, 50):.2f} | {pct(empty, 99):.2f} |",
            f"| {events} events | {pct(big, 50):.2f} | {pct(big, 99):.2f} |",
            f"- append p50 at {events} / empty: **{pct(big, 50) / pct(empty, 50):.2f}x** "
            "(target within 1.2x)",
        ]

        token, digest = new_token()
        await AuditStore(pool).create_token("bench", digest, "bench")
        async with TestClient(TestServer(create_app(settings))) as client:
            gc.collect()
            gc.freeze()  # as `ledger serve` does after start-up: long-lived objects out of GC
            for _ in range(5):  # warm-up: statement preparation, type introspection
                await client.get("/api/v1/events", params={"limit": "1000"},
                                 headers={"Authorization": f"Bearer {token}"})
            latencies = []
            step = max(1, events // 200)
            for after in range(0, events - 1000, step):
                began = time.perf_counter()
                response = await client.get(
                    "/api/v1/events", params={"after": str(after), "limit": "1000"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                body = await response.read()
                latencies.append((time.perf_counter() - began) * 1000)
                assert response.status == 200, body[:200]
        worst = sorted(range(len(latencies)), key=latencies.__getitem__)[-4:]
        print("slowest pages (index, ms):", [(i, round(latencies[i], 1)) for i in worst])
        lines += [
            "",
            f"Read API, `GET /api/v1/events?after=…&limit=1000` on {events} events "
            f"({len(latencies)} pages): p50 {pct(latencies, 50):.1f} ms, "
            f"p99 **{pct(latencies, 99):.1f} ms** (target <= 20 ms), "
            f"mean {statistics.mean(latencies):.1f} ms.",
        ]

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        began = time.perf_counter()
        with open(os.devnull, "w") as sink:  # noqa: ASYNC230 - /dev/null never blocks
            manifest = await exports.export_events(
                AuditService(store, ProjectionStore(pool), AuditStore(pool)), EventFilter(), sink,
                "jsonl",
            )
        export_seconds = time.perf_counter() - began
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lines += [
            "",
            f"Export of {manifest.rows} events as JSON Lines: {export_seconds:.0f}s "
            f"({manifest.rows / export_seconds:.0f}/s); "
            f"peak RSS grew by **{(rss_after - rss_before) / 1024:.0f} MiB** "
            f"(before {rss_before / 1024:.0f} MiB); manifest head {manifest.head_position} "
            f"{manifest.head_hash[:16]}….",
        ]
        await pool.close()
    finally:
        cluster.stop()
    record("Scale: append latency, read API pages, export memory", lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    asyncio.run(run(parser.parse_args().events))


if __name__ == "__main__":
    main()
