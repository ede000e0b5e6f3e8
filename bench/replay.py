"""Reading the store back: raw cursor replay vs `ledger verify` vs projection rebuild.

    python -m bench.replay [--events 200000]

Fills a fresh store with simulated bot events (appended in batches through the real append
path), then replays it three ways in one run and prints rows/s and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

import orjson

from bench.common import Cluster, record
from bench.intake import provision
from ledger import integrity, wire
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.intake import Delivery, IntakeService
from ledger.models import EventDraft
from ledger.projections.projector import Projector
from ledger.settings import Settings
from ledger.simulation import Traffic
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, create_pool


async def fill(store: EventStore, settings: Settings, traffic: Traffic, count: int) -> float:
    intake = IntakeService(settings, committer=None)  # type: ignore[arg-type]  # drafts only
    began, appended = time.perf_counter(), 0
    while appended < count:
        drafts: list[EventDraft] = []
        while len(drafts) < 1000:
            delivery = traffic.next()
            if delivery.document["event"] in (INSTALL, UNINSTALL, UPDATE):
                continue
            body = wire.http_build_query(delivery.document)
            drafts.append(intake.draft(Delivery(body, wire.FORM, "", "127.0.0.1"),
                                       datetime.now(UTC)))
        await store.append(drafts)
        appended += len(drafts)
    return time.perf_counter() - began


async def raw_replay(store: EventStore) -> tuple[int, float]:
    began, rows = time.perf_counter(), 0
    async with store.chain_snapshot("events") as snapshot:
        async for batch in snapshot.batches(1000):
            for row in batch:
                orjson.loads(row["payload"])
            rows += len(batch)
    return rows, time.perf_counter() - began


async def run(events: int) -> None:
    cluster = Cluster()
    try:
        traffic = Traffic(seed=7, portals=50, churn=False)
        tokens = {p.member_id: p.token for p in traffic.portals}
        database = await cluster.fresh_database("bench_replay", migrate=True)
        dsn = cluster.dsn(database, user="ledger_app")
        await provision(dsn, tokens)
        settings = Settings(database_url=dsn)
        pool = await create_pool(dsn, size=4)
        store = EventStore(pool, policy=settings.trust_policy)
        fill_seconds = await fill(store, settings, traffic, events)
        rows, raw = await raw_replay(store)
        began = time.perf_counter()
        report = await integrity.verify_stream(store, "events")
        verify = time.perf_counter() - began
        assert report.problem is None, report.problem
        writer = await create_pool(cluster.dsn(database, user="ledger_projector"), size=2)
        projector = Projector(EventStore(writer, policy=settings.trust_policy),
                              ProjectionStore(writer))
        began = time.perf_counter()
        await projector.rebuild()
        rebuild = time.perf_counter() - began
        await writer.close()
        await pool.close()
    finally:
        cluster.stop()
    lines = [
        f"`python -m bench.replay --events {events}`: {rows} stored events "
        f"(filled at {events / fill_seconds:.0f}/s through draft + batched append).",
        "",
        "| read | rows/s | vs raw replay |",
        "|---|---:|---:|",
        f"| raw cursor replay (orjson payload) | {rows / raw:.0f} | 1.00x |",
        f"| ledger verify (chain recomputed) | {rows / verify:.0f} | {raw / verify:.2f}x "
        "(target >= 0.5x) |",
        f"| ledger rebuild (fold + swap) | {rows / rebuild:.0f} | {raw / rebuild:.2f}x "
        "(target >= 0.6x) |",
    ]
    record("Replay: verify and rebuild vs raw cursor replay", lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    asyncio.run(run(parser.parse_args().events))


if __name__ == "__main__":
    main()
