"""`ledger serve`'s periodic signed checkpoints: every N events or T seconds, into a directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import integrity
from ledger.committer import GroupCommitter
from ledger.errors import LedgerError
from ledger.storage.store import EventStore

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        store: EventStore,
        committer: GroupCommitter,
        key: Ed25519PrivateKey,
        *,
        origin: str,
        directory: Path,
        every_events: int,
        every_seconds: float,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        """`fault` (tests only) is called with "checkpoint" on every wake and may raise: it
        crashes `run` from the inside, for the supervisor to restart."""
        self._store, self._committer, self._key = store, committer, key
        self._origin, self._directory = origin, directory
        self._every_events, self._every_seconds = every_events, every_seconds
        self.last_position = 0
        self._written = asyncio.Condition()
        self._fault = fault

    async def run(self) -> None:
        """Wake on commits (or the timer); write when enough events or time have passed.

        The database being away is waited out; anything else raises, for the supervisor
        (`ledger.supervision`) to log, count and restart."""
        loop = asyncio.get_running_loop()
        self._directory.mkdir(parents=True, exist_ok=True)
        due = loop.time() + self._every_seconds
        while True:
            with contextlib.suppress(TimeoutError):  # not wait_for: it can swallow a cancel
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self._committer.progressed.wait()
            self._committer.progressed.clear()
            if self._fault is not None:
                self._fault("checkpoint")
            try:
                position, _ = await self._store.head()
                timer_due = loop.time() >= due
                if position > self.last_position and (
                    timer_due or position - self.last_position >= self._every_events
                ):
                    await self.write()
                    due = loop.time() + self._every_seconds
                elif timer_due:
                    due = loop.time() + self._every_seconds
            except LedgerError as exc:  # the database may be away; try again on the next wake
                log.warning("checkpoint skipped: %s", exc)

    async def write(self) -> Path:
        text = await integrity.make_checkpoint(self._store, self._key, self._origin)
        position = int(text.split("\n")[1])
        path = self._directory / f"checkpoint-{position:012d}.txt"
        path.write_text(text)
        async with self._written:
            self.last_position = position
            self._written.notify_all()
        log.info("wrote signed checkpoint %s", path)
        return path

    async def wait_for(self, position: int) -> None:
        """Until a checkpoint at or past `position` is written (bound it with asyncio.timeout)."""
        async with self._written:
            await self._written.wait_for(lambda: self.last_position >= position)
