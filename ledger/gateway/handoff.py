"""The intake's whole part in gateway mode: seal each durable delivery into its outbox.

Everything else — reading the outbox, sending, retrying, recording attempts, deleting what was
settled — happens in the forwarder process (`ledger.gateway.forwarder`), so forwarding costs the
intake's event loop one batched, encrypted append per commit (written by the loop itself when
nothing can make it wait, `OutboxWriter.write_now`, and the bodies are small,
`LOOP_WRITE_MAX_BYTES`) and nothing per attempt. The
guarantee is the one gateway mode always had: the record is written to the kernel before the
sender hears 2xx (a `kill -9` of either process loses no forward), fsync'd within
`OUTBOX_SYNC_SECONDS` (an OS crash may cost that interval).

The route set is folded here too (to know which deliveries to seal, for which routes); route
health comes from the status the forwarder process publishes (`ledger.gateway.status`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from ledger.errors import LedgerError, OutboxError
from ledger.gateway import status
from ledger.gateway.outbox import OutboxWriter
from ledger.gateway.routes import Accepted, Route
from ledger.gateway.status import RouteHealth
from ledger.metrics import Metrics
from ledger.settings import Settings
from ledger.storage.gateway_store import AttemptRecord, GatewayStore

log = logging.getLogger(__name__)

OUTBOX_SYNC_SECONDS = 0.05  # outbox fsync interval: what an OS crash may cost
# a commit's bodies up to this many bytes are sealed and written by the event loop itself
# (`OutboxWriter.write_now`; 128 KiB: ~0.5 ms of CPU), larger ones from a thread
LOOP_WRITE_MAX_BYTES = 128 * 1024
_MATCHED_MAX = 4096  # (portal, event type) pairs whose matching routes are remembered
ROUTES_NAME = "routes.json"


class LoopRunner(Protocol):
    """What runs the long-lived loops: `ledger.supervision.Supervisor` in serve."""

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None: ...

    async def stop(self, name: str) -> None: ...


class Handoff:
    def __init__(
        self, settings: Settings, store: GatewayStore, outbox: OutboxWriter, runner: LoopRunner,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._store = store
        self._outbox = outbox
        self._runner = runner
        self._book = status.RouteBook(store, settings.outbox_path / ROUTES_NAME)
        self._writes: list[tuple[dict[str, Any], Accepted, asyncio.Future[None]]] = []
        # (member, event type) → the routes it matches, for the route set it was made from
        self._matched: dict[tuple[str, str], list[str]] = {}
        self._matched_for: dict[str, Route] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await self._book.start()
        self._runner.start("gateway-routes-reload",
                           lambda: self._book.follow(self._settings.routes_reload_seconds))
        self._runner.start("gateway-outbox-sync", self._sync_loop)

    async def close(self) -> None:
        self._closing = True
        await self._runner.stop("gateway-routes-reload")
        await self._runner.stop("gateway-outbox-sync")
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await asyncio.to_thread(self._outbox.close)

    # ---- routes -----------------------------------------------------------------------------

    @property
    def routes(self) -> list[Route]:
        return self._book.ordered()

    async def reload(self) -> None:
        """Fold route changes recorded since the last look (`ledger routes` while serving)."""
        await self._book.reload()

    # ---- the handoff ------------------------------------------------------------------------

    def accept(self, accepted: Accepted) -> Awaitable[None]:
        """Called by the intake once a delivery is durable: seal it into the outbox for every
        route it matches. What it returns is done once the kernel holds it; it never waits
        for a destination and never raises (an outbox that cannot be written is logged,
        counted and recorded as given-up forwards before it is done). A plain method
        returning the write's future: no coroutine of its own per delivery."""
        routes = self._routes_for(accepted.member_id, accepted.event_type)
        if not routes or self._closing:
            return _nothing()
        header: dict[str, Any] = {
            "routes": routes,
            "member_id": accepted.member_id,
            "event_type": accepted.event_type,
            "position": accepted.position,
            "event_hash": accepted.event_hash.hex() if accepted.event_hash else None,
            "dedup_key": accepted.dedup_key.hex(),
            "content_type": accepted.content_type,
            "raw_query": accepted.raw_query,
            "accepted_at": time.time(),
        }
        return self._write(header, accepted)

    def _write(self, header: dict[str, Any], accepted: Accepted) -> asyncio.Future[None]:
        """Concurrent deliveries (one commit's) share one write: by the event loop itself
        when nothing can make it wait (`OutboxWriter.write_now`: the write goes to the page
        cache), else from a thread (a new segment, an fsync under way, the forwarder holding
        the segment's lock). A cancelled handler cancels only its own future; the batch is
        written."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.append((header, accepted, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="outbox-writer")
        return future

    def forwards(self, member_id: str, event_type: str) -> bool:
        """Whether `accept` would seal such a delivery (a route matches; not closing): the
        intake asks before it builds the `Accepted` of a delivery no route takes."""
        return not self._closing and bool(self._routes_for(member_id, event_type))

    def _routes_for(self, member_id: str, event_type: str) -> list[str]:
        """The routes a delivery matches; remembered per (portal, event type) while the route
        set stays the same (a pattern match per route per delivery showed in the intake's
        CPU), at most `_MATCHED_MAX` pairs."""
        if self._matched_for is not self._book.routes or len(self._matched) > _MATCHED_MAX:
            self._matched, self._matched_for = {}, self._book.routes
        key = (member_id, event_type)
        routes = self._matched.get(key)
        if routes is None:
            routes = self._matched[key] = [r.route_id for r in self._book.routes.values()
                                           if r.matches(member_id, event_type)]
        return routes

    async def _record_lost(self, lost: list[tuple[dict[str, Any], Accepted]]) -> None:
        now = datetime.now(UTC)
        records = [AttemptRecord(
            route_id=route_id, member_id=accepted.member_id, position=accepted.position,
            dedup_key=accepted.dedup_key, attempt=0, outcome="given_up", status=None,
            error="outbox_unwritable", latency_ms=None,
            accepted_at=datetime.fromtimestamp(header["accepted_at"], UTC), attempted_at=now,
        ) for header, accepted in lost for route_id in header["routes"]]
        try:
            await self._store.record_attempts(records)
        except LedgerError as exc:
            log.error("the lost forwards of position(s) %s are not recorded either: %s",
                      ", ".join(str(a.position) for _, a in lost), exc)

    async def _write_all(self) -> None:
        try:
            while self._writes:
                batch, self._writes = self._writes, []
                try:
                    records = [(h, a.body) for h, a, _ in batch]
                    if sum(len(body) for _, body in records) > LOOP_WRITE_MAX_BYTES:
                        # sealed and written by the loop, a batch of bodies a sender sized
                        # held every other delivery up (64 of 1 MiB: 350 ms, measured)
                        await asyncio.to_thread(self._outbox.append, records)
                    elif not self._outbox.write_now(data := self._outbox.seal(records)):
                        await asyncio.to_thread(self._outbox.write, data)  # it would wait
                except Exception as exc:  # noqa: BLE001 - never raised into the intake
                    try:
                        await self._lost(batch, exc)
                    except Exception:  # the senders must still hear: log it and answer
                        log.exception("recording lost forwards failed")
                for _, _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._writer = None

    async def _lost(
        self, batch: list[tuple[dict[str, Any], Accepted, asyncio.Future[None]]],
        exc: Exception,
    ) -> None:
        """The batch is durable and its senders must hear so; its forwards are lost: say so
        in the log and, for auditors, as given-up attempts (before the senders hear)."""
        for _, accepted, _ in batch:
            self._metrics.forward_handoff_failures.inc()
            log.error("position %s of portal %s not forwarded: the outbox could not be "
                      "written (%s)", accepted.position, accepted.member_id,
                      exc if isinstance(exc, OSError | OutboxError) else repr(exc))
        await self._record_lost([(header, accepted) for header, accepted, _ in batch])

    async def _sync_loop(self) -> None:
        """fsync what was written, in the background, off the event loop."""
        while not self._closing:
            await asyncio.sleep(OUTBOX_SYNC_SECONDS)  # the batching interval
            if self._outbox.unsynced:
                try:
                    await asyncio.to_thread(self._outbox.sync)
                except OSError as exc:  # a disk error: keep trying, loudly
                    log.error("outbox %s: %s", self._outbox.directory, exc)

    # ---- health, as the forwarder process publishes it --------------------------------------

    def forwarder(self) -> status.Published | None:
        """The forwarder process's last status; None when it is not running (or stale)."""
        return status.read_status(self._settings)

    def health(self) -> list[RouteHealth]:
        published = self.forwarder()
        return [status.health_of(r, None if published is None else
                                 published.routes.get(r.route_id))
                for r in self.routes]

    def metrics_text(self) -> bytes:
        """The forwarder process's metrics, plus whether it runs (for /metrics)."""
        published = self.forwarder()
        up = (b"# HELP ledger_forwarder_up 1 while the forwarder process publishes its status\n"
              b"# TYPE ledger_forwarder_up gauge\n"
              b"ledger_forwarder_up " + (b"1" if published else b"0") + b"\n")
        return up + (published.metrics if published is not None else b"")


async def _nothing() -> None:
    """What `Handoff.accept` returns for a delivery it does not seal."""


HANDOFF = web.AppKey("gateway_handoff", Handoff)


__all__ = ["HANDOFF", "OUTBOX_SYNC_SECONDS", "Handoff"]
