"""The intake's whole part in gateway mode: seal each delivery a route takes into its outbox,
ahead of its commit.

Everything else — reading the outbox, sending, retrying, recording attempts, deleting what was
settled — happens in the forwarder process (`ledger.gateway.forwarder`), so forwarding costs the
intake's event loop one batched, encrypted append per commit (written by the loop itself when
nothing can make it wait, `OutboxWriter.write_now`, and the bodies are small,
`LOOP_WRITE_MAX_BYTES`) and nothing per attempt. The record is written
to the kernel *before the delivery is committed* (`AHEAD`: a write-ahead record keyed by the
delivery's identity, its dedup key), so neither a `kill -9` between the COMMIT and the answer
(a whole group commit's batch) nor a handler cancelled there leaves a stored event
unforwarded: the forwarder sends a record once it finds its event stored, each stored event
once whatever number of records name it (a redelivery writes one too), and drops records whose
delivery was refused (`VOID`, written after the refusal) or never stored. Records are fsync'd
within `OUTBOX_SYNC_SECONDS` (an OS crash may cost that interval).

The answer never waits for the outbox longer than `LEDGER_OUTBOX_WRITE_TIMEOUT_SECONDS` (a
stalled disk), and the outboxes never grow past `LEDGER_OUTBOX_MAX_BYTES` (a forwarder down for
long): past either, the forward is given up — logged once per episode, counted, recorded as a
given-up attempt (`outbox_stalled`, `outbox_full`; `outbox_unwritable` when the write fails)
and shown in /readyz — and the delivery goes on to its commit and answer.

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
from ledger.gateway.outbox import OutboxWriter, outbox_bytes
from ledger.gateway.routes import AHEAD, STORED, Accepted, Route
from ledger.gateway.status import RouteHealth
from ledger.metrics import Metrics
from ledger.settings import Settings
from ledger.storage.gateway_store import AttemptRecord, GatewayStore

log = logging.getLogger(__name__)

OUTBOX_SYNC_SECONDS = 0.05  # outbox fsync interval: what an OS crash may cost
# a commit's bodies up to this many bytes are sealed and written by the event loop itself
# (`OutboxWriter.write_now`; 128 KiB: ~0.5 ms of CPU), larger ones from a thread
LOOP_WRITE_MAX_BYTES = 128 * 1024
MEASURE_SECONDS = 1.0  # how often the outboxes' size on disk is measured (LEDGER_OUTBOX_MAX_BYTES)
STALLED, FULL, UNWRITABLE = "outbox_stalled", "outbox_full", "outbox_unwritable"
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
        # a write to the outbox still under way past the bound: later ones are given up at
        # once until it ends (they would queue behind it)
        self._stalled: asyncio.Future[None] | None = None
        self._bytes = 0  # the outboxes' size on disk as last measured, plus what was written
        # the give-up episode under way (its reason), how many were given up in it, in all
        self._episode: str | None = None
        self._episode_count = 0
        self._episode_since: float | None = None
        self.given_up = 0

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

    def accept(self, accepted: Accepted) -> asyncio.Future[None]:
        """Called by the intake with a delivery at its stage (`AHEAD` of its commit,
        `SPOOLED`, `VOID`: see `ledger.gateway.routes`): seal it into the outbox for every
        route it matches. What it returns is done once the kernel holds it, or once its forward
        was given up (a stalled or full outbox, a failed write: logged, counted and recorded
        before it is done); it never waits for a destination, never raises, and need not be
        awaited. A plain method returning the write's future: no coroutine per delivery."""
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
        if accepted.stage != STORED:
            header["stage"] = accepted.stage
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

    async def _record_lost(
        self, lost: list[tuple[dict[str, Any], Accepted]], reason: str
    ) -> None:
        """Given-up attempt records of forwards that never reached the outbox, for auditors
        (`audit.forwards` shows the position once the event is stored: by its dedup key).
        Only a record ahead of a commit (or of an earlier revision) stands for a forward: a
        spooled one's forward is still made once drained, a void one names none."""
        now = datetime.now(UTC)
        records = [AttemptRecord(
            route_id=route_id, member_id=accepted.member_id, position=accepted.position,
            dedup_key=accepted.dedup_key, attempt=0, outcome="given_up", status=None,
            error=reason, latency_ms=None,
            accepted_at=datetime.fromtimestamp(header["accepted_at"], UTC), attempted_at=now,
        ) for header, accepted in lost if accepted.stage in (AHEAD, STORED)
            for route_id in header["routes"]]
        if not records:
            return
        try:  # the answers wait for it: no longer than for the outbox
            async with asyncio.timeout(self._settings.outbox_write_timeout_seconds):
                await self._store.record_attempts(records)
        except (LedgerError, TimeoutError) as exc:
            log.error("%d forwards given up (%s) are not recorded either: %s", len(records),
                      reason, exc or "PostgreSQL took too long")

    async def _write_all(self) -> None:
        try:
            while self._writes:
                batch, self._writes = self._writes, []
                reason, exc = self._refusal(), None
                if reason is None:
                    try:
                        reason = await self._write_batch(batch)
                    except Exception as error:  # noqa: BLE001 - never raised into the intake
                        reason, exc = UNWRITABLE, error
                if reason is None:
                    self._episode_over()
                else:
                    try:
                        await self._lost(batch, reason, exc)
                    except Exception:  # the senders must still hear: log it and answer
                        log.exception("recording lost forwards failed")
                for _, _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._writer = None

    def _refusal(self) -> str | None:
        """Why the next batch is given up without a write: a write still stalled, or the
        outboxes past `LEDGER_OUTBOX_MAX_BYTES`."""
        if self._stalled is not None:
            return STALLED
        limit = self._settings.outbox_max_bytes
        if limit and self._bytes >= limit:
            return FULL
        return None

    async def _write_batch(
        self, batch: list[tuple[dict[str, Any], Accepted, asyncio.Future[None]]]
    ) -> str | None:
        """Write one batch: by the loop when nothing can make it wait, else by a thread waited
        for at most `LEDGER_OUTBOX_WRITE_TIMEOUT_SECONDS` (then `STALLED`: the thread's write
        goes on, and ends the episode when it does)."""
        records = [(h, a.body) for h, a, _ in batch]
        size = sum(len(body) for _, body in records)
        if size > LOOP_WRITE_MAX_BYTES:
            # sealed and written by the loop, a batch of bodies a sender sized held every
            # other delivery up (64 of 1 MiB: 350 ms, measured)
            written = asyncio.ensure_future(asyncio.to_thread(self._outbox.append, records))
        elif not self._outbox.write_now(data := self._outbox.seal(records)):
            written = asyncio.ensure_future(asyncio.to_thread(self._outbox.write, data))
        else:
            self._bytes += len(data)
            return None
        bound = self._settings.outbox_write_timeout_seconds
        done, _ = await asyncio.wait((written,), timeout=bound)
        if not done:
            self._stalled = written
            written.add_done_callback(self._unstalled)
            return STALLED
        written.result()  # raises what the write raised
        self._bytes += size
        return None

    def _unstalled(self, written: asyncio.Future[None]) -> None:
        """The stalled write ended: the next batch is written again."""
        self._stalled = None
        if not written.cancelled() and (exc := written.exception()) is not None:
            log.error("the stalled outbox write ended with %s", exc)

    async def _lost(
        self, batch: list[tuple[dict[str, Any], Accepted, asyncio.Future[None]]],
        reason: str, exc: Exception | None,
    ) -> None:
        """The batch's forwards are given up (its deliveries go on to their commit and answer):
        say so once per episode in the log, count each, and record them for auditors before
        the senders hear."""
        self._metrics.forward_handoff_failures.inc(len(batch))
        self._metrics.forward_seals_given_up.labels(reason).inc(len(batch))
        self.given_up += len(batch)
        if self._episode != reason:
            self._episode, self._episode_count, self._episode_since = reason, 0, time.time()
            why = {STALLED: f"a write to it took longer than "
                            f"{self._settings.outbox_write_timeout_seconds:g} s (a stalled disk?)",
                   FULL: f"the outboxes hold {self._bytes} bytes, LEDGER_OUTBOX_MAX_BYTES is "
                         f"{self._settings.outbox_max_bytes} (is the forwarder running?)",
                   }.get(reason, f"it could not be written "
                                 f"({_described(exc)})")
            log.error("outbox %s: forwards are given up (%s) until it takes records again: %s; "
                      "the deliveries are still stored and answered, and each forward given up "
                      "is recorded (audit.forwards)", self._outbox.directory, reason, why)
        self._episode_count += len(batch)
        await self._record_lost([(header, accepted) for header, accepted, _ in batch], reason)

    def _episode_over(self) -> None:
        if self._episode is not None:
            log.warning("outbox %s takes records again; %d forwards were given up (%s)",
                        self._outbox.directory, self._episode_count, self._episode)
            self._episode, self._episode_since = None, None

    def sealing(self) -> dict[str, Any]:
        """For /readyz: whether forwards are being given up now (and why), and how many were
        since start."""
        return {"state": "ok" if self._episode is None else self._episode,
                "since": self._episode_since, "given_up": self.given_up,
                "bytes": self._bytes, "max_bytes": self._settings.outbox_max_bytes}

    async def _sync_loop(self) -> None:
        """fsync what was written, in the background, off the event loop; measure the
        outboxes' size every `MEASURE_SECONDS`."""
        measured = 0.0
        while not self._closing:
            await asyncio.sleep(OUTBOX_SYNC_SECONDS)  # the batching interval
            if self._outbox.unsynced and self._stalled is None:
                try:
                    await asyncio.to_thread(self._outbox.sync)
                except OSError as exc:  # a disk error: keep trying, loudly
                    log.error("outbox %s: %s", self._outbox.directory, exc)
            if self._settings.outbox_max_bytes and (
                    time.monotonic() - measured >= MEASURE_SECONDS):
                measured = time.monotonic()
                try:
                    self._bytes = await asyncio.to_thread(
                        outbox_bytes, self._settings.outbox_root)
                except OSError as exc:
                    log.error("outbox %s: %s", self._settings.outbox_root, exc)

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


def _described(exc: Exception | None) -> str:
    return str(exc) if isinstance(exc, OSError | OutboxError) else repr(exc)


def _nothing() -> asyncio.Future[None]:
    """What `Handoff.accept` returns for a delivery it does not seal: done."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


HANDOFF = web.AppKey("gateway_handoff", Handoff)


__all__ = ["HANDOFF", "OUTBOX_SYNC_SECONDS", "Handoff"]
