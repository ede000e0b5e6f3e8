"""The forwarder process: each durable delivery, to every route it matches, in ledger order,
at least once — out of the intake's way.

The intake only seals each durable delivery into its outbox (`ledger.gateway.handoff`). This
process (`ledger forward`; `ledger serve` runs exactly one as a child) tails every worker's
outbox, and per route and portal keeps one lane, delivering its items one at a time in the order
the ledger stored them (head-of-line: the next waits until the one before was delivered or given
up). Lanes are independent: a slow or failing destination holds up only its own lanes, never
the intake nor other routes.

Life of a forward: sealed into the outbox by the intake ahead of the commit (`AHEAD`, keyed by
the delivery's dedup key) → read here within `forward_poll_seconds` → found stored in
PostgreSQL (`_resolve`: its position and chain hash; an event already forwarded to a route, by
this record or another naming it — a redelivery's — is not sent again; a record whose delivery
was refused, `VOID`, is dropped; one whose event is not stored by `forward_max_age_seconds`
is given up, `never_stored`) → attempted until a 2xx,
with exponential backoff and jitter, until `forward_max_age_seconds` after it was accepted →
settled (delivered, or given up with a reason) and deleted from the outbox. Every attempt and
every giving-up is recorded in PostgreSQL (`ledger.forward_attempts`, without the body); records
wait in memory (bounded) while PostgreSQL is away. After a crash (of either process) the outbox
is read again from what `done.log` says is settled: a forward whose outcome was not settled may
be sent again — the destination dedups by `X-Ledger-Position` (or `X-Ledger-Spool-Id`).

Route health and this process's metrics are published to a status file
(`ledger.gateway.status`) for the intake's `/readyz`, `/metrics` and read API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest

from ledger.errors import DatabaseUnavailable, LedgerError, OutboxError, RouteRefused
from ledger.gateway import status
from ledger.gateway.outbox import (
    KEY_LOST,
    KEY_NAME,
    Location,
    OutboxReader,
    Recovered,
    frames,
    load_key,
    retired_keys,
    unreadable_segments,
    writer_gone,
)
from ledger.gateway.routes import (
    AHEAD,
    VOID,
    Route,
    check_destination,
    plain_http_hosts,
)
from ledger.gateway.sender import Answer, Sender, Target, request_head
from ledger.gateway.status import RouteHealth
from ledger.metrics import ForwardMetrics
from ledger.settings import Settings
from ledger.storage.gateway_store import AttemptRecord, GatewayStore

log = logging.getLogger(__name__)

DELIVERED, FAILED, GIVEN_UP = "delivered", "failed", "given_up"
UNKNOWN = "unknown"  # the route and portal of a forward whose record no key opens
_RECORDS_MAX = 100_000  # attempt records held while PostgreSQL is away
RECORD_BATCH_SECONDS = 0.1  # how long attempt records gather before they are written
_QUERY = re.compile(r"\?[^\s'\"]*")
ROUTES_NAME = "forwarder-routes.json"
_Settle = tuple[OutboxReader, Location, str, str]  # outbox, location, route, outcome
_RESOLVE_MAX = 5000  # records ahead of their commit looked up in PostgreSQL per poll
_RESOLVE_BACKOFF_MAX = 5.0  # seconds between looks for a record whose event is not stored yet
_SEEN_MAX = 200_000  # (portal, dedup key, route) of forwards queued, remembered: sent once
Identity = tuple[str, bytes]  # (portal, dedup key): a delivery's identity


@dataclass(slots=True, eq=False)
class _Ahead:
    """A record written ahead of its commit, waiting to be found stored (`_resolve`)."""

    outbox: OutboxReader
    record: Recovered
    identity: Identity
    next_look: float  # monotonic
    looks: int = 0


@dataclass(slots=True, eq=False)
class _Item:
    outbox: OutboxReader
    location: Location
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
    # the request's head without the attempt's number, made at the first attempt (or why
    # it cannot be sent), and the acceptance time as the attempt records carry it
    head: bytes | None = None
    unsendable: str | None = None
    accepted: datetime | None = None


@dataclass(slots=True)
class _Lane:
    items: deque[_Item] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _RouteState:
    route: Route
    refused: str | None  # why this ledger will not forward there (settings changed since)
    target: Target
    # the route's metric children, looked up once (a `labels()` per attempt costs)
    delivered: Any
    failed: Any
    delivery_seconds: Any
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
    last_attempt_at: float | None = None  # wall clock


class LoopRunner(Protocol):
    """What runs the forwarder's long-lived loops: `ledger.supervision.Supervisor`."""

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None: ...

    async def stop(self, name: str) -> None: ...


def outbox_key(settings: Settings) -> bytes:
    """The key the outbox is sealed with; never a new one while the outbox holds records no
    key at hand opens (`OutboxKeyLost`: the message says what to do)."""
    return outbox_keys(settings)[0]


def outbox_keys(settings: Settings) -> tuple[bytes, list[bytes]]:
    """The outbox key and the retired ones (`ledger forward --rotate-key`), which the
    forwarder still opens records with."""
    configured = settings.outbox_key.get_secret_value() if settings.outbox_key else None
    retired = retired_keys(settings.keys_dir) + _overridden_key(settings, configured)
    return load_key(settings.keys_dir / KEY_NAME, configured, outbox_root=settings.outbox_root,
                    retired=retired), retired


def _overridden_key(settings: Settings, configured: str | None) -> list[bytes]:
    """`keys/outbox.key` while `LEDGER_OUTBOX_KEY` overrides it: it sealed what was written
    before the setting, so it still opens those records (read only). A file that does not
    decode opens nothing: left out."""
    path = settings.keys_dir / KEY_NAME
    if not configured or not path.exists():
        return []
    try:
        return [load_key(path, None)]
    except OutboxError:
        return []


class Forwarder:
    def __init__(
        self, settings: Settings, store: GatewayStore, key: bytes,
        *, runner: LoopRunner | None = None, retired: Sequence[bytes] = (),
    ) -> None:
        """`runner` runs the forwarder's long-lived loops, restarting one that crashes;
        without it they are plain tasks. `retired`: earlier outbox keys, to open records sealed
        before a rotation."""
        self._runner = runner
        self._settings = settings
        self._store = store
        self._key = key
        self._retired = list(retired)
        # outbox directories (or segments in them) that do not open, and why: reported
        # (`/readyz`, a metric, logged once), while the other directories go on
        self.unreadable: dict[str, str] = {}
        self._unreadable_counts: dict[str, int] = {}
        self._outboxes: dict[str, OutboxReader] = {}
        # read but not yet queued: (when read, monotonic), waiting out the order window
        self._settling: list[tuple[float, OutboxReader, Recovered]] = []
        self._live_outboxes = 0  # outboxes that may still hold or get records (see `poll`)
        # records written ahead of their commit, not yet found stored, oldest first
        self._unresolved: list[_Ahead] = []
        self._unresolved_bytes = 0  # their bodies held in memory
        self._resolving: asyncio.Task[None] | None = None  # the look-up under way
        # deliveries refused after their record ahead was written (`VOID`), and forwards
        # queued in this process: each bounded, oldest forgotten first
        self._voided: dict[Identity, None] = {}
        self._seen: dict[tuple[str, bytes, str], None] = {}
        self._http_hosts = plain_http_hosts(settings.forward_plain_http_hosts)
        self._states: dict[str, _RouteState] = {}
        self._book = status.RouteBook(store, settings.outbox_root / ROUTES_NAME,
                                      on_change=self._apply_routes, on_reload=self._unpark)
        # forwards to routes this process has not seen yet (added while PostgreSQL was away
        # from it): they wait, in order, for the next reload, never given up for that
        self._unrouted: dict[str, list[_Item]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics = ForwardMetrics(self.registry, self.backlog)
        self._records: list[AttemptRecord] = []
        # beside each record: the forward it settles (its last attempt or giving up), settled
        # in the outbox only once the record is in PostgreSQL (see `_record`)
        self._settles: list[_Settle | None] = []
        self._records_wake = asyncio.Event()
        self._routed = asyncio.Event()  # a route exists: the outbox is read at its interval
        self._records_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[str] = []  # started through the runner
        self._closing = False
        self._sender = Sender(settings.forward_timeout_seconds)

    # ---- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the routes (from PostgreSQL, else the copy saved last time), read what the
        outboxes owe, then keep forwarding, reading, recording and publishing in the
        background."""
        await self._book.start()
        await self.poll()
        self._start_loop("forwarder-routes-reload",
                         lambda: self._book.follow(self._settings.routes_reload_seconds))
        self._start_loop("forwarder-attempts", self._record_loop)
        self._start_loop("forwarder-outbox", self._outbox_loop)
        self._start_loop("forwarder-status", self._status_loop)

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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while self._records and await self._flush_records():
                    pass
        await self._sender.close()
        for outbox in self._outboxes.values():
            await asyncio.to_thread(outbox.close)

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
        """Fold route changes recorded since the last look (`ledger routes` while serving)."""
        await self._book.reload()

    def _apply_routes(self, routes: dict[str, Route]) -> None:
        for route_id in set(self._states) - set(routes):
            state = self._states.pop(route_id)
            state.removed = True
            state.wake.set()
            log.info("route %s removed; its pending forwards are given up", route_id)
        for route_id, route in routes.items():
            if route_id not in self._states:
                self._states[route_id] = self._state(route)
                log.info("route %s: %s %s -> %s", route_id, route.member_id,
                         route.event_pattern, route.url)
        if self._states:
            self._routed.set()
        else:
            self._routed.clear()

    def _state(self, route: Route) -> _RouteState:
        refused = self._refusal(route)
        try:
            target = Target.of(route.url)
        except (ValueError, UnicodeError) as exc:
            refused, target = refused or f"{route.url!r} is not a URL: {exc}", Target.of("/")
        attempts, rid = self._metrics.attempts, route.route_id
        return _RouteState(route, refused, target, attempts.labels(rid, DELIVERED),
                           attempts.labels(rid, FAILED),
                           self._metrics.delivery_seconds.labels(rid))

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

    # ---- reading the outboxes ---------------------------------------------------------------

    async def poll(self, *, apply_settled: bool = False) -> None:
        """Queue what the intake appended to any worker's outbox since the last look (and,
        with `apply_settled`, write down what was settled: `OutboxReader.apply_settled`).

        Each worker appends right before its own commit, and a record is released only once
        its event is found stored (`_resolve`), so with several workers a later position can
        be found (and released) before an earlier one committed by another worker an instant
        before, whose record this poll had not read yet. With more than one outbox, what is
        read waits `forward_order_window_seconds` and is then released in position order,
        together with every held record of a lower position; a worker stalled longer than the
        window (a paused process) can still be overtaken. Each poll reads and looks up before
        it releases, so the window is exact whatever the polling interval; with one outbox,
        what one look-up finds stored is released at once, in position order.

        An outbox whose writer is gone (`writer_gone`, looked at before and after reading)
        and that had nothing new to read and nothing waiting here — a `worker-N` left by an
        earlier run with more workers — counts as none: it can hold nothing that a record read
        now should wait for. (A worker that starts, commits, appends and dies between the two
        looks could still be overtaken: the window's own caveat, in a narrower gap.)"""
        waiting = {outbox.directory.name for _, outbox, _ in self._settling}
        opened: dict[str, OutboxReader] = {}
        problems: dict[str, tuple[int, str]] = {}
        try:  # the file work in one thread's turn: each turn costs ~50 µs of CPU
            directories, gone, found = await asyncio.to_thread(
                self._read, waiting, opened, apply_settled, problems)
        finally:
            self._outboxes.update(opened)
        self._report(problems)
        self._expire_parked()
        self._live_outboxes = len(directories) - len(gone)
        now = time.monotonic()
        for outbox, record in found:
            stage = record.header.get("stage")
            if stage == AHEAD:
                self._ahead(outbox, record, now)
            elif stage == VOID:
                self._void(outbox, record)
            else:  # spooled, or stored (an earlier revision's record)
                self._settling.append((now, outbox, record))
        if self._unresolved and self._resolving is None:
            # not waited for past a poll interval: a PostgreSQL that hangs must not hold up
            # what needs no look-up (a spooled record); found later, released by a later poll
            self._resolving = self._spawn(self._resolve(now), "forwarder-resolve")
            await asyncio.wait((self._resolving,), timeout=self._settings.forward_poll_seconds)
        released = self._release(now)
        if not released:
            return
        unknown = {r for _, f in released for r in f.routes
                   if r not in self._states and r not in self._unrouted}
        current = False  # whether the route set was read from PostgreSQL after these records
        if unknown:  # added after this process last looked: look again before judging
            try:
                await self.reload()
                current = True
            except LedgerError as exc:
                log.warning("forwards to route(s) %s wait: this process does not know them "
                            "yet and cannot read the routes (%s)", ", ".join(sorted(unknown)),
                            exc)
        for outbox, record in released:
            self._queue(outbox, record, current=current)

    def _read(
        self, waiting: set[str], opened: dict[str, OutboxReader], apply_settled: bool,
        problems: dict[str, tuple[int, str]],
    ) -> tuple[list[Path], set[Path], list[tuple[OutboxReader, Recovered]]]:
        """`poll`'s blocking part (in a thread): the outbox directories, those whose writer is
        gone, the records read; outboxes seen for the first time are opened into `opened`,
        and those that do not open (wholly or in part) noted in `problems` (directory →
        segments, why) — one such directory never stops the others."""
        root = self._settings.outbox_root
        directories = sorted(p for p in root.glob("worker-*") if p.is_dir())
        gone = {d for d in directories if d.name not in waiting and writer_gone(d)}
        found: list[tuple[OutboxReader, Recovered]] = []
        for directory in directories:
            outbox = self._outboxes.get(directory.name) or opened.get(directory.name)
            try:
                if outbox is None:
                    outbox = OutboxReader(directory, self._key, retired=self._retired)
                    outbox.open()
                    opened[directory.name] = outbox
                records = outbox.poll()
            except (OSError, OutboxError) as exc:  # this directory only: read again later
                problems[directory.name] = (1, f"cannot be read: {exc}")
                gone.discard(directory)
                continue
            if unreadable := outbox.unreadable:
                problems[directory.name] = (len(unreadable), (
                    f"{len(unreadable)} segment(s), {sum(unreadable.values())} bytes, sealed "
                    "under a key this process does not hold: set aside, not forwarded. Restore "
                    "the key (keys/outbox.key, LEDGER_OUTBOX_KEY, or a retired key file) and "
                    "restart the forwarder, or give their forwards up: `ledger forward "
                    "--give-up-unreadable --yes`"))
            found.extend((outbox, r) for r in records)
            if records or outbox.behind:
                gone.discard(directory)
        if gone:
            gone = {d for d in gone if writer_gone(d)}
        if apply_settled:
            for outbox in [*self._outboxes.values(), *opened.values()]:
                if outbox.settling:
                    try:
                        outbox.apply_settled()
                    except OSError as exc:  # raised, it dropped the records read above
                        log.error("outbox %s: what was settled cannot be written down (%s); "
                                  "tried again at the next poll", outbox.directory, exc)
        return directories, gone, found

    def _report(self, problems: dict[str, tuple[int, str]]) -> None:
        """Outbox directories that do not open: logged once each (and once more when they
        recover), a gauge, and the status `/readyz` shows."""
        for name, (count, why) in problems.items():
            if self._unreadable_counts.get(name) != count:  # not again as a segment grows
                log.error("outbox %s: %s", name, why)
            self._metrics.outbox_unreadable.labels(name).set(count)
        for name in set(self.unreadable) - set(problems):
            log.info("outbox %s: readable again", name)
            with contextlib.suppress(KeyError):
                self._metrics.outbox_unreadable.remove(name)
        self.unreadable = {name: why for name, (_, why) in problems.items()}
        self._unreadable_counts = {name: count for name, (count, _) in problems.items()}

    # ---- records written ahead of their commit ----------------------------------------------

    def _ahead(self, outbox: OutboxReader, record: Recovered, now: float) -> None:
        """Hold a record written ahead of its commit until its event is found stored. Its
        body stays in memory while those held stay under `forward_memory_bytes` (else it is
        read back when its turn comes)."""
        header = record.header
        if len(self._unresolved) >= self._settings.forward_max_pending:
            # never waits past the bound: PostgreSQL away for long (a spooled delivery is
            # forwarded by its spooled record meanwhile: then this one is not given up)
            oldest = self._unresolved.pop(0)
            self._unresolved_bytes -= len(oldest.record.body or b"")
            self._unahead(oldest, "backlog_full")
        if self._unresolved_bytes + len(record.body or b"") > self._settings.forward_memory_bytes:
            record.body = None
        self._unresolved_bytes += len(record.body or b"")
        self._unresolved.append(_Ahead(
            outbox, record, (header["member_id"], bytes.fromhex(header["dedup_key"])), now))

    def _void(self, outbox: OutboxReader, record: Recovered) -> None:
        """The delivery a record ahead named was refused: that record is dropped once it is
        still not found stored (nothing was given up: nothing was stored)."""
        header = record.header
        self._voided[(header["member_id"], bytes.fromhex(header["dedup_key"]))] = None
        while len(self._voided) > self._settings.forward_max_pending:
            del self._voided[next(iter(self._voided))]
        for route_id in record.routes:
            outbox.settle(record.location, route_id, "void")

    def _unahead(self, ahead: _Ahead, reason: str) -> None:
        """A record ahead leaves without its event found: dropped if it was forwarded from
        another record (a spooled one) or refused (void), else given up with `reason`."""
        member_id, dedup_key = ahead.identity
        for route_id in ahead.record.routes:
            if (member_id, dedup_key, route_id) in self._seen:
                ahead.outbox.settle(ahead.record.location, route_id, "duplicate")
            elif ahead.identity in self._voided:
                ahead.outbox.settle(ahead.record.location, route_id, "void")
            else:
                item = _item(ahead.outbox, ahead.record.location, ahead.record.header, None)
                self._give_up_item(self._states.get(route_id), route_id, item, reason)

    async def _resolve(self, now: float) -> None:
        """Look up which records ahead of their commit name a stored event (one query for
        those due): those go on to be forwarded, with its position and hash, to every route
        no forward of that event was settled to (by this or another record, as recorded, or
        queued here); those whose delivery was refused are dropped; those not stored by
        `forward_max_age_seconds` after acceptance are given up (`never_stored`); the others
        are looked at again, each poll at first, then less often."""
        try:
            await self._look_up(now)
        finally:
            self._resolving = None

    async def _look_up(self, now: float) -> None:
        """`_resolve`'s work."""
        due = [a for a in self._unresolved[:_RESOLVE_MAX] if a.next_look <= now]
        if not due:
            return
        try:
            async with asyncio.timeout(self._settings.forward_timeout_seconds):
                stored = await self._store.stored(list({a.identity: None for a in due}))
        except (LedgerError, TimeoutError) as exc:  # PostgreSQL away: they wait
            log.debug("records ahead of their commit wait: %s", exc or "look-up timed out")
            for ahead in due:
                ahead.next_look = time.monotonic() + self._settings.spool_retry_seconds
            return
        now = time.monotonic()
        looked = set(due)
        kept: list[_Ahead] = []
        for ahead in self._unresolved:
            if ahead not in looked:
                kept.append(ahead)
                continue
            event = stored.get(ahead.identity)
            if event is None and ahead.identity not in self._voided and (
                    time.time() - float(ahead.record.header["accepted_at"])
                    <= self._settings.forward_max_age_seconds):
                ahead.looks += 1
                ahead.next_look = now + min(
                    _RESOLVE_BACKOFF_MAX,
                    self._settings.forward_poll_seconds * 2 ** max(0, ahead.looks - 4))
                kept.append(ahead)
                continue
            self._unresolved_bytes -= len(ahead.record.body or b"")
            if event is None:
                self._unahead(ahead, "never_stored")
                continue
            member_id, dedup_key = ahead.identity
            owed = []
            for route_id in ahead.record.routes:
                if route_id in event.settled or (member_id, dedup_key, route_id) in self._seen:
                    ahead.outbox.settle(ahead.record.location, route_id, "duplicate")
                else:
                    owed.append(route_id)
                    self._saw(member_id, dedup_key, route_id)  # another record: a duplicate
            if owed:
                ahead.record.routes = owed
                ahead.record.header["position"] = event.position
                ahead.record.header["event_hash"] = event.event_hash.hex()
                self._settling.append((now, ahead.outbox, ahead.record))
        self._unresolved = kept

    def _release(self, now: float) -> list[tuple[OutboxReader, Recovered]]:
        """The held records whose window has passed, and those of lower positions, in ledger
        order (spooled ones, without a position, last)."""
        if not self._settling:
            return []
        window = (self._settings.forward_order_window_seconds
                  if self._live_outboxes > 1 else 0.0)
        due = [(read + window <= now) for read, _, _ in self._settling]
        if not any(due):
            return []
        cutoff = max((r.header["position"] for (_, _, r), d in zip(self._settling, due, strict=True)
                      if d and r.header["position"] is not None), default=None)
        released: list[tuple[OutboxReader, Recovered]] = []
        kept: list[tuple[float, OutboxReader, Recovered]] = []
        for held, d in zip(self._settling, due, strict=True):
            position = held[2].header["position"]
            if d or (cutoff is not None and position is not None and position <= cutoff):
                released.append((held[1], held[2]))
            else:
                kept.append(held)
        self._settling = kept
        released.sort(key=lambda f: (f[1].header["position"] is None,
                                     f[1].header["position"] or 0))
        return released

    def _queue(self, outbox: OutboxReader, record: Recovered, *, current: bool) -> None:
        """Hand a record to each route's lane. A route this process does not know was removed
        if the set was just read from PostgreSQL (`current`: the intake sealed the record
        while the route existed, so the set read since holds its addition); otherwise the
        forward waits for the next reload (`_unpark`)."""
        for route_id in record.routes:
            state = self._states.get(route_id)
            item = _item(outbox, record.location, record.header, record.body)
            self._saw(item.member_id, item.dedup_key, route_id)
            if route_id in self._unrouted or (state is None and not current):
                self._park(route_id, item)
            elif state is None:
                self._give_up_item(None, route_id, item, "route_removed")
            else:
                self._enqueue(state, item)

    def _saw(self, member_id: str, dedup_key: bytes, route_id: str) -> None:
        """A forward of this delivery to this route is under way: never another (bounded)."""
        self._seen[(member_id, dedup_key, route_id)] = None
        if len(self._seen) > _SEEN_MAX:
            del self._seen[next(iter(self._seen))]

    def _park(self, route_id: str, item: _Item) -> None:
        waiting = self._unrouted.setdefault(route_id, [])
        if len(waiting) >= self._settings.forward_max_pending:
            self._give_up_item(None, route_id, item, "backlog_full")
            return
        item.body = None  # read back from the outbox when its turn comes: memory stays small
        waiting.append(item)

    def _expire_parked(self) -> None:
        """Forwards waiting for a route this process does not know yet, past their age: given
        up (`expired`), as they would be in a lane — never kept while PostgreSQL stays away."""
        limit = time.time() - self._settings.forward_max_age_seconds
        for route_id, items in list(self._unrouted.items()):
            while items and items[0].accepted_at < limit:
                self._give_up_item(None, route_id, items.pop(0), "expired")
            if not items:
                del self._unrouted[route_id]

    def _unpark(self) -> None:
        """After a reload from PostgreSQL: the waiting forwards go to their routes' lanes in
        the order they were read — or, for a route the current set does not hold (removed
        since), are given up."""
        unrouted, self._unrouted = self._unrouted, {}
        for route_id, items in unrouted.items():
            state = self._states.get(route_id)
            for item in items:
                if state is None:
                    self._give_up_item(None, route_id, item, "route_removed")
                else:
                    self._enqueue(state, item)

    def _enqueue(self, state: _RouteState, item: _Item) -> None:
        route_id = state.route.route_id
        if state.pending >= self._settings.forward_max_pending and not self._make_room(
            state, item.member_id
        ):
            self._give_up_item(state, route_id, item, "backlog_full")
            return
        state.pending += 1
        if item.body is not None:
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

    def _make_room(self, state: _RouteState, member_id: str) -> bool:
        """The route is at `forward_max_pending`: a portal holding less than its share (the
        bound over the portals with forwards pending) gets room by giving up the newest
        forward of the portal holding most (never one in flight) — one flooding portal never
        gets another's forwards given up. False: `member_id`'s portal is at its share."""
        lane = state.lanes.get(member_id)
        share = self._settings.forward_max_pending // (len(state.lanes) + (lane is None))
        if (len(lane.items) if lane else 0) >= share:
            return False
        largest = max(state.lanes.values(), key=lambda candidate: len(candidate.items),
                      default=None)
        if largest is None or len(largest.items) <= max(share, 1):
            return False
        evicted = largest.items.pop()  # the newest: its lane's order holds
        state.pending -= 1
        if evicted in state.held:
            del state.held[evicted]
            state.held_bytes -= len(evicted.body or b"")
        evicted.body = None
        self._give_up_item(state, state.route.route_id, evicted, "backlog_full")
        return True

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
            item.body = await asyncio.to_thread(item.outbox.read, item.location)
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
        assert item.body is not None
        route = state.route
        item.attempts += 1
        head = item.head
        if head is None and item.unsendable is None:
            head = item.head = self._head(state, item)
        began = time.perf_counter()
        if head is None:  # what the delivery carried cannot go into a request
            answer = Answer(None, item.unsendable)
        else:
            answer = await self._sender.send(state.target, b"%sX-Ledger-Attempt: %d\r\n\r\n%s"
                                             % (head, item.attempts, item.body))
        latency = time.perf_counter() - began
        status, error = answer.status, answer.error
        if error is not None:  # a query string may carry secrets: never into a record or log
            error = _QUERY.sub("?…", error)[:300]
        delivered = status is not None and 200 <= status < 300
        if status is not None and not delivered:
            error = f"HTTP {status}"
        outcome = DELIVERED if delivered else FAILED
        (state.delivered if delivered else state.failed).inc()
        state.last_outcome, state.last_status, state.last_error = outcome, status, error
        state.failing_since = None if delivered else (state.failing_since or time.time())
        now = time.time()
        state.last_attempt_at = now
        self._record(route.route_id, item, outcome, status, error, latency * 1000, now,
                     settles=delivered)
        if delivered:
            state.delivery_seconds.observe(max(0.0, now - item.accepted_at))
        else:
            log.info("route %s position %s attempt %d failed: %s", route.route_id,
                     item.position, item.attempts, error)
        return delivered

    def _head(self, state: _RouteState, item: _Item) -> bytes | None:
        """The forward's request head, the same for each of its attempts but for
        `X-Ledger-Attempt` (added per attempt); None (and why, in `item.unsendable`) when
        the delivery's content type or query cannot be sent."""
        assert item.body is not None
        headers = [("X-Ledger-Route", state.route.route_id), ("User-Agent", "ledger-gateway")]
        if item.content_type is not None:
            headers.append(("Content-Type", item.content_type))
        if item.position is not None:
            headers.append(("X-Ledger-Position", str(item.position)))
            headers.append(("X-Ledger-Event-Hash", item.event_hash or ""))
        else:
            headers.append(("X-Ledger-Spool-Id", item.dedup_key.hex()))
        try:
            return request_head(state.target, f"?{item.raw_query}" if item.raw_query else "",
                                headers, len(item.body))
        except (ValueError, UnicodeError) as exc:
            item.unsendable = f"{type(exc).__name__}: {exc}"
            return None

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
        # delivered: settled once its attempt's record is written (`_attempt`, `_record`)

    def _give_up_item(
        self, state: _RouteState | None, route_id: str, item: _Item, reason: str
    ) -> None:
        """An explicit, recorded outcome: the destination never received this event."""
        self._metrics.given_up.labels(route_id, reason).inc()
        log.warning("route %s: gave up forwarding position %s of portal %s: %s", route_id,
                    item.position, item.member_id, reason)
        if state is not None:
            state.last_outcome, state.last_error = GIVEN_UP, reason
        self._record(route_id, item, GIVEN_UP, None, reason, None, settles=True)

    # ---- the record of attempts -------------------------------------------------------------

    def _record(
        self, route_id: str, item: _Item, outcome: str, status: int | None, error: str | None,
        latency_ms: float | None, at: float | None = None, *, settles: bool = False,
    ) -> None:
        """Hold an attempt's record for the next batch. With `settles` (the forward's outcome)
        the forward is settled in the outbox only once the record is written: settled first,
        a `kill -9` (or a shutdown while PostgreSQL is away) before the write lost the record
        for good — the forward was never sent again, and `audit.forwards` never showed it.
        Now it is sent again after a restart (at least once) and recorded then."""
        settle = (item.outbox, item.location, route_id, outcome) if settles else None
        if len(self._records) >= _RECORDS_MAX:  # PostgreSQL away for long: counted, logged
            self._metrics.unrecorded.inc()
            log.warning("forward attempt not recorded (PostgreSQL away): route %s position "
                        "%s attempt %d %s %s", route_id, item.position, item.attempts, outcome,
                        error or status)
            _settle(settle)  # no record will come to wait for
            return
        accepted = item.accepted
        if accepted is None:
            accepted = item.accepted = datetime.fromtimestamp(item.accepted_at, UTC)
        self._records.append(AttemptRecord(
            route_id, item.member_id, item.position, item.dedup_key, item.attempts, outcome,
            status, error, latency_ms, accepted, datetime.fromtimestamp(at or time.time(), UTC),
        ))
        self._settles.append(settle)
        self._records_wake.set()

    async def _flush_records(self) -> bool:
        """Write the held attempt records; False when PostgreSQL did not take them."""
        async with self._records_lock:  # one writer: a batch is written once
            batch = self._records[:1000]
            if not batch:
                return True
            try:
                await self._store.record_attempts(batch)
            except DatabaseUnavailable as exc:
                log.warning("%d forward attempt records wait: %s", len(self._records), exc)
                return False
            except Exception as exc:  # noqa: BLE001 - refused data: find the record alone
                return await self._record_singly(len(batch), exc)
            self._written(len(batch))
            return True

    def _written(self, count: int) -> None:
        """The first `count` held records are written (or refused for good): let them go and
        settle the forwards they end."""
        settles = self._settles[:count]
        del self._records[:count], self._settles[:count]
        for settle in settles:
            _settle(settle)

    async def _record_singly(self, count: int, refused: Exception) -> bool:
        """PostgreSQL refused a batch's data, not its availability: write the first `count`
        records one by one and leave out only one refused alone (logged at ERROR, counted as
        unrecorded) — retrying the same batch forever held every later record back until they
        were dropped. Called with the records lock held."""
        log.error("a batch of %d forward attempt records was refused (%s); writing them one "
                  "by one", count, refused)
        for _ in range(count):
            record = self._records[0]
            try:
                await self._store.record_attempts([record])
            except DatabaseUnavailable as exc:
                log.warning("%d forward attempt records wait: %s", len(self._records), exc)
                return False
            except Exception as exc:  # noqa: BLE001 - this one record can never be written
                self._metrics.unrecorded.inc()
                log.error("forward attempt left unrecorded (PostgreSQL refuses it: %s): route "
                          "%s position %s attempt %d %s", exc, record.route_id, record.position,
                          record.attempt, record.outcome)
            self._written(1)
        return True

    async def _record_loop(self) -> None:
        """Write attempt records in batches: one INSERT per `RECORD_BATCH_SECONDS` at most
        (an INSERT as soon as any record waited cost PostgreSQL and this process about as much
        as the forward itself under load)."""
        while not self._closing:
            await self._records_wake.wait()
            await asyncio.sleep(RECORD_BATCH_SECONDS)  # the batching interval
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
        for outbox in self._outboxes.values():
            await asyncio.to_thread(outbox.apply_settled)

    async def _outbox_loop(self) -> None:
        """Read what was appended, write down what was settled and delete what is no longer
        owed — off the event loop (see `ledger.gateway.outbox`)."""
        while not self._closing:
            if self._idle():  # nothing to forward to: look as often as the status is
                with contextlib.suppress(TimeoutError):  # published, or at once at a new route
                    await asyncio.wait_for(self._routed.wait(), min(
                        self._settings.forward_status_seconds,
                        self._settings.routes_reload_seconds))
            else:
                await asyncio.sleep(self._settings.forward_poll_seconds)  # the interval
            try:
                await self.poll(apply_settled=True)
            except OSError as exc:  # a disk error: keep trying, loudly
                log.error("outbox %s: %s", self._settings.outbox_root, exc)

    def _idle(self) -> bool:
        """No route, and nothing read, waiting for a route or being settled: polling the
        outboxes 20 times a second then cost ~1.7 % of a core for nothing. A record the intake
        appends is for a route it knows, which this process learns by its next reload or by
        reading that record (the first forward to a new route waits at most the shorter of
        the reload and status intervals longer than before)."""
        return not (self._states or self._settling or self._unrouted or self._unresolved
                    or any(o.settling for o in self._outboxes.values()))

    async def _status_loop(self) -> None:
        """Publish route health and this process's metrics for the intake (and say that this
        process is alive)."""
        while not self._closing:
            self._sender.sweep()  # kept-alive connections idle too long, gone destinations
            try:
                self.publish()
            except OSError as exc:
                log.error("cannot publish the forwarder's status: %s", exc)
            await asyncio.sleep(self._settings.forward_status_seconds)  # the interval

    def publish(self) -> None:
        status.publish(self._settings, self.health(), generate_latest(self.registry),
                       unreadable=self.unreadable)

    # ---- health -----------------------------------------------------------------------------

    def backlog(self) -> dict[str, tuple[int, float]]:
        """Per route: forwards pending and the age of the oldest — those waiting for a route
        this process does not know yet (`_park`) included."""
        now = time.time()
        found = {
            rid: (s.pending, max((now - lane.items[0].accepted_at for lane in s.lanes.values()
                                  if lane.items), default=0.0))
            for rid, s in self._states.items()
        }
        for rid, items in list(self._unrouted.items()):
            if items:
                pending, age = found.get(rid, (0, 0.0))
                found[rid] = (pending + len(items), max(age, now - items[0].accepted_at))
        return found

    def health(self) -> list[RouteHealth]:
        backlog = self.backlog()
        return [
            RouteHealth(
                route=s.route,
                state="refused" if s.refused else "failing" if s.failing_since else "ok",
                backlog=backlog[rid][0], oldest_pending_seconds=backlog[rid][1],
                last_outcome=s.last_outcome, last_status=s.last_status,
                last_error=s.last_error, refused=s.refused,
                last_attempt_at=(None if s.last_attempt_at is None
                                 else datetime.fromtimestamp(s.last_attempt_at, UTC)),
            )
            for rid, s in self._states.items()
        ]


def unreadable_outbox(settings: Settings) -> list[tuple[Path, int]]:
    """The outbox segments no key at hand opens (neither `keys/outbox.key` or
    `LEDGER_OUTBOX_KEY` — never created here — nor a retired key), with how many records each
    holds (counted by their plaintext framing). Blocking I/O."""
    configured = settings.outbox_key.get_secret_value() if settings.outbox_key else None
    keys = retired_keys(settings.keys_dir) + _overridden_key(settings, configured)
    if configured or (settings.keys_dir / KEY_NAME).exists():
        keys.insert(0, load_key(settings.keys_dir / KEY_NAME, configured))
    return [(path, len(frames(path)))
            for path in unreadable_segments(settings.outbox_root, keys)]


async def give_up_unreadable(
    settings: Settings, store: GatewayStore, segments: list[tuple[Path, int]]
) -> int:
    """Set segments no key opens aside (`outbox/given-up/worker-N/`, still sealed: delete them
    at will) and record each record in them as a forward given up (`outbox_key_lost`), so
    `audit.forwards` shows every delivery the bot will never get. Which event each was cannot
    be known without the key: the record names the portal and route `unknown`, no position,
    and an identity derived from the record's place (directory, segment, offset), its
    acceptance time that of the segment's creation. Recorded first, moved after: a run
    interrupted in between leaves the segment in place, and the next run records only what
    is not recorded yet (by those identities) — none lost, none recorded twice."""
    aside_root = settings.outbox_root / "given-up"
    now = datetime.now(UTC)
    total = 0
    for path, _ in segments:
        directory = path.parent.name
        created = datetime.fromtimestamp(int(path.stem[4:]) / 1e9, UTC)
        records = [
            AttemptRecord(UNKNOWN, UNKNOWN, None,
                          hashlib.sha256(f"{directory}/{path.name}:{offset}".encode())
                          .digest()[:16], 0, GIVEN_UP, None, KEY_LOST, None, created, now)
            for offset in await asyncio.to_thread(frames, path)
        ]
        for start in range(0, len(records), 1000):
            batch = records[start : start + 1000]
            recorded = await store.given_up(UNKNOWN, [r.dedup_key for r in batch], KEY_LOST)
            if batch := [r for r in batch if r.dedup_key not in recorded]:
                await store.record_attempts(batch)
        aside = aside_root / directory
        await asyncio.to_thread(aside.mkdir, parents=True, exist_ok=True, mode=0o700)
        await asyncio.to_thread(path.rename, aside / path.name)
        log.warning("outbox %s/%s set aside: %d forward(s) given up (%s)", directory,
                    path.name, len(records), KEY_LOST)
        total += len(records)
    return total


def _settle(settle: _Settle | None) -> None:
    if settle is not None:
        outbox, location, route_id, outcome = settle
        outbox.settle(location, route_id, outcome)


def _item(
    outbox: OutboxReader, location: Location, header: dict[str, Any], body: bytes | None
) -> _Item:
    return _Item(
        outbox=outbox,
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


__all__ = ["Forwarder", "RouteHealth", "give_up_unreadable", "outbox_key", "outbox_keys",
           "unreadable_outbox"]
