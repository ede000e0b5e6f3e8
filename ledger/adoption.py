"""Spools of worker numbers no process runs: adopted and drained by a running worker.

Each worker spools to a directory of its own (`worker-N`) and drains it itself. A worker number
that no longer runs — `serve --workers` lowered, a worker that failed for good — left its
deliveries, answered 202, in a spool nobody drained: acknowledged and never stored. Every worker
now looks, every `spool_retry_seconds`, for other numbers' spools with undrained records whose
lock (`ledger.spool.claim`) no process holds. It takes that lock for one pass (drain steps for
up to `PASS_SECONDS`), drains exactly as that worker's own drain would — in spool order, each
draft after the other workers' journal entries it was judged behind (this worker's included),
that worker's journal entries and doubts settled as its own drain settles them
(`ledger.offline.Appender`'s `drains_for`) — and lets go. The lock makes one drainer at a time;
the worker number, when it runs again, waits for the pass to end (`ledger.spool.claim_own`) and
reads the drained marker after it: nothing drains twice. What it found is reported (`absent`):
/readyz (`spool.absent_workers`) and `ledger_spool_absent_bytes`/`_oldest_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ledger.committer import GroupCommitter
from ledger.metrics import Metrics
from ledger.offline import Appender, OfflineTrust
from ledger.spool import Scanned, Spool, claim, holder_of, undrained, worker_of
from ledger.storage.store import EventStore

log = logging.getLogger(__name__)

PASS_SECONDS = 1.0  # drain steps of one pass: the lock is let go between passes


@dataclass(frozen=True)
class Absent:
    """A spool with undrained records whose worker number no process runs."""

    worker: int
    bytes: int
    oldest: datetime | None
    drained_by: int | None  # the worker draining it at the last look (None: none then)
    error: str | None = None  # why it could not be adopted at the last look (None: it could)

    def as_json(self) -> dict[str, int | float | str | None]:
        age = (datetime.now(UTC) - self.oldest).total_seconds() if self.oldest else None
        return {"worker": self.worker, "bytes": self.bytes,
                "oldest_seconds": round(age, 3) if age is not None else None,
                "drained_by": self.drained_by, "error": self.error}


class SpoolAdopter:
    """One worker's adoption of absent workers' spools (see the module)."""

    def __init__(self, root: Path, *, worker: int, store: EventStore, offline: OfflineTrust,
                 gate: Callable[[], Awaitable[bool]], max_bytes: int, max_events: int,
                 retry_seconds: float, append_timeout: float | None,
                 metrics: Metrics | None = None) -> None:
        """`store`: an event store of its own (its appends run beside the worker's committer's);
        `gate`: PostgreSQL reachable with the current schema (as the committer's)."""
        self._root = root
        self._worker = worker
        self._store = store
        self._offline = offline
        self._gate = gate
        self._max_bytes = max_bytes
        self._max_events = max_events
        self._retry_seconds = retry_seconds
        self._append_timeout = append_timeout
        self._metrics = metrics
        # per adopted worker number: its drain's state (retries, a culprit looked for one draft
        # at a time) lasts across passes, as in its own committer; dropped once it is empty
        self._drains: dict[int, GroupCommitter] = {}
        # per adopted worker number: what the last pass left of its log, checked (`Scanned`):
        # the next pass opens it without reading it again while the file is unchanged
        self._scanned: dict[int, Scanned] = {}
        self.absent: dict[int, Absent] = {}  # as of the last look
        self._failed: dict[int, str] = {}  # spools that could not be adopted: why (logged once)

    async def run(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.look()

    async def look(self) -> None:
        """Adopt, for one pass each, the spools no process holds; note every absent one."""
        found: dict[int, Absent] = {}
        for directory in sorted(self._root.glob("worker-*")):
            number = worker_of(directory)
            if number is None or number == self._worker or not directory.is_dir():
                continue
            try:
                absent = await self._look_at(directory, number)
            except Exception as exc:  # noqa: BLE001 - one spool that fails stops no other
                # (it raised out of the task: every worker's adoption crash-looped on it —
                # readiness failing everywhere — and the spools after it were never drained)
                reason = f"{type(exc).__name__}: {exc}"
                if self._failed.get(number) != reason:
                    log.error("worker %d's spool %s cannot be adopted (%s): it stays as it is "
                              "until it is repaired or moved aside; the other spools are "
                              "adopted meanwhile", number, directory, reason)
                self._failed[number] = reason
                self._drains.pop(number, None)
                self._scanned.pop(number, None)
                found[number] = Absent(number, 0, None, None, error=reason)
                continue
            if self._failed.pop(number, None) is not None:
                log.warning("worker %d's spool %s can be adopted again", number, directory)
            if absent is not None:
                found[number] = absent
        self.absent = found

    async def _look_at(self, directory: Path, number: int) -> Absent | None:
        """Adopt `directory` for one pass if no process holds it; what is left undrained."""
        size, oldest = await asyncio.to_thread(undrained, directory)
        if not size:
            self._drains.pop(number, None)
            self._scanned.pop(number, None)
            return None
        fd = await asyncio.to_thread(claim, directory, holder=self._worker)
        if fd is None:  # its worker runs — or another worker adopted it for this pass
            self._scanned.pop(number, None)  # it may write the log: read it again next time
            holder = await asyncio.to_thread(holder_of, directory)
            if holder is not None and holder["worker"] != number:
                return Absent(number, size, oldest, holder["worker"])
            return None
        try:
            await self._drain(directory, number)
        finally:
            os.close(fd)
        size, oldest = await asyncio.to_thread(undrained, directory)
        if size:
            return Absent(number, size, oldest, None)
        self._drains.pop(number, None)
        self._scanned.pop(number, None)
        return None

    async def _drain(self, directory: Path, number: int) -> None:
        spool = await asyncio.to_thread(Spool, directory, max_bytes=self._max_bytes,
                                        scanned=self._scanned.pop(number, None))
        drain = self._drains.get(number)
        if drain is None:
            log.warning("worker %d's spool %s holds %d deliveries and no worker %d runs: "
                        "worker %d drains it", number, directory, spool.records, number,
                        self._worker)
            drain = self._drains[number] = GroupCommitter(
                Appender(self._store, self._offline, drains_for=number),
                max_events=self._max_events, max_delay=0, metrics=self._metrics,
                retry_seconds=self._retry_seconds, gate=self._gate,
                append_timeout=self._append_timeout)
        await drain.drain_adopted(spool, PASS_SECONDS)
        if spool.has_pending() and (scanned := await asyncio.to_thread(spool.scanned)):
            self._scanned[number] = scanned
        if not spool.has_pending():
            log.info("worker %d's spool %s drained by worker %d", number, directory,
                     self._worker)
