"""Reading the store back: raw cursor replay vs `ledger verify` vs projection rebuild.

    python -m bench.replay [--events 200000] [--rounds 3] [--no-record]

Fills a fresh store with simulated bot events (appended in batches through the real append
path), then replays it in one run, in interleaved rounds: raw cursor replay (every column, each
payload parsed), `ledger verify`, `ledger rebuild` (folding the fold records, migration 0011),
and the rebuild as it was before fold records (every payload parsed: the baseline). Each is
timed by the clock and by CPU — this process's and the PostgreSQL backends' of this database,
from /proc — so a noisy machine can still be compared by ratios. Also prints what computing
the fold record adds to the intake, per delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.common import Cluster, record
from bench.intake import provision
from ledger import foldrecord, integrity, wire
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.intake import Delivery, IntakeService
from ledger.models import EventDraft
from ledger.projections import fold, rows
from ledger.projections.fold import State
from ledger.projections.projector import REGISTRY, Projector
from ledger.settings import Settings
from ledger.simulation import Traffic
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, Pool, create_pool

# the rebuild's read before migration 0011: every payload, parsed
_PAYLOAD_COLUMNS = ("position, member_id, event_type, origin, bot_ids, occurred_at, received_at, "
                    "payload, hash")


class Intake:
    """CPU spent drafting, and in the fold record's share of it."""

    def __init__(self) -> None:
        self.drafts = 0
        self.draft_seconds = 0.0
        self.documents: list[tuple[str, Any]] = []


async def fill(
    store: EventStore, settings: Settings, traffic: Traffic, count: int, intake_cost: Intake
) -> float:
    intake = IntakeService(settings, committer=None)  # type: ignore[arg-type]  # drafts only
    began, appended = time.perf_counter(), 0
    while appended < count:
        drafts: list[EventDraft] = []
        while len(drafts) < 1000:
            delivery = traffic.next()
            if delivery.document["event"] in (INSTALL, UNINSTALL, UPDATE):
                continue
            body = wire.http_build_query(delivery.document)
            cpu = time.process_time()
            draft = intake.draft(Delivery(body, wire.FORM, "", "127.0.0.1"), datetime.now(UTC))
            intake_cost.draft_seconds += time.process_time() - cpu
            intake_cost.drafts += 1
            if len(intake_cost.documents) < 20_000:
                intake_cost.documents.append((draft.event_type, orjson.loads(draft.payload)))
            drafts.append(draft)
        await store.append(drafts)
        appended += len(drafts)
    return time.perf_counter() - began


def fold_record_seconds(documents: list[tuple[str, Any]], repeat: int = 5) -> float:
    """CPU seconds per delivery of `foldrecord.stored` (what drafts.py adds), best of `repeat`."""
    best = float("inf")
    for _ in range(repeat):
        cpu = time.process_time()
        for event_type, document in documents:
            foldrecord.stored(event_type, "bitrix24", document)
        best = min(best, (time.process_time() - cpu) / len(documents))
    return best


async def raw_replay(store: EventStore) -> int:
    rows_read = 0
    async with store.chain_snapshot("events") as snapshot:
        async for batch in snapshot.batches(1000):
            for row in batch:
                orjson.loads(row["payload"])
            rows_read += len(batch)
    return rows_read


async def rebuild_from_payloads(pool: Pool, events: EventStore) -> None:
    """The rebuild as it was before fold records: read every payload, parse it, fold, swap."""
    projections = ProjectionStore(pool)
    async with projections.batch(REGISTRY) as batch:
        head, head_hash = await events.head()
        state = State()
        async with pool.acquire() as connection, connection.transaction(
            isolation="repeatable_read", readonly=True
        ):
            cursor = await connection.cursor(
                f"SELECT {_PAYLOAD_COLUMNS} FROM ledger.events WHERE position > $2 "
                "AND position <= $1 ORDER BY position", head, 0)
            while records := await cursor.fetch(2000):
                for record_ in records:
                    fold.apply(state, rows.event(dict(record_)))
        await batch.replace(rows.all_rows(state), head, head_hash)


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 10 ms


async def _backends(pool: Pool, database: str) -> list[int]:
    async with pool.acquire() as connection:
        found = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
    return [int(r["pid"]) for r in found]


async def measured(
    run: Callable[[], Awaitable[Any]], pool: Pool, database: str
) -> tuple[float, float, float]:
    """Wall seconds, this process's CPU seconds, and the database backends' CPU seconds."""
    pids = await _backends(pool, database)
    before = {p: _cpu_of(p) for p in pids}
    cpu, wall = time.process_time(), time.perf_counter()
    await run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    backend = 0.0
    for pid in await _backends(pool, database):
        try:
            backend += _cpu_of(pid) - before.get(pid, 0.0)
        except OSError:
            continue
    return wall, cpu, backend


async def run(events: int, rounds: int, keep: bool) -> None:
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
        intake_cost = Intake()
        fill_seconds = await fill(store, settings, traffic, events, intake_cost)
        record_cpu = fold_record_seconds(intake_cost.documents)
        intake_cost.documents.clear()  # a large live heap would slow every later GC pass
        writer = await create_pool(cluster.dsn(database, user="ledger_projector"), size=2)
        writer_store = EventStore(writer, policy=settings.trust_policy)
        projector = Projector(writer_store, ProjectionStore(writer))
        rows_read = 0

        async def raw() -> None:
            nonlocal rows_read
            rows_read = await raw_replay(store)

        async def verify() -> None:
            report = await integrity.verify_stream(store, "events")
            assert report.problem is None, report.problem

        async def rebuild() -> None:
            await projector.rebuild()

        async def rebuild_old() -> None:
            await rebuild_from_payloads(writer, writer_store)

        phases = {"raw": (raw, pool), "verify": (verify, pool), "rebuild": (rebuild, writer),
                  "rebuild_old": (rebuild_old, writer)}
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in phases}
        order = list(phases)
        for round_ in range(rounds):
            for name in order[round_ % len(order):] + order[:round_ % len(order)]:
                job, used = phases[name]
                results[name].append(await measured(job, used, database))
        await writer.close()
        await pool.close()
    finally:
        cluster.stop()

    def ratio(name: str, index: int | None) -> float:
        """Median over rounds of raw / name (wall when index is None, else CPU summed)."""
        values = []
        for base, other in zip(results["raw"], results[name], strict=True):
            if index is None:
                values.append(base[0] / other[0])
            else:
                values.append((base[1] + base[2]) / (other[1] + other[2]))
        return statistics.median(values)

    def rate(name: str) -> float:
        return rows_read / statistics.median(r[0] for r in results[name])

    def per_row(name: str, index: int) -> float:
        return statistics.median(r[index] for r in results[name]) / rows_read * 1e6

    labels = {"raw": "raw cursor replay (orjson payload)",
              "verify": "ledger verify (chain recomputed)",
              "rebuild": "ledger rebuild (fold records + swap)",
              "rebuild_old": "rebuild as before 0011 (payloads parsed + swap)"}
    targets = {"raw": "", "verify": " (target >= 0.5x)", "rebuild": " (target >= 1.0x)",
               "rebuild_old": " (baseline)"}
    draft_us = intake_cost.draft_seconds / intake_cost.drafts * 1e6
    lines = [
        f"`python -m bench.replay --events {events} --rounds {rounds}`: {rows_read} stored "
        f"events (filled at {events / fill_seconds:.0f}/s through draft + batched append); "
        f"{rounds} interleaved rounds, medians. CPU = this process + the database's backends "
        "(/proc); a shared, noisy machine: read the ratios.",
        "",
        "| read | rows/s | vs raw (wall) | vs raw (CPU) | us/row here | us/row PostgreSQL |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in labels.items():
        lines.append(
            f"| {label} | {rate(name):.0f} | {ratio(name, None):.2f}x{targets[name]} | "
            f"{ratio(name, 1):.2f}x | {per_row(name, 1):.1f} | {per_row(name, 2):.1f} |")
    pairs = zip(results["rebuild_old"], results["rebuild"], strict=True)
    speedup = statistics.median(old[0] / new[0] for old, new in pairs)
    lines += [
        "",
        f"- rebuild with fold records / rebuild from payloads (wall): **{speedup:.2f}x** faster",
        f"- intake: the fold record costs {record_cpu * 1e6:.1f} us CPU per delivery "
        f"(the whole draft {draft_us:.0f} us here)",
    ]
    if keep:
        record("Replay: verify and rebuild vs raw cursor replay", lines)
    else:
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true",
                        help="print only; do not append to bench/RESULTS.md")
    options = parser.parse_args()
    asyncio.run(run(options.events, options.rounds, not options.no_record))


if __name__ == "__main__":
    main()
