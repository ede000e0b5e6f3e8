"""Keeping the projections up to date, rebuilding them, and folding to a point in time.

The checkpoint drives reads: the projector folds every event after its checkpoint, in position
order, and commits the changed rows and the new checkpoint together. NOTIFY only wakes it
(`storage.notifications`); a periodic poll covers a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

from ledger.asof import AsOf, Occurred, Position, Received
from ledger.errors import LedgerError
from ledger.projections import fold, rows
from ledger.projections.fold import State
from ledger.storage.projection_store import EventRow, ProjectionStore
from ledger.storage.store import EventStore

log = logging.getLogger(__name__)

REGISTRY = "registry"
PROJECTIONS = (REGISTRY,)


class Projector:
    def __init__(
        self,
        events: EventStore,
        projections: ProjectionStore,
        *,
        batch_size: int = 10_000,
        snapshot_every: int | None = None,
    ) -> None:
        """`snapshot_every`: save the fold state every N events, so that answers as of a
        moment fold from the nearest snapshot instead of from position 0."""
        self._events = events
        self._projections = projections
        self._batch_size = batch_size
        self._snapshot_every = snapshot_every
        self._last_snapshot: int | None = None
        self._wake = asyncio.Event()
        self._advanced = asyncio.Condition()
        self.checkpoint = 0
        self.head = 0
        self.last_progress = time.monotonic()

    @property
    def lag(self) -> int:
        return max(0, self.head - self.checkpoint)

    def stalled(self, after_seconds: float) -> bool:
        return self.lag > 0 and time.monotonic() - self.last_progress > after_seconds

    async def catch_up(self) -> int:
        """Fold every event committed so far; returns how many were applied.

        One transaction per `batch_size` events, each reading the stream's head as it locks
        the checkpoint: a catch-up that folds fewer than that is done in one (the projector
        process runs one per gather of commits; each round trip is CPU on both sides)."""
        applied = 0
        while True:
            async with self._projections.batch(REGISTRY) as batch:
                self.head = batch.head
                events = await batch.events(batch.head, self._batch_size)
                if not events:
                    self.checkpoint = batch.checkpoint
                    break
                bot_keys, whole, portals = rows.needs(events)
                state = rows.state_of(await batch.load(bot_keys, whole, portals),
                                      batch.checkpoint)
                await _fold(state, events, batch.payloads)
                last = events[-1]
                await batch.save(rows.changed_rows(state), last[0], last[7])
                self.checkpoint = batch.checkpoint
            applied += len(events)
            if len(events) < self._batch_size:
                break  # at the head read in that transaction
        if applied or self.lag == 0:
            self.last_progress = time.monotonic()
        if applied and self._snapshot_every:
            await self._maybe_snapshot()
        async with self._advanced:
            self._advanced.notify_all()
        return applied

    async def wait_for(self, position: int) -> None:
        """Until the projections include `position` (bound it with asyncio.timeout)."""
        async with self._advanced:
            await self._advanced.wait_for(lambda: self.checkpoint >= position)

    async def _maybe_snapshot(self) -> None:
        assert self._snapshot_every
        if self._last_snapshot is None:
            self._last_snapshot = await self._projections.latest_snapshot(REGISTRY)
        if self.checkpoint - self._last_snapshot < self._snapshot_every:
            return
        async with self._projections.batch(REGISTRY) as batch:  # consistent with its checkpoint
            state = rows.state_of(await batch.load_all(), batch.checkpoint)
            await batch.save_snapshot(zlib.compress(fold.dump_state(state), 1))
            self._last_snapshot = batch.checkpoint
        log.info("saved a fold snapshot at position %d", self._last_snapshot)

    def wake(self) -> None:
        self._wake.set()

    async def run(
        self, *, poll_seconds: float = 5.0, gather_seconds: float = 0.0,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        """Catch up whenever woken (`wake`, on NOTIFY) or every `poll_seconds`, until cancelled.

        Wake-ups closer than `gather_seconds` are merged: one catch-up then folds the events of
        several commits (each costs round trips and a transaction whatever it folds).
        The database being away is waited out here; anything else raises, for the supervisor
        (`ledger.supervision`) to log, count and restart. `fault` (tests only) is called with
        "catch_up" before each catch-up and may raise to crash the loop from the inside."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            self._wake.clear()
            if fault is not None:
                fault("catch_up")
            try:
                await self.catch_up()
            except LedgerError as exc:
                log.warning("projector could not catch up: %s", exc)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the wake-up does, and shutdown would wait for ever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_seconds):
                    await self._wake.wait()
            # pacing: at most one catch-up per gather window, holding every commit in it
            await asyncio.sleep(max(0.0, began + gather_seconds - loop.time()))

    async def fold_to(
        self, as_of: int | AsOf, on_progress: Callable[[int], None] = lambda n: None
    ) -> State:
        return await fold_to(self._projections, as_of, on_progress)

    async def _fold(
        self, state: State, position: int, on_progress: Callable[[int], None]
    ) -> State:
        return await fold_range(self._projections, state, position, on_progress)

    async def rebuild(
        self, on_start: Callable[[int], None] = lambda total: None,
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> int:
        """Replay from position 0 and swap the result in atomically; returns the position.

        Python's cycle collector is paused while it folds (`ledger rebuild` runs nothing
        else): the fold makes no reference cycles, but the state it grows is what each full
        collection scans again (and the rows written, built from it) — 15-20 % of the CPU
        of a rebuild of 190k events."""
        with _collector_paused():
            async with self._projections.batch(REGISTRY) as batch:  # holds off the live projector
                head, head_hash = await self._events.head()
                on_start(head)
                state = await self._fold(State(), head, on_progress)
                await batch.replace(rows.all_rows(state), head, head_hash)
            self._last_snapshot = 0
        self.checkpoint = self.head = head
        return head


async def fold_to(
    projections: ProjectionStore, as_of: int | AsOf,
    on_progress: Callable[[int], None] = lambda n: None,
) -> State:
    """The projections as of a position, a received time or a Bitrix24 time, folded in memory
    from the store (nothing written, so any role that reads may ask), starting from the latest
    snapshot that holds nothing later than that.

    By time, the events folded are exactly those received (or that happened) by then, in
    position order — not a prefix of positions: spooled deliveries keep their received time
    but get later positions, and portals' clocks differ.
    """
    if isinstance(as_of, int):
        as_of = Position(as_of)
    if isinstance(as_of, Position):
        saved = await projections.snapshot_before(REGISTRY, as_of.position)
        state = fold.load_state(zlib.decompress(saved[1])) if saved else State()
        return await fold_range(projections, state, as_of.position, on_progress)
    occurred = isinstance(as_of, Occurred)
    assert isinstance(as_of, Occurred | Received)
    saved = await projections.snapshot_by_time(REGISTRY, as_of.at, occurred=occurred)
    state = fold.load_state(zlib.decompress(saved[1])) if saved else State()
    async with projections.stream_events_by_time(
        as_of.at, occurred=occurred, after=state.position
    ) as stream:
        async for batch in stream:
            await _fold(state, batch, stream.payloads)
            on_progress(len(batch))
    return state


async def fold_range(
    projections: ProjectionStore, state: State, position: int,
    on_progress: Callable[[int], None] = lambda n: None,
) -> State:
    """Fold the events after `state.position` up to `position` into `state`, by their fold
    records (payloads parsed only where an event has no usable one)."""
    async with projections.stream_events(position, after=state.position) as stream:
        async for batch in stream:
            await _fold(state, batch, stream.payloads)
            on_progress(len(batch))
    return state


async def _fold(
    state: State, batch: Sequence[EventRow],
    payloads: Callable[[Sequence[int]], Awaitable[Mapping[int, str]]],
) -> None:
    """Fold store rows in order. Rows stored without a fold record come with their payload;
    from the first row whose record is not usable (another version, not a record) on, those
    that came without theirs get them, in one more read."""
    folded = rows.fold_rows(state, batch)
    if folded < len(batch):
        rest = batch[folded:]
        found = await payloads([row[0] for row in rest if row[9] is None])
        rows.fold_with_payloads(state, rest, found)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """`gc.disable()` for the block, restored after (it may have been off already)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
