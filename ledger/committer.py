"""Group commit: many concurrent deliveries, one durable transaction.

Each caller awaits the commit of the batch its draft went into. A batch is flushed when it holds
`max_events` drafts or `max_delay` seconds after its first draft arrived, whichever comes first;
while one batch commits the next one fills, so under load the delay is rarely waited out.
If PostgreSQL refuses a batch for a data reason, its drafts are retried one by one, so one bad
draft fails alone; if PostgreSQL is unavailable the whole batch fails with `DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from ledger.errors import AppendFailed, LedgerError
from ledger.metrics import Metrics
from ledger.models import Draft, Outcome

log = logging.getLogger(__name__)


class Appender(Protocol):
    async def append(self, drafts: Sequence[Draft]) -> list[Outcome]: ...


class CommitterClosed(LedgerError):
    """The service is shutting down and takes no new deliveries."""


_Pending = tuple[Draft, "asyncio.Future[Outcome]"]


class GroupCommitter:
    def __init__(
        self,
        appender: Appender,
        *,
        max_events: int,
        max_delay: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._appender = appender
        self._metrics = metrics
        self._max_events = max_events
        self._max_delay = max_delay
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # counters for metrics and benchmarks
        self.appended = 0
        self.progressed = asyncio.Event()  # set after every committed batch; readers clear it

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-committer")

    async def close(self) -> None:
        """Stop taking drafts, commit every one already taken, then return."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    async def submit(self, draft: Draft) -> Outcome:
        if self._closing:
            raise CommitterClosed("the ledger is shutting down; the delivery was not taken")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((draft, future))
        self._arrived.set()
        return await asyncio.shield(future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                continue
            if len(self._queue) < self._max_events and self._max_delay > 0 and not self._closing:
                deadline = loop.time() + self._max_delay
                while len(self._queue) < self._max_events and not self._closing:
                    self._arrived.clear()
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except TimeoutError:
                        break
            batch, self._queue = (
                self._queue[: self._max_events],
                self._queue[self._max_events :],
            )
            if not self._queue:
                self._arrived.clear()
            await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        drafts = [draft for draft, _ in batch]
        began = time.perf_counter()
        try:
            outcomes = await self._appender.append(drafts)
        except AppendFailed as exc:
            if len(batch) == 1:
                self._settle(batch, exc)
                return
            log.warning("batch of %d refused (%s); retrying one by one", len(batch), exc)
            for pending in batch:
                await self._commit([pending])
            return
        except LedgerError as exc:
            self._settle(batch, exc)
            return
        except Exception as exc:
            log.exception("append failed unexpectedly")
            self._settle(batch, exc)
            return
        self.batches += 1
        self.appended += len(batch)
        self.progressed.set()
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
            self._metrics.append_seconds.observe(time.perf_counter() - began)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    @staticmethod
    def _settle(batch: list[_Pending], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
