"""Keeping the projections up to date, rebuilding them, and folding to a point in time.

The checkpoint drives reads: the projector folds every event after its checkpoint, in position
order, and commits the changed rows and the new checkpoint together. NOTIFY only wakes it
(`storage.notifications`); a periodic poll covers a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable

from ledger.errors import LedgerError
from ledger.projections import fold
from ledger.projections.fold import State
from ledger.storage.notifications import listen_forever
from ledger.storage.projection_store import ProjectionStore
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
        batch_size: int = 1000,
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
        """Fold every event committed so far; returns how many were applied."""
        self.head, _ = await self._events.head()
        applied = 0
        while True:
            async with self._projections.batch(REGISTRY) as batch:
                events = await batch.events(self.head, self._batch_size)
                if not events:
                    self.checkpoint = batch.checkpoint
                    break
                bot_keys: set[tuple[str, int]] = set()
                whole: set[str] = set()
                for event in events:
                    keys, portals = fold.needs(event)
                    bot_keys |= keys
                    whole |= portals
                state = await batch.load(bot_keys, whole, {e.member_id for e in events})
                for event in events:
                    fold.apply(state, event)
                await batch.save(state, events[-1].position)
                self.checkpoint = batch.checkpoint
            applied += len(events)
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
            state = await batch.load_all()
            await batch.save_snapshot(zlib.compress(fold.dump_state(state), 1))
            self._last_snapshot = batch.checkpoint
        log.info("saved a fold snapshot at position %d", self._last_snapshot)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, listen_dsn: str, *, poll_seconds: float = 5.0) -> None:
        """Catch up whenever woken (NOTIFY) or every `poll_seconds`, until cancelled."""
        listener = asyncio.create_task(
            listen_forever(listen_dsn, "ledger_events", self.wake), name="projector-listen"
        )
        try:
            while True:
                try:
                    await self.catch_up()
                except LedgerError as exc:
                    log.warning("projector could not catch up: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll_seconds)
                self._wake.clear()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def fold_to(
        self, position: int, on_progress: Callable[[int], None] = lambda n: None
    ) -> State:
        """The projections as of `position`, folded in memory from the store (nothing written),
        starting from the nearest snapshot at or before it."""
        saved = await self._projections.snapshot_before(REGISTRY, position)
        state = fold.load_state(zlib.decompress(saved[1])) if saved else State()
        return await self._fold(state, position, on_progress)

    async def _fold(
        self, state: State, position: int, on_progress: Callable[[int], None]
    ) -> State:
        async for events in self._projections.stream_events(position, after=state.position):
            for event in events:
                fold.apply(state, event)
            on_progress(len(events))
        return state

    async def rebuild(
        self, on_start: Callable[[int], None] = lambda total: None,
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> int:
        """Replay from position 0 and swap the result in atomically; returns the position."""
        async with self._projections.batch(REGISTRY) as batch:  # holds off the live projector
            head, _ = await self._events.head()
            on_start(head)
            state = await self._fold(State(), head, on_progress)
            await batch.replace(state, head)
            self._last_snapshot = 0
        self.checkpoint = self.head = head
        return head
