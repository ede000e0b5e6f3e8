"""HTTP: the app factory, its wiring, the intake route and health checks.

Handlers stay thin: read the request, call a service, shape the answer. Ledger errors become
HTTP answers in one middleware; nothing here knows SQL.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ledger import checkpoints, wire
from ledger.adoption import SpoolAdopter
from ledger.api import AUDIT, READS, TREES, create_api, json_response, plain_headers
from ledger.audit import AuditService, FoldGate, ReadGate
from ledger.checkpointer import Checkpointer
from ledger.committer import GroupCommitter
from ledger.confirmation import RestConfirmer
from ledger.console import create_console
from ledger.console.app import CONSOLE_STORE
from ledger.errors import (
    DatabaseUnavailable,
    DeliveryRejected,
    LedgerError,
    LockWaitTimeout,
    SchemaNotMigrated,
    UnreadableBody,
)
from ledger.gateway.forwarder import outbox_key
from ledger.gateway.handoff import HANDOFF, Handoff
from ledger.gateway.outbox import OutboxWriter
from ledger.intake import Delivery, IntakeService
from ledger.metrics import CONTENT_TYPE, SAMPLE_SECONDS, Metrics
from ledger.offline import Appender, OfflineTrust
from ledger.proving import TreeFollower
from ledger.recent import RecentCommits
from ledger.redaction import scrub_text
from ledger.settings import Settings
from ledger.spool import FileOps, Spool, claim_own
from ledger.storage import target as targets
from ledger.storage.audit_store import AuditStore
from ledger.storage.console_store import ConsoleStore
from ledger.storage.gateway_store import GatewayStore
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, Pool, close_pool, create_pool, ping
from ledger.storage.tree_store import TreeStore
from ledger.supervision import Supervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seams:
    """Where a test reaches into a running app; production passes none.

    `fault` is called with a step name at every step of every background task ("commit",
    "drain", "checkpoint") and may raise to crash that task from the
    inside; `spool_files` are the calls the spool writes with.
    """

    fault: Callable[[str], None] | None = None
    spool_files: FileOps | None = None


@dataclass
class ProjectorLag:
    """The projector's lag as last read from the database, for the lag gauge (the projector
    runs in a process of its own, `ledger project --follow`)."""

    events: int = 0


SETTINGS = web.AppKey("settings", Settings)
TARGET = web.AppKey("target", targets.DatabaseTarget)
POOL = web.AppKey("pool", Pool)
STORE = web.AppKey("store", EventStore)
COMMITTER = web.AppKey("committer", GroupCommitter)
INTAKE = web.AppKey("intake", IntakeService)
CHECKPOINTER = web.AppKey("checkpointer", Checkpointer)
LAG = web.AppKey("projector_lag", ProjectorLag)
METRICS = web.AppKey("metrics", Metrics)
SPOOL = web.AppKey("spool", Spool)
ADOPTER = web.AppKey("spool_adopter", SpoolAdopter)
# how long a worker waits at start-up for its own spool's lock: a running worker that adopted
# it holds it for one drain pass (`ledger.adoption`: about a second, more when an append or the
# journal's lock is slow); past this, another process drains it (a second `serve`?)
SPOOL_CLAIM_SECONDS = 60.0
OFFLINE = web.AppKey("offline", OfflineTrust)
TREE_FOLLOWER = web.AppKey("tree_follower", TreeFollower)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
SEAMS = web.AppKey("seams", Seams)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READS_RESERVE = 2  # pool connections no read request may take (`ReadGate`)
READ_WAIT_SECONDS = 10.0  # how long a read waits for a place before a 503 `reads_busy`


def error_response(status: int, code: str, message: str) -> web.Response:
    """An error as JSON, with the read API's headers: a console page that failed (a 5xx
    reaches this middleware) or a path nothing serves is answered here, not by the console."""
    response = json_response({"error": code, "message": message}, status)
    plain_headers(response)
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place an error becomes HTTP: every 4xx/5xx answer is JSON with a reason.

    Ledger errors carry their own status and code (`ledger.errors`); anything else is a bug,
    logged with its traceback and answered 500 without details.
    """
    try:
        return await handler(request)
    except LedgerError as exc:
        if exc.status >= 500 and not exc.logged_already:
            log.error("%s %s: %s", request.method, request.path, exc,
                      exc_info=exc.status == 500)
        response = error_response(exc.status, exc.code, exc.message)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        if exc.closes_connection:
            # aiohttp would otherwise drain the rest of the broken body for keep-alive and log
            # each decoding failure as an "Unhandled exception": read no more of it, and close
            request.content.feed_eof()
            response.force_close()
        _release(exc)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason.lower().replace(" ", "_"),
                                  exc.text or "")
        if "Allow" in exc.headers:  # a 405 names the methods that would work (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("%s %s failed unexpectedly", request.method, request.path)
        return error_response(500, "internal_error", "the ledger failed unexpectedly; see its log")


def _release(exc: BaseException) -> None:
    """Let a refused request's frames go now. Its traceback holds the frames it passed through,
    with their locals (the body, the fields decoded so far), and one of them holds the
    exception: a cycle, freed only by the cycle collector — which waits for
    `GC_YOUNG_THRESHOLD` new objects, many refused bodies' worth. Once answered, nothing reads
    the exception's traceback or chain again."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None


async def _read_body(request: web.Request, limit: int) -> tuple[bytes, bool]:
    """The raw body, read no further than `limit`; True when it was cut off there."""
    if request.content_length is not None and request.content_length > limit:
        return b"", True
    if request.content.is_eof():  # all of it arrived with the headers: taken as it lies
        body = request.content.read_nowait()
        return (body[:limit], True) if len(body) > limit else (body, False)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            chunks.append(chunk[: max(0, limit - (size - len(chunk)))])
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False


def _delivery(request: web.Request, body: bytes) -> Delivery:
    """The request's parts the intake records, made safe at the edge: the HTTP server hands
    bytes it cannot decode over as lone surrogates, which neither JSON nor PostgreSQL can hold
    (README, "Hostile input")."""
    content_type = request.headers.get("Content-Type")
    if content_type != wire.FORM:  # (Bitrix24's own needs no making safe: most requests)
        content_type = wire.safe_text(content_type)
        content_type = scrub_text(content_type) if content_type else None
    return Delivery(
        body=body,
        content_type=content_type,
        raw_query=request.rel_url.raw_query_string,  # decoded (and checked) by the intake
        peer=wire.safe_text(request.remote),
    )


async def receive_event(request: web.Request) -> web.Response:
    settings, intake = request.app[SETTINGS], request.app[INTAKE]
    try:
        if request.content.is_eof():  # all of it arrived with the headers: nothing to wait for
            body, truncated = await _read_body(request, settings.max_body_bytes)
        else:  # a timer per request costs ~4 µs: only for a body still on its way
            async with asyncio.timeout(settings.body_timeout_seconds):
                body, truncated = await _read_body(request, settings.max_body_bytes)
    except TimeoutError:
        rejected = DeliveryRejected(
            408, "body_timeout", f"body not received within {settings.body_timeout_seconds:g}s"
        )
        await intake.refuse(_delivery(request, b""), rejected)
        raise rejected from None
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        # a body the HTTP layer cannot read (a broken gzip/deflate, a short chunked body): the
        # sender's fault, answered and recorded like any other refusal — not a bug
        rejected = UnreadableBody(f"the body could not be read: {exc.__class__.__name__}")
        await intake.refuse(_delivery(request, b""), rejected)
        raise rejected from None
    except ConnectionResetError:
        # the sender went away mid-body: nobody is left to answer, nothing was acknowledged
        log.info("a sender from %s went away before its body arrived",
                 wire.safe_text(request.remote))
        raise web.HTTPBadRequest(text="connection lost") from None
    delivery = _delivery(request, body)
    if truncated:
        rejected = DeliveryRejected(
            413, "body_too_large", f"body exceeds {settings.max_body_bytes} bytes"
        )
        await intake.refuse(delivery, rejected)
        raise rejected
    receipt = await intake.receive(delivery)
    # "spooled": durable locally, stored (and given its position) when PostgreSQL is back
    status = "spooled" if receipt.spooled else "duplicate" if receipt.duplicate else "stored"
    return json_response(
        {
            "status": status,
            "position": receipt.position,
            "duplicate": receipt.duplicate,
            "event": receipt.event_type,
        },
        202 if receipt.spooled else 200,
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 with a reason per failing check: the database (reachable, schema current), every
    supervised background task running, the projector not stalled, the spool writable and not
    nearly full."""
    checks: dict[str, str] = {}
    try:
        await ping(request.app[POOL])
        await targets.require_current_schema(request.app[POOL])
        checks["database"] = "ok"
    except LedgerError as exc:
        checks["database"] = str(exc)
    down = request.app[SUPERVISOR].down()
    checks["tasks"] = "; ".join(f"{name}: {why}" for name, why in down.items()) or "ok"
    checks["projector"], projection = await _projector_check(request.app)
    if request.app[SETTINGS].run_tree_follower:
        checks["tree"] = "down: see tasks" if "tree-follower" in down else "ok"
    elif request.app[SETTINGS].tree_in_projector_process:
        checks["tree"] = await _tree_check(request.app)
    spool = request.app[SPOOL]
    unwritable = await asyncio.to_thread(spool.health)
    checks["spool"] = (
        f"unwritable: {unwritable}" if unwritable is not None
        else f"nearly full: {spool.size} of {spool.max_bytes} bytes"
        if spool.size > 0.9 * spool.max_bytes
        else "ok"
    )
    ready = all(v == "ok" for v in checks.values())
    # gateway mode: reported, never a reason to stop intake (a destination down, or the
    # forwarder process, is not ours to wait for)
    handoff = request.app[HANDOFF]
    forwarding = [h.as_json() for h in handoff.health()]
    forwarder = handoff.forwarder()
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": checks,
        "projector": projection,
        "spool": {"records": spool.records, "bytes": spool.size,
                  "oldest_seconds": round(spool.age_seconds(), 3),
                  # undrained spools of worker numbers no process runs, as of the last look
                  # (`ledger.adoption`): a running worker drains them
                  "absent_workers": [a.as_json() for _, a in
                                     sorted(request.app[ADOPTER].absent.items())]},
        "forwarding": [
            {k: h[k] for k in ("route_id", "state", "backlog", "oldest_pending_seconds",
                               "last_error")} for h in forwarding
        ],
        # the intake's own part: whether forwards are being given up (stalled or full outbox)
        "outbox": handoff.sealing(),
        "forwarder": (
            {"state": "running", "pid": forwarder.pid,
             "status_age_seconds": round(forwarder.age_seconds, 3),
             # outbox directories that do not open (another key): the others go on
             "unreadable_outboxes": forwarder.unreadable_outboxes}
            if forwarder is not None else
            {"state": "down", "pid": None, "status_age_seconds": None}
        ),
    }
    return json_response(body, 200 if ready else 503)


async def _projector_check(app: web.Application) -> tuple[str, dict[str, int] | None]:
    """Whether the projector (another process) keeps up, judged from the database: stalled
    when events wait unfolded and neither the checkpoint has moved nor the oldest of them
    arrived within `projector_stall_seconds`."""
    settings = app[SETTINGS]
    try:
        progress = await app[AUDIT].progress()
    except LedgerError as exc:
        return ("ok" if not settings.run_projector else f"unknown: {exc}"), None
    lag = max(0, progress["head"] - progress["checkpoint"])
    app[LAG].events = lag
    stall = settings.projector_stall_seconds
    stalled = (settings.run_projector and lag > 0 and progress["idle_seconds"] > stall
               and (progress["waiting_seconds"] or 0.0) > stall)
    check = (f"stalled: {lag} events behind, none folded for over {stall:g}s (is the "
             "projector process running? see the log)") if stalled else "ok"
    return check, {"checkpoint": progress["checkpoint"], "lag": lag}


async def _tree_check(app: web.Application) -> str:
    """Whether the Merkle tree, grown in the projector's process, keeps up with the chain:
    judged from the database like the projector (`_projector_check`), with its stall limit."""
    try:
        progress = await app[TREES].progress()
    except LedgerError as exc:
        return f"unknown: {exc}"
    lag = max(0, progress["head"] - progress["size"])
    stall = app[SETTINGS].projector_stall_seconds
    waiting = progress["waiting_seconds"] or 0.0
    if lag > 0 and progress["idle_seconds"] > stall and waiting > stall:
        return (f"stalled: {lag} events not in the Merkle tree, none added for over {stall:g}s "
                "(is the projector process running? see the log)")
    return "ok"


# The projector and the tree follower gather a second and a quarter of one after a wake-up:
# NOTIFY more often than this per worker woke them (and their backends) for nothing.
NOTIFY_EVERY_SECONDS = 0.05


def _database_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        target = await targets.open_target(settings)
        try:
            pool = await _open_pool(target, settings)
            try:
                app[TARGET], app[POOL] = target, pool
                app[STORE] = store = EventStore(
                    pool, policy=settings.trust_policy, notify_every=NOTIFY_EVERY_SECONDS,
                    one_round_trip=settings.append_one_round_trip, keep_connection=True)
                app[CONSOLE_STORE] = ConsoleStore(pool)
                yield
                await store.let_go_ahead()
                await store.release_kept()
                await store.announcer.flush()  # the last commits are announced, then closed
            finally:
                await close_pool(pool)
        finally:
            target.release()

    return ctx


async def _open_pool(target: targets.DatabaseTarget, settings: Settings) -> Pool:
    """The service's pool, checked against the schema; when an external PostgreSQL is down at
    start-up, or any PostgreSQL goes away during the check, a pool not yet checked — the intake
    then spools until the schema check passes."""
    timeout = settings.connect_timeout_seconds
    try:
        pool = await create_pool(target.service_dsn, size=settings.pool_size,
                                 connect_timeout=timeout)
    except DatabaseUnavailable as exc:
        if target.embedded is not None:
            raise
        log.error("PostgreSQL is unreachable at start-up (%s); deliveries are spooled "
                  "until it is back", exc)
        return await create_pool(target.service_dsn, size=settings.pool_size, connect=False,
                                 connect_timeout=timeout)
    try:
        await targets.require_current_schema(pool)
    except DatabaseUnavailable as exc:
        # Connected, then lost (a backend killed, a restart): an outage like any other, not a
        # reason to exit — `serve` would take a worker's exit here for a failure it cannot
        # mend and stop them all. The committer's gate checks the schema before any append.
        log.error("PostgreSQL went away during the start-up schema check (%s); deliveries are "
                  "spooled until it is back", exc)
    except BaseException:
        await pool.close()
        raise
    return pool


async def _schema_gate(pool: Pool) -> bool:
    """Appending may start once PostgreSQL answers with the schema this code expects."""
    try:
        await targets.require_current_schema(pool)
    except SchemaNotMigrated as exc:
        log.error("%s; deliveries stay spooled", exc)
        return False
    except LedgerError:
        return False
    return True


async def _supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    """Every long-running task of the service runs under this one supervisor (restarted after a
    crash, readiness failing while it is down); anything still running at the end is stopped."""
    supervisor = Supervisor(app[METRICS], first_backoff=app[SETTINGS].task_restart_seconds)
    app[SUPERVISOR] = supervisor
    yield
    await supervisor.close()


async def _committer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # this worker's spool is drained by one process at a time: the lock is held while it runs
    # (a running worker that adopted it while this number was absent lets go after its pass)
    held = await claim_own(settings.spool_path, worker=settings.worker,
                           seconds=SPOOL_CLAIM_SECONDS)
    try:
        async for _ in _committing(app):
            yield
    finally:
        os.close(held)


async def _committing(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    spool = Spool(settings.spool_path, max_bytes=settings.spool_max_bytes,
                  files=app[SEAMS].spool_files)
    if spool.has_pending():
        log.warning("%d deliveries wait in the spool %s; draining", spool.records,
                    spool.directory)
    app[SPOOL] = spool
    app[METRICS].watch_spool(lambda: spool.records, spool.age_seconds)
    offline = OfflineTrust(settings.trust_dir, worker=settings.worker,
                           policy=settings.trust_policy,
                           recent=RecentCommits(max_entries=settings.offline_cache_entries,
                                                max_bytes=settings.offline_cache_bytes))
    await offline.start(app[STORE])
    app[OFFLINE] = offline
    committer = GroupCommitter(
        Appender(app[STORE], offline),
        max_events=settings.batch_max_events,
        max_delay=settings.batch_max_delay_ms / 1000,
        metrics=app[METRICS],
        spool=spool,
        retry_seconds=settings.spool_retry_seconds,
        gate=lambda: _schema_gate(app[POOL]),
        append_timeout=settings.append_timeout_seconds,
        fault=app[SEAMS].fault,
    )
    if spool.corrupt_found:  # a torn tail moved aside: what it promised offline is undone
        try:
            await asyncio.to_thread(committer.forget_lost)
        except LockWaitTimeout as exc:  # not a reason not to start: logged, left open
            log.error("the journal entries of the torn spool records stay open: %s", exc)
    app[STORE].lock_ahead_when(committer.waiting)  # one round trip less a busy batch
    ways = app[METRICS].append_ways
    counters = {way: ways.labels(way) for way in ("one_statement", "retried", "long")}
    app[STORE].count_ways(lambda way: counters[way].inc())  # no labels() lookup a commit
    app[SUPERVISOR].start("committer", committer.run, on_crash=committer.fail_pending)
    app[COMMITTER] = committer
    supervisor = app[SUPERVISOR]
    supervisor.start(
        "trust-refresh",
        lambda: _refresh_trust(offline, app[STORE], settings.trust_refresh_seconds),
    )
    # its appends beside the committer's, on a store of its own (no head lock taken ahead,
    # no kept connection shared with the committer)
    adopted = EventStore(app[POOL], policy=settings.trust_policy,
                         notify_every=NOTIFY_EVERY_SECONDS, one_round_trip=False)
    app[ADOPTER] = adopter = SpoolAdopter(
        settings.spool_path.parent, worker=settings.worker, store=adopted, offline=offline,
        gate=lambda: _schema_gate(app[POOL]), max_bytes=settings.spool_max_bytes,
        max_events=settings.batch_max_events, retry_seconds=settings.spool_retry_seconds,
        append_timeout=settings.append_timeout_seconds, metrics=app[METRICS])
    app[METRICS].watch_absent_spools(
        lambda: sum(a.bytes for a in adopter.absent.values()),
        lambda: max([(datetime.now(UTC) - a.oldest).total_seconds()
                     for a in adopter.absent.values() if a.oldest is not None], default=0.0))
    supervisor.start("spool-adoption", lambda: adopter.run(settings.spool_retry_seconds))
    async with aiohttp.ClientSession() as session:
        confirmer = RestConfirmer(session, base_url=settings.bitrix24_rest_url,
                                  timeout=settings.confirm_timeout_seconds,
                                  app_code=settings.bitrix24_app_code,
                                  require_admin=settings.confirm_require_admin)
        handoff = app[HANDOFF]
        app[INTAKE] = intake = IntakeService(settings, committer, app[METRICS],
                                             confirmer=confirmer, forward=handoff.accept,
                                             forwards=handoff.forwards,
                                             vouches=app[STORE].vouches)
        supervisor.start("intake-summary",
                         lambda: intake.summarize_forever(settings.log_summary_seconds))
        yield
        await supervisor.stop("intake-summary")
        line = intake.summary()
        if line is not None:
            log.info("%s since the last summary", line)
        committer.finish()  # answers every delivery already taken before returning
        await supervisor.join("committer")
        intake.close()
    await supervisor.stop("spool-adoption")
    await adopted.announcer.flush()
    await supervisor.stop("trust-refresh")


async def _refresh_trust(offline: OfflineTrust, store: EventStore, every: float) -> None:
    """Keep the offline trust state current with changes made anywhere (other workers, the
    CLI), so a later outage judges by them, and settle any worker's lifecycle doubt PostgreSQL
    can answer (`OfflineTrust.settle_doubts`: a stat of the journal when there is none).
    PostgreSQL being away is waited out; anything else raises, for the supervisor to log,
    count and restart."""
    while True:
        await asyncio.sleep(every)
        try:
            await offline.refresh(store)
        except LedgerError:
            continue  # PostgreSQL away: the state stays as last known
        try:
            await offline.settle_doubts(store)
        except DatabaseUnavailable:
            continue
        except LedgerError:  # PostgreSQL refused a statement: tried again next time
            log.exception("a lifecycle doubt could not be settled")


async def _handoff_ctx(app: web.Application) -> AsyncIterator[None]:
    """Gateway mode, the intake's part: seal durable deliveries into this worker's outbox
    (ledger.gateway.handoff); the forwarder process does the rest."""
    settings = app[SETTINGS]
    key = await asyncio.to_thread(outbox_key, settings)
    outbox = await asyncio.to_thread(OutboxWriter, settings.outbox_path, key)
    handoff = Handoff(settings, GatewayStore(app[POOL]), outbox, app[SUPERVISOR],
                      app[METRICS])
    await handoff.start()
    app[HANDOFF] = handoff
    app[METRICS].append_text(handoff.metrics_text)
    yield
    await handoff.close()


async def _checkpoint_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.checkpoint_dir is None:
        yield
        return
    checkpointer = Checkpointer(
        app[STORE],
        app[COMMITTER],
        checkpoints.load_private_key(settings.signing_key_path),
        origin=settings.origin,
        directory=settings.checkpoint_dir,
        every_events=settings.checkpoint_every_events,
        every_seconds=settings.checkpoint_every_seconds,
        fault=app[SEAMS].fault,
    )
    app[CHECKPOINTER] = checkpointer
    app[SUPERVISOR].start("checkpointer", checkpointer.run)
    yield
    await app[SUPERVISOR].stop("checkpointer")


async def _projection_ctx(app: web.Application) -> AsyncIterator[None]:
    """The read side: the audit service over the service's pool (it never writes projections:
    the projector, `ledger project --follow`, runs in a process of its own). While a projector
    is expected, its lag is read from the database for the lag gauge."""
    settings = app[SETTINGS]
    app[AUDIT] = audit = AuditService(
        app[STORE], ProjectionStore(app[POOL]), AuditStore(app[POOL]),
        folds=FoldGate(settings.max_concurrent_folds, settings.fold_wait_seconds),
    )
    lag = app[LAG] = ProjectorLag()
    app[METRICS].watch_lag(lambda: lag.events)
    if not settings.run_projector:
        yield
        return

    async def watch() -> None:
        while True:
            try:
                progress = await audit.progress()
                lag.events = max(0, progress["head"] - progress["checkpoint"])
            except LedgerError:
                pass  # the database away: readiness says so; the gauge keeps its last value
            await asyncio.sleep(SAMPLE_SECONDS)  # pacing a sample, not waiting for a result

    app[SUPERVISOR].start("projector-lag", watch)
    yield
    await app[SUPERVISOR].stop("projector-lag")


async def _tree_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Merkle tree follower: grows the tree after each commit, outside the append; run
    supervised (restarted and reported like the committer and the projector)."""
    settings = app[SETTINGS]
    trees = TreeStore(app[POOL])
    app[TREES] = trees
    follower = TreeFollower(trees, batch=settings.tree_batch)
    app[TREE_FOLLOWER] = follower
    if not settings.run_tree_follower:
        yield
        return
    app[SUPERVISOR].start("tree-follower", lambda: follower.run(
        app[TARGET].service_dsn, poll_seconds=settings.tree_poll_seconds,
        gather_seconds=settings.tree_gather_ms / 1000))
    yield
    await app[SUPERVISOR].stop("tree-follower")


SWITCH_INTERVAL_SECONDS = 0.0005


async def _switch_interval_ctx(app: web.Application) -> AsyncIterator[None]:
    """Hand the GIL back to the event loop within 0.5 ms (Python's default: 5 ms) while the
    intake's decoding thread works on a large body: under a flood of worst-case bodies genuine
    p50/p99 grew 1.7x/3.0x instead of 3.7x/7.6x (bench/RESULTS.md, "Hostile intake")."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    yield
    sys.setswitchinterval(previous)


class _ParserRefusals(logging.Filter):
    """aiohttp logs a request its own parser refused (a bad request line, a header over 8 KiB,
    a body encoding it cannot decode) with a full traceback at ERROR: log volume and alarm any
    sender could cause. Such a record becomes one INFO line naming what was refused."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError) or isinstance(
            getattr(exc, "__cause__", None), HttpProcessingError
        ):
            try:
                reason = wire.safe_text(" ".join(str(exc).split()), 200)
                record.args = (record.getMessage(), reason)
            except Exception:  # noqa: BLE001 — a filter that raises turns the answer into a 500
                return True
            record.msg = "%s: %s (refused by the HTTP parser, not recorded)"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


async def _parser_log_ctx(app: web.Application) -> AsyncIterator[None]:
    server_log, refusals = logging.getLogger("aiohttp.server"), _ParserRefusals()
    server_log.addFilter(refusals)
    yield
    server_log.removeFilter(refusals)


# gen1 collections per full (gen2) collection; Python's default is 10. With the young threshold
# below, a full collection comes after as many allocations (2,000 x 10 x 500) as with 10,000 x
# 10 x 100 before: a tenth as often as Python's defaults would.
GC_FULL_EVERY = 500
# Young objects the cycle collector lets accumulate before it looks (Python's default: 700).
# What a delivery allocates is freed by reference counting as its request ends; at 700 the
# collector ran every ~23 deliveries over the objects of every request in flight, ~7 % of the
# intake's CPU at saturation (bench/RESULTS.md, "Server CPU per delivery outside the draft").
# Not 10,000 either: what the service keeps (caches, templates, recent commits) is young until
# looked at, and at a fixed 1000/s, with caches cold between deliveries, a young collection of
# 10,000 took 2-5 ms and the gen1 one over ten of them 13-20 ms — each an event-loop stall the
# requests queued behind; at 2,000, 0.8 and 1.5-3 ms, for +3 µs of CPU per delivery at
# saturation (bench/RESULTS.md, "sixth session"). Garbage in cycles still triggers it: a
# refusal's cycle is cut as it is answered (`_release`), or a flood of large refused bodies
# would wait for it.
GC_YOUNG_THRESHOLD = 2_000


async def _gc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Move everything start-up allocated out of the collector's sight: otherwise full
    collections over it stall requests by tens of milliseconds (bench/RESULTS.md). And collect
    in full ten times less often than Python would: what the service keeps — the decoding
    templates and key caches, tens of thousands of tracked objects — made each full collection
    a 13-35 ms stall of the event loop, every ~2 s at 1000 deliveries/s (bench/RESULTS.md,
    "Latency at 1000/s, third session"); a full one still comes (and frees cycles) every
    `GC_FULL_EVERY` gen1 ones. The young generation grows to `GC_YOUNG_THRESHOLD` before it is
    looked at: larger saves CPU under load, smaller keeps each young collection's stall short."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    ours = (max(GC_YOUNG_THRESHOLD, thresholds[0]), thresholds[1], GC_FULL_EVERY)
    gc.set_threshold(*ours)
    yield
    if gc.get_threshold() == ours:  # (apps stopped out of order, as in tests)
        gc.set_threshold(*thresholds)
    gc.unfreeze()


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep this worker's sampled gauges fresh (multiprocess metrics only), supervised."""
    if app[METRICS].samples:
        app[SUPERVISOR].start("metrics-sampler", app[METRICS].sample_forever)
    yield
    await app[SUPERVISOR].stop("metrics-sampler")


def create_app(settings: Settings, *, seams: Seams | None = None) -> web.Application:
    """Wire settings, the database, the store and the intake; nothing exists before this.
    `seams` are for tests only."""
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=settings.max_body_bytes + 1
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(settings.metrics_dir)
    app[SEAMS] = seams or Seams()
    # reads (read API and console) leave READS_RESERVE connections of the pool to the intake
    # (its kept append connection, the next batch's head lock, drains) and /readyz
    app[READS] = ReadGate(max(1, settings.pool_size - READS_RESERVE), READ_WAIT_SECONDS)
    app.cleanup_ctx.append(_parser_log_ctx)
    app.cleanup_ctx.append(_supervisor_ctx)
    app.cleanup_ctx.append(_database_ctx(settings))
    app.cleanup_ctx.append(_handoff_ctx)
    app.cleanup_ctx.append(_committer_ctx)
    app.cleanup_ctx.append(_tree_ctx)
    app.cleanup_ctx.append(_checkpoint_ctx)
    app.cleanup_ctx.append(_projection_ctx)
    app.cleanup_ctx.append(_metrics_ctx)
    app.cleanup_ctx.append(_gc_ctx)
    app.cleanup_ctx.append(_switch_interval_ctx)
    app.router.add_post("/bitrix24/events", receive_event)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.add_subapp("/api/v1/", create_api())
    app.add_subapp("/console/", create_console(settings))  # the auditor's console (HTML)
    return app
