"""Group commit: many concurrent deliveries, one durable transaction.

Each caller awaits the commit of the batch its draft went into. Natural group commit: one batch
commits at a time, and the next one is whatever arrived meanwhile (at most `max_events`), taken
as soon as the committer is free — a draft that finds the committer idle is committed at once.
`max_delay` (0 by default) lets a batch wait that long for company, but only under load (drafts
were already waiting when the last commit ended), as PostgreSQL's `commit_delay` applies only
with `commit_siblings`: waiting for company nobody sends is pure latency (bench/RESULTS.md).
If PostgreSQL refuses a batch for a data reason, its drafts are retried one by one, so one bad
draft fails alone. If PostgreSQL is unavailable, the batch goes to the spool instead, and from
then on every batch does, until this task has drained the spool back into PostgreSQL — one task
does both, so nothing overtakes what waits.

Nothing in a batch can end this task: an unexpected exception while storing or spooling a batch
is logged, counted (`ledger_batch_failures_total`) and the batch retried one draft at a time; the
draft that still fails alone is answered `DeliveryNotStored` (503), its neighbours as usual. A
spooled record that cannot be read back, or that fails to drain again and again, is set aside for
an operator. Whatever still escapes (a bug in the loop itself) crashes `run`, whose supervisor
(`ledger.supervision`) calls `fail_pending` — every waiting sender gets a 503 — and runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ledger.errors import (
    AppendFailed,
    CommitterClosed,
    DatabaseUnavailable,
    DeliveryNotStored,
    LedgerError,
    LockWaitTimeout,
    SpoolFull,
    SpoolUnwritable,
    TaskCrashed,
)
from ledger.metrics import Metrics
from ledger.models import Draft, Outcome
from ledger.spool import Spool

log = logging.getLogger(__name__)


class Appender(Protocol):
    async def append(
        self, drafts: Sequence[Draft], *, draining: bool = False
    ) -> list[Outcome]: ...

    def spool_offline(
        self, drafts: Sequence[Draft], write: Callable[[list[Draft]], None]
    ) -> list[Outcome | LedgerError]:
        """Judge offline, `write` what is to be spooled, answer each draft (blocking): an
        outcome, or the error a draft not taken is answered with."""
        ...

    def drainable(self, drafts: Sequence[Draft]) -> int:
        """How many of these spooled drafts may drain now, in order (blocking)."""
        ...

    def set_aside(self, drafts: Sequence[Draft]) -> None:
        """These spooled drafts will never be stored: undo what they promised (blocking)."""
        ...

    def lost_from_spool(
        self, held: Callable[[set[tuple[str, str]]], set[tuple[str, str]]]
    ) -> None:
        """Spooled records were set aside unread: undo what the ones no longer in the spool
        promised (`held`: of some (portal, dedup key hex) pairs, those it still holds —
        `Spool.held_among`); blocking."""
        ...

    def give_up(self) -> None:
        """The append waited for was given up on (its batch is spooled next): it must hold
        nothing the spool needs (`ledger.offline.JournalTurn`)."""
        ...

    def in_doubt(self) -> bool:
        """Whether the batch spooled next may have been committed by its given-up append
        (`ledger.offline`): it is spooled even past the spool's limit — refused there, its
        portals' doubt went unrecorded while the commit could still land."""
        ...

    def drain_at_once(self) -> bool:
        """Whether the batch just spooled may have been committed (its portals' lifecycle is
        in doubt until it drains, `ledger.offline`): drain without the retry delay."""
        ...


_Pending = tuple[Draft, "asyncio.Future[Outcome]"]
Fault = Callable[[str], None]
_DRAIN_ATTEMPTS = 3  # unexpected failures of one spooled draft before it is set aside


class GroupCommitter:
    def __init__(
        self,
        appender: Appender,
        *,
        max_events: int,
        max_delay: float,
        metrics: Metrics | None = None,
        spool: Spool | None = None,
        retry_seconds: float = 1.0,
        gate: Callable[[], Awaitable[bool]] | None = None,
        append_timeout: float | None = None,
        fault: Fault | None = None,
    ) -> None:
        """`gate`, when given, must pass (PostgreSQL reachable and its schema current) before
        anything is appended directly or drained; until then everything is spooled.
        An append taking longer than `append_timeout` counts as PostgreSQL being unavailable:
        the batch is spooled (if it did commit after all, draining finds it a duplicate).
        `fault` (tests only) is called with "commit" before each batch and "drain" before each
        drain step, outside the per-batch handling: whatever it raises crashes `run`."""
        self._append_timeout = append_timeout
        self._appender = appender
        self._metrics = metrics
        self._spool = spool
        self._retry_seconds = retry_seconds
        self._next_attempt = 0.0
        self._drain_limit = max_events
        self._gate = gate
        self._max_events = max_events
        self._max_delay = max_delay
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._inflight: list[_Pending] = []
        self._fault = fault or _no_fault
        self._drain_failures = 0
        self._busy = False  # drafts were waiting when the last commit ended
        self.lingered = 0  # batches that waited up to `max_delay` for company
        self.progressed = asyncio.Event()  # set after every committed batch; readers clear it

    def start(self) -> None:
        """Run unsupervised (tools and tests that own the committer); `ledger serve` runs `run`
        under its supervisor instead."""
        self._task = asyncio.create_task(self.run(), name="group-committer")

    def finish(self) -> None:
        """Stop taking drafts; `run` returns once every one already taken is answered."""
        self._closing = True
        self._arrived.set()

    async def close(self) -> None:
        """Stop taking drafts, commit every one already taken, then return."""
        self.finish()
        if self._task is not None:
            await self._task

    def fail_pending(self, exc: BaseException) -> None:
        """After `run` crashed: answer every waiting sender (503), none is left waiting."""
        waiting = [*self._inflight, *self._queue]
        self._inflight, self._queue = [], []
        self._arrived.clear()
        self._settle(waiting, TaskCrashed(
            f"the ledger's committer failed ({type(exc).__name__}) and is restarting; "
            "the delivery was not acknowledged"
        ))

    def waiting(self) -> bool:
        """Whether the next batch is already waiting and will be appended (not spooled): the
        store then locks the head for it while the current batch commits
        (`EventStore.lock_ahead_when`)."""
        return bool(self._queue) and (self._spool is None or not self._spool.has_pending())

    async def submit(self, draft: Draft) -> Outcome:
        if self._closing:
            raise CommitterClosed("the ledger is shutting down; the delivery was not taken")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((draft, future))
        self._arrived.set()
        # no `asyncio.shield` (a future and two callbacks a delivery): a sender cancelled while
        # it waits cancels only its own future, which nothing here answers once it is done —
        # the draft is committed with its batch all the same
        return await future

    async def run(self) -> None:
        """Commit batches (and drain the spool) until `finish`ed and everything is answered."""
        loop = asyncio.get_running_loop()
        while True:
            if self._spool is not None and self._spool.has_pending():
                # asyncio.timeout, not wait_for: no task per wait, and no cancellation lost
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, self._next_attempt - loop.time())):
                        await self._arrived.wait()
                if loop.time() >= self._next_attempt:
                    self._fault("drain")
                    await self._drain_or_wait()
            else:
                await self._arrived.wait()
            if not self._queue:
                if self._closing:
                    await self._drain_before_exit()
                    return
                self._arrived.clear()
                continue
            if (self._busy and len(self._queue) < self._max_events and self._max_delay > 0
                    and not self._closing):
                self.lingered += 1
                deadline = loop.time() + self._max_delay
                while len(self._queue) < self._max_events and not self._closing:
                    self._arrived.clear()
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            await self._arrived.wait()
                    except TimeoutError:
                        break
            batch, self._queue = (
                self._queue[: self._max_events],
                self._queue[self._max_events :],
            )
            if not self._queue:
                self._arrived.clear()
            self._inflight = batch
            self._fault("commit")
            await self._commit(batch)
            self._inflight = []
            self._busy = bool(self._queue)

    async def _open(self) -> bool:
        """Whether PostgreSQL may be written (the gate is tried at most every retry interval)."""
        if self._gate is None:
            return True
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_attempt:
            return False
        if await self._gate():
            self._gate = None
            return True
        self._next_attempt = loop.time() + self._retry_seconds
        return False

    async def _commit(self, batch: list[_Pending]) -> None:
        if self._spool is not None and (self._spool.has_pending() or not await self._open()):
            await self._spool_batch(batch)  # keep order: nothing overtakes what is spooled
            return
        drafts = [draft for draft, _ in batch]
        began = time.perf_counter()
        try:
            outcomes = await self._append_within(drafts)
        except AppendFailed as exc:
            if len(batch) == 1:
                self._settle(batch, exc)
                return
            log.warning("batch of %d refused (%s); retrying one by one", len(batch), exc)
            for pending in batch:
                await self._commit([pending])
            return
        except (DatabaseUnavailable, TimeoutError) as exc:
            await self._fall_back(batch, exc)
            return
        except LedgerError as exc:
            self._settle(batch, exc)
            return
        except Exception as exc:  # noqa: BLE001 - logged and counted in _failed
            await self._failed("append", batch, exc, self._commit)
            return
        self.progressed.set()
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
            self._metrics.append_seconds.observe(time.perf_counter() - began)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def _append_within(
        self, drafts: Sequence[Draft], *, draining: bool = False
    ) -> list[Outcome]:
        """Append, giving up waiting after `append_timeout`.

        The append itself is not cancelled — cancelling a stalled connection waits on it too —
        it finishes or fails on its own; if it commits after all, draining the spooled copy
        finds a duplicate.
        """
        task = asyncio.ensure_future(self._appender.append(drafts, draining=draining))
        if self._append_timeout is None:
            return await task
        try:  # asyncio.timeout, not wait_for: no extra future, callback and loop turn a batch
            async with asyncio.timeout(self._append_timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            task.add_done_callback(_outcome_ignored)
            self._appender.give_up()
            raise

    async def _fall_back(self, batch: list[_Pending], exc: Exception) -> None:
        """PostgreSQL did not take the batch: spool it (or, without a spool, fail it)."""
        if self._spool is None:
            self._settle(batch, exc)
            return
        log.warning("PostgreSQL unavailable (%s): spooling %d deliveries", exc, len(batch))
        await self._spool_batch(batch)
        delay = 0.0 if self._appender.drain_at_once() else self._retry_seconds
        self._next_attempt = asyncio.get_running_loop().time() + delay

    async def _failed(
        self,
        stage: str,
        batch: list[_Pending],
        exc: Exception,
        again: Callable[[list[_Pending]], Awaitable[None]],
    ) -> None:
        """Something unexpected failed a batch: isolate the culprit one draft at a time; the
        draft that fails alone gets a 503 (whether it was committed is unknown, so it is not
        spooled either: a sender is never told 2xx for what may be unreadable)."""
        if self._metrics is not None:
            self._metrics.batch_failures.labels(stage).inc()
        if len(batch) > 1:
            log.error("%s of a batch of %d failed unexpectedly; retrying one by one",
                      stage, len(batch), exc_info=exc)
            for pending in batch:
                await again([pending])
            return
        (draft, _), = batch
        log.error("%s of one %s failed unexpectedly; it was not acknowledged", stage,
                  getattr(draft, "event_type", None) or "rejection", exc_info=exc)
        self._settle(batch, DeliveryNotStored(
            f"the ledger failed unexpectedly while storing this delivery ({type(exc).__name__});"
            " it was not acknowledged — the ledger's log has the details"
        ))

    async def _spool_batch(self, batch: list[_Pending]) -> None:
        """Judge offline (ledger.offline), write what passes (and the refusals) durably, answer.
        Nothing reaches the offline trust journal unless the spool write succeeded, so a batch
        that failed can be retried one draft at a time."""
        try:
            await self._spool_judged(batch)
        except Exception as exc:  # noqa: BLE001 - logged and counted in _failed
            await self._failed("spool", batch, exc, self._spool_batch)

    async def _spool_judged(self, batch: list[_Pending]) -> None:
        assert self._spool is not None
        write = (functools.partial(self._spool.append, past_limit=True)
                 if self._appender.in_doubt() else self._spool.append)
        try:
            results = await asyncio.to_thread(
                self._appender.spool_offline, [draft for draft, _ in batch], write
            )
        except (SpoolFull, SpoolUnwritable, LockWaitTimeout, OSError) as exc:
            log.error("cannot spool %d deliveries: %s", len(batch), exc)
            failure = (
                exc if isinstance(exc, LedgerError)
                else SpoolUnwritable(f"the spool cannot be written ({exc}); not taken")
            )
            self._settle(batch, failure)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, LedgerError):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def drain_adopted(self, spool: Spool, seconds: float) -> None:
        """Drain `spool` — another worker number's, whose lock the caller holds
        (`ledger.adoption`) — for up to `seconds`: until it is empty, or a step moves nothing
        (PostgreSQL away, a draft waiting on another worker's entry, a retry's delay)."""
        self._spool = spool
        if spool.corrupt_found:  # a torn tail moved aside as the spool was opened
            await asyncio.to_thread(self.forget_lost)
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while spool.has_pending() and loop.time() < end:
            before = spool.drained, spool.size
            await self._drain_or_wait()
            if (spool.drained, spool.size) == before:
                return

    def forget_lost(self) -> None:
        """What the spool's records set aside unread (or torn) promised offline is undone
        (`Appender.lost_from_spool`); blocking."""
        assert self._spool is not None
        self._appender.lost_from_spool(self._spool.held_among)

    async def _drain_or_wait(self) -> None:
        try:
            await self._drain()
        except LockWaitTimeout as exc:  # the journal's holder stalled: an outage, tried later
            log.warning("spool not drained now: %s", exc)
            self._next_attempt = asyncio.get_running_loop().time() + self._retry_seconds

    async def _drain(self) -> None:
        """Move one batch from the spool into PostgreSQL (in order, idempotently)."""
        assert self._spool is not None
        if not await self._open():
            return
        pending = await asyncio.to_thread(self._spool.read, self._drain_limit)
        if pending.unreadable is not None:
            # its journal entries (an install's or uninstall's) would stay open for good; it is
            # skipped as unreadable already, so this is done first (and again if it fails)
            await asyncio.to_thread(self.forget_lost)
            await asyncio.to_thread(self._spool.quarantine, pending, pending.unreadable)
            self.progressed.set()
            return
        # a draft whose trust waits on another worker's spooled lifecycle event drains after it
        ready = await asyncio.to_thread(self._appender.drainable, pending.drafts)
        if ready == 0:
            self._next_attempt = asyncio.get_running_loop().time() + self._retry_seconds
            return
        if ready < len(pending.drafts):
            pending = await asyncio.to_thread(self._spool.read, ready)
        try:
            await self._append_within(pending.drafts, draining=True)
        except (DatabaseUnavailable, TimeoutError):
            self._next_attempt = asyncio.get_running_loop().time() + self._retry_seconds
            return
        except Exception as exc:  # AppendFailed, or anything else: logged and counted here
            if not isinstance(exc, AppendFailed):
                log.error("draining %d spooled deliveries failed unexpectedly",
                          len(pending.drafts), exc_info=exc)
                if self._metrics is not None:
                    self._metrics.batch_failures.labels("drain").inc()
            if len(pending.drafts) > 1:
                self._drain_limit = 1  # find the culprit one draft at a time
                return
            if not isinstance(exc, AppendFailed):
                self._drain_failures += 1
                if self._drain_failures < _DRAIN_ATTEMPTS:  # perhaps passing: try it again
                    loop = asyncio.get_running_loop()
                    self._next_attempt = loop.time() + self._retry_seconds
                    return
            # a spooled draft PostgreSQL refuses (or that fails the append every time) cannot
            # be answered any more: keep it for an operator instead of blocking every later one,
            # and let no provisional trust it carried outlive it
            await asyncio.to_thread(self._appender.set_aside, pending.drafts)
            await asyncio.to_thread(self._spool.quarantine, pending, str(exc))
            self._drain_limit = self._max_events
            self._drain_failures = 0
            self.progressed.set()
            return
        self._drain_failures = 0
        await asyncio.to_thread(self._spool.mark_drained, pending)
        self.progressed.set()
        log.info("drained %d spooled deliveries into PostgreSQL", len(pending.drafts))

    async def _drain_before_exit(self) -> None:
        while self._spool is not None and self._spool.has_pending():
            before = self._spool.drained, self._spool.size
            await self._drain_or_wait()
            if (self._spool.drained, self._spool.size) == before:
                log.warning("PostgreSQL still unavailable: %d deliveries stay spooled in %s",
                            self._spool.records, self._spool.directory)
                return

    @staticmethod
    def _settle(batch: list[_Pending], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)


def _no_fault(step: str) -> None:
    """Production: nothing is injected."""


def _outcome_ignored(task: asyncio.Future[list[Outcome]]) -> None:
    """An append we stopped waiting for ended; what it did is settled by draining."""
    if not task.cancelled() and task.exception() is not None:
        log.info("an append given up on ended with %s", task.exception())
