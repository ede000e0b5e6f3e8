"""The forwarder: each durable delivery, to every route it matches, in ledger order, at least once.

Per route and portal there is one lane, delivering its items one at a time in the order the
ledger stored them (head-of-line: the next waits until the one before was delivered or given
up). Lanes are independent: a slow or failing destination holds up only its own lanes, never
the intake (which only waits for the outbox write) nor other routes.

Life of a forward: accepted after the commit (or the spool fsync) → sealed into the outbox
(written before the sender's answer, fsync'd within OUTBOX_SYNC_SECONDS) → queued in memory →
attempted until a 2xx, with exponential backoff and jitter, until `forward_max_age_seconds`
after it was accepted → settled (delivered, or given up with a reason) and deleted from the
outbox. Every attempt and every giving-up is recorded in PostgreSQL
(`ledger.forward_attempts`, without the body); records wait in memory (bounded) while
PostgreSQL is away. After a crash the outbox is replayed: a forward whose outcome was not
settled may be sent again — the destination dedups by `X-Ledger-Position` (or
`X-Ledger-Spool-Id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from ledger.errors import LedgerError, OutboxError, RouteRefused
from ledger.gateway.outbox import Location, Outbox
from ledger.gateway.routes import (
    ROUTE_EVENT,
    Accepted,
    Route,
    check_destination,
    fold_routes,
    plain_http_hosts,
)
from ledger.metrics import ForwardMetrics, Metrics
from ledger.settings import Settings
from ledger.storage.gateway_store import AttemptRecord, GatewayStore

log = logging.getLogger(__name__)

DELIVERED, FAILED, GIVEN_UP = "delivered", "failed", "given_up"
_RECORDS_MAX = 100_000  # attempt records held while PostgreSQL is away
_QUERY = re.compile(r"\?[^\s'\"]*")
_ANSWER_READ = 64 * 1024  # of a destination's answer body; the rest is not read
OUTBOX_SYNC_SECONDS = 0.05  # outbox fsync interval: what an OS crash may cost


@dataclass(slots=True, eq=False)
class _Item:
    location: Location | None  # None: the outbox could not be written (memory only)
    member_id: str
    event_type: str
    position: int | None
    event_hash: str | None
    dedup_key: bytes
    content_type: str | None
    raw_query: str
    accepted_at: float  # wall clock: the age limit survives a restart
    body: bytes | None
    attempts: int = 0


@dataclass(slots=True)
class _Lane:
    items: deque[_Item] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _RouteState:
    route: Route
    refused: str | None  # why this ledger will not forward there (settings changed since)
    lanes: dict[str, _Lane] = field(default_factory=dict)
    pending: int = 0
    # items whose body is in memory, oldest first (a dict: ordered, O(1) removal)
    held: dict[_Item, None] = field(default_factory=dict)
    held_bytes: int = 0
    removed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    failing_since: float | None = None
    last_outcome: str | None = None
    last_status: int | None = None
    last_error: str | None = None
    last_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RouteHealth:
    route: Route
    state: str  # ok, failing, refused
    backlog: int
    oldest_pending_seconds: float
    last_outcome: str | None
    last_status: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    refused: str | None

    def as_json(self) -> dict[str, Any]:
        r = self.route
        return {
            "route_id": r.route_id, "member_id": r.member_id, "event_pattern": r.event_pattern,
            "url": r.url, "allow_http": r.allow_http, "added_at": r.added_at.isoformat(),
            "added_by": r.added_by, "position": r.position, "state": self.state,
            "backlog": self.backlog,
            "oldest_pending_seconds": round(self.oldest_pending_seconds, 3),
            "last_outcome": self.last_outcome, "last_status": self.last_status,
            "last_error": self.last_error,
            "last_attempt_at": self.last_attempt_at.isoformat() if self.last_attempt_at else None,
            "refused": self.refused,
        }


class LoopRunner(Protocol):
    """What runs the forwarder's long-lived loops: `ledger.supervision.Supervisor` in serve."""

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None: ...

    async def stop(self, name: str) -> None: ...


class Forwarder:
    def __init__(
        self, settings: Settings, store: GatewayStore, outbox: Outbox | None, metrics: Metrics,
        *, runner: LoopRunner | None = None,
    ) -> None:
        """`runner` (the app's supervisor) runs the forwarder's long-lived loops, restarting one
        that crashes and failing readiness meanwhile; without it they are plain tasks."""
        self._runner = runner
        self._settings = settings
        self._store = store
        self._outbox = outbox
        self._http_hosts = plain_http_hosts(settings.forward_plain_http_hosts)
        self._states: dict[str, _RouteState] = {}
        self._route_position = 0
        self._routes_file = settings.outbox_path / "routes.json"
        self._metrics = ForwardMetrics(metrics, self.backlog)
        self._records: list[AttemptRecord] = []
        self._records_wake = asyncio.Event()
        self._records_lock = asyncio.Lock()
        self._writes: list[tuple[dict[str, Any], bytes, asyncio.Future[Location]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[str] = []  # started through the runner
        self._closing = False
        self._session: aiohttp.ClientSession | None = None

    # ---- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the routes (from PostgreSQL, else the copy saved last time), replay the outbox,
        then keep the routes current and the attempt records flowing in the background."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit_per_host=32),
            trust_env=False,  # no proxy from the environment: destinations are the operator's
            timeout=aiohttp.ClientTimeout(total=self._settings.forward_timeout_seconds),
            skip_auto_headers=("Content-Type",),  # only the one Bitrix24 sent
            auto_decompress=False,
        )
        try:
            await self.reload()
        except LedgerError as exc:
            log.error("routes not loaded from PostgreSQL (%s); using %s", exc, self._routes_file)
            try:
                self._load_saved_routes()
            except (OSError, ValueError, KeyError, TypeError) as bad:
                log.error("no saved routes usable in %s (%s): none until PostgreSQL answers",
                          self._routes_file, bad)
        if self._outbox is not None:
            for found in await asyncio.to_thread(self._outbox.recover):
                self._requeue(found.location, found.header, found.routes)
        self._start_loop("gateway-routes-reload", self._reload_loop)
        self._start_loop("gateway-attempts", self._record_loop)
        if self._outbox is not None:
            self._start_loop("gateway-outbox-sync", self._outbox_loop)

    def _start_loop(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        if self._runner is None:
            self._spawn(run(), name)
        else:
            self._runner.start(name, run)
            self._loops.append(name)

    async def close(self) -> None:
        """Stop forwarding (what is pending stays in the outbox); record what was attempted."""
        self._closing = True
        for state in self._states.values():
            state.wake.set()
        self._records_wake.set()
        if self._runner is not None:
            for name in self._loops:
                await self._runner.stop(name)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while self._records and await self._flush_records():
                    pass
        if self._session is not None:
            await self._session.close()
        if self._outbox is not None:
            self._outbox.close()

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A lane (or, without a runner, a loop) that dies is a bug: say so loudly."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task %s died", task.get_name(), exc_info=task.exception())

    # ---- routes -----------------------------------------------------------------------------

    @property
    def routes(self) -> list[Route]:
        return [s.route for s in self._states.values()]

    async def reload(self) -> None:
        """Fold route changes recorded since the last look (added by `ledger routes` while
        this process serves, for one)."""
        events = await self._store.route_events(ROUTE_EVENT, self._route_position)
        if not events:
            return
        self._route_position = events[-1][0]
        current = {rid: s.route for rid, s in self._states.items()}
        self._apply_routes(fold_routes(current, events))
        self._save_routes()

    def _apply_routes(self, routes: dict[str, Route]) -> None:
        for route_id in set(self._states) - set(routes):
            state = self._states.pop(route_id)
            state.removed = True
            state.wake.set()
            log.info("route %s removed; its pending forwards are given up", route_id)
        for route_id, route in routes.items():
            if route_id not in self._states:
                self._states[route_id] = _RouteState(route, self._refusal(route))
                log.info("route %s: %s %s -> %s", route_id, route.member_id,
                         route.event_pattern, route.url)

    def _refusal(self, route: Route) -> str | None:
        try:
            check_destination(
                route.url, allow_http=route.allow_http, http_hosts=self._http_hosts,
                listen_host=self._settings.host, listen_port=self._settings.port,
            )
        except RouteRefused as exc:
            log.error("route %s will not be forwarded to: %s", route.route_id, exc)
            return str(exc)
        return None

    def _save_routes(self) -> None:
        data = {"position": self._route_position, "routes": [
            {"route_id": r.route_id, "member_id": r.member_id, "event_pattern": r.event_pattern,
             "url": r.url, "allow_http": r.allow_http, "added_at": r.added_at.isoformat(),
             "added_by": r.added_by, "position": r.position} for r in self.routes]}
        try:
            self._routes_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self._routes_file.with_suffix(".tmp")
            temporary.write_bytes(orjson.dumps(data))
            temporary.replace(self._routes_file)
        except OSError as exc:
            log.warning("cannot save the routes to %s: %s", self._routes_file, exc)

    def _load_saved_routes(self) -> None:
        if not self._routes_file.exists():
            return
        data = orjson.loads(self._routes_file.read_bytes())
        self._route_position = int(data["position"])
        self._apply_routes({
            r["route_id"]: Route(
                route_id=r["route_id"], member_id=r["member_id"],
                event_pattern=r["event_pattern"], url=r["url"], allow_http=r["allow_http"],
                added_at=datetime.fromisoformat(r["added_at"]), added_by=r["added_by"],
                position=r["position"],
            ) for r in data["routes"]
        })

    async def _reload_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._settings.routes_reload_seconds)  # a poll interval
            try:
                await self.reload()
            except LedgerError as exc:
                log.debug("routes not reloaded: %s", exc)

    # ---- intake side ------------------------------------------------------------------------

    async def accept(self, accepted: Accepted) -> None:
        try:
            await self._accept(accepted)
        except Exception:
            # the delivery is durable and its sender must hear so; this is a bug to fix — and a
            # forward lost to it is counted, so /metrics shows what the log says
            log.exception("forwarding position %s of portal %s failed unexpectedly",
                          accepted.position, accepted.member_id)
            self._metrics.given_up.labels("*", "internal_error").inc()

    async def _accept(self, accepted: Accepted) -> None:
        """Called by the intake once a delivery is durable: seal it into the outbox for every
        route it matches, then queue it. Returns once the outbox holds it (so a `kill -9` after
        the sender's 2xx loses no forward; the fsync follows within OUTBOX_SYNC_SECONDS); never
        waits for a destination, never raises."""
        states = [s for s in self._states.values()
                  if s.route.matches(accepted.member_id, accepted.event_type)]
        if not states or self._closing:
            return
        now = time.time()
        header: dict[str, Any] = {
            "routes": [s.route.route_id for s in states],
            "member_id": accepted.member_id,
            "event_type": accepted.event_type,
            "position": accepted.position,
            "event_hash": accepted.event_hash.hex() if accepted.event_hash else None,
            "dedup_key": accepted.dedup_key.hex(),
            "content_type": accepted.content_type,
            "raw_query": accepted.raw_query,
            "accepted_at": now,
        }
        location: Location | None = None
        if self._outbox is not None:
            try:
                location = await self._write(header, accepted.body)
            except (OSError, OutboxError) as exc:
                # still forwarded from memory; only a crash before delivery would lose it
                log.error("outbox write failed (%s): forwarding from memory only", exc)
        for state in states:
            self._enqueue(state, _item(location, header, accepted.body))

    async def _write(self, header: dict[str, Any], body: bytes) -> Location:
        """Concurrent deliveries share one write (in a thread: the loop never waits on disk)."""
        future: asyncio.Future[Location] = asyncio.get_running_loop().create_future()
        self._writes.append((header, body, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="outbox-writer")
        return await asyncio.shield(future)

    async def _write_all(self) -> None:
        assert self._outbox is not None
        try:
            while self._writes:
                batch, self._writes = self._writes, []
                try:
                    locations = await asyncio.to_thread(
                        self._outbox.append, [(h, b) for h, b, _ in batch]
                    )
                except (OSError, OutboxError) as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), location in zip(batch, locations, strict=True):
                    if not future.done():
                        future.set_result(location)
        finally:
            self._writer = None

    def _requeue(self, location: Location, header: dict[str, Any], routes: list[str]) -> None:
        for route_id in routes:
            state = self._states.get(route_id)
            item = _item(location, header, None)
            if state is None:
                self._give_up_item(None, route_id, item, "route_removed")
                continue
            self._enqueue(state, item)

    def _enqueue(self, state: _RouteState, item: _Item) -> None:
        route_id = state.route.route_id
        if state.pending >= self._settings.forward_max_pending:
            self._give_up_item(state, route_id, item, "backlog_full")
            return
        state.pending += 1
        if item.body is not None and item.location is not None:
            state.held[item] = None
            state.held_bytes += len(item.body)
            while state.held_bytes > self._settings.forward_memory_bytes and state.held:
                spilled = next(iter(state.held))
                del state.held[spilled]
                state.held_bytes -= len(spilled.body or b"")
                spilled.body = None  # read back from the outbox when its turn comes
        lane = state.lanes.get(item.member_id)
        if lane is None:
            lane = state.lanes[item.member_id] = _Lane()
        lane.items.append(item)
        if lane.task is None:
            lane.task = self._spawn(self._run_lane(state, item.member_id, lane),
                                    f"forward-{route_id}")

    # ---- lanes ------------------------------------------------------------------------------

    async def _run_lane(self, state: _RouteState, member_id: str, lane: _Lane) -> None:
        try:
            while lane.items and not self._closing:
                item = lane.items[0]
                try:
                    done = await self._advance(state, item)
                except (OSError, OutboxError) as exc:
                    log.error("route %s position %s: %s", state.route.route_id, item.position,
                              exc)
                    self._finish(state, lane, item, GIVEN_UP, "outbox_unreadable")
                    continue
                if done is not None:
                    self._finish(state, lane, item, *done)
        finally:
            lane.task = None
            if not lane.items and state.lanes.get(member_id) is lane:
                del state.lanes[member_id]

    async def _advance(self, state: _RouteState, item: _Item) -> tuple[str, str | None] | None:
        """One step for the lane's head: (outcome, reason) once settled, None to go on."""
        if state.removed:
            return GIVEN_UP, "route_removed"
        if state.refused is not None:
            return GIVEN_UP, "destination_refused"
        age = time.time() - item.accepted_at
        if age > self._settings.forward_max_age_seconds:
            return GIVEN_UP, "expired"
        if item.body is None:
            assert self._outbox is not None
            assert item.location is not None
            _, item.body = await asyncio.to_thread(self._outbox.read, item.location)
        if await self._attempt(state, item):
            return DELIVERED, None
        ceiling = min(self._settings.forward_retry_max_seconds,
                      self._settings.forward_retry_initial_seconds * 2 ** (item.attempts - 1))
        delay = ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        delay = min(delay, max(0.0, self._settings.forward_max_age_seconds - age) + 0.001)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.wake.wait(), delay)  # backoff, cut short on removal
        return None

    async def _attempt(self, state: _RouteState, item: _Item) -> bool:
        assert self._session is not None
        assert item.body is not None
        route = state.route
        item.attempts += 1
        headers = {"X-Ledger-Route": route.route_id, "X-Ledger-Attempt": str(item.attempts),
                   "User-Agent": "ledger-gateway"}
        if item.content_type is not None:
            headers["Content-Type"] = item.content_type
        if item.position is not None:
            headers["X-Ledger-Position"] = str(item.position)
            headers["X-Ledger-Event-Hash"] = item.event_hash or ""
        else:
            headers["X-Ledger-Spool-Id"] = item.dedup_key.hex()
        url = URL(route.url + (f"?{item.raw_query}" if item.raw_query else ""), encoded=True)
        status: int | None = None
        error: str | None = None
        began = time.perf_counter()
        try:
            async with self._session.post(
                url, data=item.body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                # a short answer read to its end lets the connection be reused
                await response.content.read(_ANSWER_READ)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # a query string may carry secrets: never into a record or a log line
            error = _QUERY.sub("?…", f"{type(exc).__name__}: {exc}")[:300]
        latency = time.perf_counter() - began
        delivered = status is not None and 200 <= status < 300
        if status is not None and not delivered:
            error = f"HTTP {status}"
        outcome = DELIVERED if delivered else FAILED
        self._metrics.attempts.labels(route.route_id, outcome).inc()
        state.last_outcome, state.last_status, state.last_error = outcome, status, error
        state.last_attempt_at = datetime.now(UTC)
        state.failing_since = None if delivered else (state.failing_since or time.time())
        self._record(route.route_id, item, outcome, status, error, latency * 1000)
        if delivered:
            self._metrics.delivery_seconds.labels(route.route_id).observe(
                max(0.0, time.time() - item.accepted_at)
            )
        else:
            log.info("route %s position %s attempt %d failed: %s", route.route_id,
                     item.position, item.attempts, error)
        return delivered

    def _finish(
        self, state: _RouteState, lane: _Lane, item: _Item, outcome: str, reason: str | None
    ) -> None:
        lane.items.popleft()
        state.pending -= 1
        if item in state.held:
            del state.held[item]
            state.held_bytes -= len(item.body or b"")
        item.body = None
        if outcome == GIVEN_UP:
            self._give_up_item(state, state.route.route_id, item, reason or "unknown")
        elif self._outbox is not None and item.location is not None:
            self._outbox.settle(item.location, state.route.route_id, outcome)

    def _give_up_item(
        self, state: _RouteState | None, route_id: str, item: _Item, reason: str
    ) -> None:
        """An explicit, recorded outcome: the destination never received this event."""
        self._metrics.given_up.labels(route_id, reason).inc()
        log.warning("route %s: gave up forwarding position %s of portal %s: %s", route_id,
                    item.position, item.member_id, reason)
        if state is not None:
            state.last_outcome, state.last_error = GIVEN_UP, reason
        self._record(route_id, item, GIVEN_UP, None, reason, None)
        if self._outbox is not None and item.location is not None:
            self._outbox.settle(item.location, route_id, GIVEN_UP)

    # ---- the record of attempts -------------------------------------------------------------

    def _record(
        self, route_id: str, item: _Item, outcome: str, status: int | None, error: str | None,
        latency_ms: float | None,
    ) -> None:
        if len(self._records) >= _RECORDS_MAX:  # PostgreSQL away for long: counted, logged
            self._metrics.unrecorded.inc()
            log.warning("forward attempt not recorded (PostgreSQL away): route %s position "
                        "%s attempt %d %s %s", route_id, item.position, item.attempts, outcome,
                        error or status)
            return
        self._records.append(AttemptRecord(
            route_id=route_id, member_id=item.member_id, position=item.position,
            dedup_key=item.dedup_key, attempt=item.attempts, outcome=outcome, status=status,
            error=error, latency_ms=latency_ms,
            accepted_at=datetime.fromtimestamp(item.accepted_at, UTC),
            attempted_at=datetime.now(UTC),
        ))
        self._records_wake.set()

    async def _flush_records(self) -> bool:
        """Write the held attempt records; False when PostgreSQL did not take them."""
        async with self._records_lock:  # one writer: a batch is written once
            batch = self._records[:1000]
            if not batch:
                return True
            try:
                await self._store.record_attempts(batch)
            except LedgerError as exc:
                log.warning("%d forward attempt records wait: %s", len(self._records), exc)
                return False
            del self._records[: len(batch)]
            return True

    async def _record_loop(self) -> None:
        while not self._closing:
            await self._records_wake.wait()
            self._records_wake.clear()
            while self._records and not self._closing:
                if not await self._flush_records():
                    await asyncio.sleep(self._settings.spool_retry_seconds)  # retry interval
                    break
            if self._records:
                self._records_wake.set()

    async def records_flushed(self) -> None:
        """Write every attempt record held so far, and settle the outbox (tests, shutdown)."""
        while self._records:
            if not await self._flush_records():
                raise LedgerError("forward attempts could not be recorded")
        if self._outbox is not None:
            await asyncio.to_thread(self._outbox.apply_settled)

    async def _outbox_loop(self) -> None:
        """fsync what was written, write down what was settled and delete what is no longer
        owed — in the background, off the event loop (see `ledger.gateway.outbox`)."""
        assert self._outbox is not None
        while not self._closing:
            await asyncio.sleep(OUTBOX_SYNC_SECONDS)  # the batching interval
            try:
                if self._outbox.unsynced:
                    await asyncio.to_thread(self._outbox.sync)
                if self._outbox.settling:
                    await asyncio.to_thread(self._outbox.apply_settled)
            except OSError as exc:  # a disk error: keep trying, loudly
                log.error("outbox %s: %s", self._outbox.directory, exc)

    # ---- health -----------------------------------------------------------------------------

    def backlog(self) -> dict[str, tuple[int, float]]:
        now = time.time()
        return {
            rid: (s.pending, max((now - lane.items[0].accepted_at for lane in s.lanes.values()
                                  if lane.items), default=0.0))
            for rid, s in self._states.items()
        }

    def health(self) -> list[RouteHealth]:
        backlog = self.backlog()
        return [
            RouteHealth(
                route=s.route,
                state="refused" if s.refused else "failing" if s.failing_since else "ok",
                backlog=backlog[rid][0], oldest_pending_seconds=backlog[rid][1],
                last_outcome=s.last_outcome, last_status=s.last_status,
                last_error=s.last_error, last_attempt_at=s.last_attempt_at, refused=s.refused,
            )
            for rid, s in self._states.items()
        ]


def _item(location: Location | None, header: dict[str, Any], body: bytes | None) -> _Item:
    return _Item(
        location=location,
        member_id=header["member_id"],
        event_type=header["event_type"],
        position=header["position"],
        event_hash=header["event_hash"],
        dedup_key=bytes.fromhex(header["dedup_key"]),
        content_type=header["content_type"],
        raw_query=header["raw_query"],
        accepted_at=float(header["accepted_at"]),
        body=body,
    )


def outbox_for(settings: Settings) -> Outbox:
    from ledger.gateway.outbox import KEY_NAME, load_key

    configured = settings.outbox_key.get_secret_value() if settings.outbox_key else None
    key = load_key(settings.keys_dir / KEY_NAME, configured)
    return Outbox(settings.outbox_path, key)


FORWARDER = web.AppKey("forwarder", Forwarder)


def forwarder_of(app: web.Application) -> Forwarder | None:
    return app.get(FORWARDER)


__all__ = ["FORWARDER", "Accepted", "Forwarder", "RouteHealth", "forwarder_of", "outbox_for"]
