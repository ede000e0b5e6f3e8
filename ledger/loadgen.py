"""Sending simulated deliveries to a ledger over HTTP, or writing them as a corpus.

Lifecycle events (install, uninstall) are fenced: they go out alone for their portal, after every
earlier delivery of that portal was answered — as Bitrix24's queue would have delivered them —
so that a message never races the install that makes its token valid.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ledger import wire
from ledger.envelope import INSTALL, UNINSTALL
from ledger.simulation import SimDelivery, Traffic

FENCED = {INSTALL, UNINSTALL}


@dataclass
class LoadReport:
    sent: int = 0
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        """Deliveries not answered 2xx (refused, or no answer at all: status 0)."""
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    def summary(self) -> str:
        return (
            f"{self.sent} deliveries in {self.seconds:.1f}s = {self.rate:.0f}/s; latency "
            f"p50 {self.percentile(50) * 1000:.1f} ms, p99 {self.percentile(99) * 1000:.1f} ms, "
            f"p99.9 {self.percentile(99.9) * 1000:.1f} ms; statuses {dict(self.statuses)}"
        )


class _PortalFence:
    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()
        self.idle = asyncio.Condition()

    async def wait_idle(self, member_id: str) -> None:
        async with self.idle:
            await self.idle.wait_for(lambda: self.in_flight[member_id] == 0)

    async def done(self, member_id: str) -> None:
        async with self.idle:
            self.in_flight[member_id] -= 1
            self.idle.notify_all()


async def send(
    url: str,
    traffic: Traffic,
    *,
    count: int,
    concurrency: int,
    rate: float | None = None,
    duration: float | None = None,
) -> LoadReport:
    """POST `count` deliveries (or until `duration`), at most `concurrency` at a time."""
    report = LoadReport()
    fence = _PortalFence()
    slots = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: aiohttp.ClientSession, delivery: SimDelivery) -> None:
        target = f"{url}?{delivery.query}" if delivery.query else url
        began = time.perf_counter()
        try:
            async with session.post(
                target, data=wire.http_build_query(delivery.document),
                headers={"Content-Type": wire.FORM},
            ) as response:
                await response.read()
                report.statuses[response.status] += 1
        except aiohttp.ClientError:
            report.statuses[0] += 1
        finally:
            report.latencies.append(time.perf_counter() - began)
            report.sent += 1
            slots.release()
            await fence.done(delivery.portal.member_id)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for index in range(count):
            elapsed = time.perf_counter() - start
            if duration is not None and elapsed >= duration:
                break
            if rate is not None and index / rate > elapsed:
                await asyncio.sleep(index / rate - elapsed)  # pacing, not waiting for a result
            delivery = traffic.next()
            member_id = delivery.portal.member_id
            fenced = delivery.document["event"] in FENCED
            if fenced:
                await fence.wait_idle(member_id)
            await slots.acquire()
            fence.in_flight[member_id] += 1
            task = asyncio.create_task(one(session, delivery))
            if fenced:
                await task
            else:
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    report.seconds = time.perf_counter() - start
    return report


def write_corpus(directory: Path, traffic: Traffic, count: int) -> int:
    """Write deliveries as files: NNNNNNNN.form (the body) and, when there is one, .query."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        delivery = traffic.next()
        stem = directory / f"{index:08d}"
        stem.with_suffix(".form").write_bytes(wire.http_build_query(delivery.document))
        if delivery.query:
            stem.with_suffix(".query").write_text(delivery.query)
    return count
