"""Every SQL statement the service runs, and the append at the store's serialisation point.

SQL and connection handling only; what a batch becomes is decided by `ledger.planner`. An append
batch is one transaction of four round trips (each a wake-up of PostgreSQL and of this process,
which at a fixed moderate rate cost more than the work: bench/RESULTS.md, "Latency at 1000/s"):
1. BEGIN and lock the `events` stream head (`SELECT … FOR UPDATE`), sent together: appends from
   every process serialise here, so positions are gap-free and commit-ordered and the chain has
   one predecessor. While more drafts wait, this is sent for the next batch as the current one
   sends its COMMIT (`_HeadLockAhead`): off the serial path of group commit;
2. load the facts in one statement: the head itself, the trust of the batch's portals, the open
   allowances its installs could use, and the dedup keys it already holds. It must be a statement
   of its own, *after* the lock: under READ COMMITTED a statement's snapshot is taken when it
   starts, so facts read by the statement that waited for the lock could predate the commit of
   the append it waited for (a duplicate let through, a stale head);
3. plan (`ledger.planner.plan`, pure): judge, de-duplicate, number and chain, in memory;
   write the events and move the head in one statement (data-modifying CTEs), redeliveries and
   rejections with a statement each when there are any (a drained batch's rejections one more:
   which of their arrivals are logged already, migration 0016) — the trust tables follow from
   the trust events by a trigger the service role cannot bypass;
4. COMMIT (synchronous_commit = on). Only then do callers hear back.

A batch of ordinary deliveries for portals whose trust this process knows takes one round trip
instead (`EventStore._append_fast`): planned on that trust (`_KnownTrust`: what the facts of earlier
appends said, and the position they were true at), it is sent to `ledger.append_events`
(migrations 0012, 0013) outside a transaction block; the function takes the lock, checks that the
event at that position still has the hash this process saw there (the same history: not a
replica that lost commits, nor a restored backup), that none of the batch's portals changed trust
since and none of its dedup keys is stored, chains the events after the head it finds and
commits. When a check fails it writes nothing, and the batch goes
the long way above — so every verdict is still the one PostgreSQL's trust gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import orjson

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from ledger.envelope import INSTALL, UNINSTALL
from ledger.errors import AppendFailed, DatabaseUnavailable
from ledger.hashing import chain_hash, rejection_arrival, rejection_entry, sha256
from ledger.models import (
    ORIGIN_BITRIX24,
    Draft,
    EventDraft,
    FoundStored,
    Outcome,
    PortalRow,
    Refusal,
    RejectionDraft,
    RejectionLogged,
    Stored,
    Transaction,
)
from ledger.planner import Committed, Facts, Head, Plan, PlannedEffect, entry_of, plan
from ledger.settings import TrustPolicy
from ledger.trust import (
    Allowance,
    PortalTrust,
    TrustFacts,
    TrustState,
    effect_of,
    normalise_domain,
    token_accepted_under,
    token_matches,
)

log = logging.getLogger(__name__)

# the driver's own "invalid query input" (an InterfaceError; asyncpg.DataError is the server's)
_ClientDataError = asyncpg.exceptions._base.DataError
Pool = asyncpg.Pool  # asyncpg's pool type, named once for the layers that pass it around
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
Pooled: TypeAlias = "PoolConnectionProxy[Any]"  # a connection acquired from the pool

_LOCK_HEAD = "SELECT position, hash FROM ledger.stream_heads WHERE stream = $1 FOR UPDATE"
# BEGIN and the events head's row lock in one round trip: the simple query protocol takes
# several statements when there are no parameters.
_BEGIN_LOCKED = """
    BEGIN ISOLATION LEVEL READ COMMITTED;
    SELECT 1 FROM ledger.stream_heads WHERE stream = 'events' FOR UPDATE
"""
_HEAD = "SELECT position, hash FROM ledger.stream_heads WHERE stream = $1"
_EVENT_HASH = "SELECT hash FROM ledger.events WHERE position = $1"
# Moving the head also wakes projectors everywhere (delivered at COMMIT; a hint, not delivery).
_MOVE_HEAD = """
    WITH moved AS (
        UPDATE ledger.stream_heads SET position = $2, hash = $3 WHERE stream = $1
        RETURNING stream, position
    )
    SELECT pg_notify('ledger_' || stream, position::text) FROM moved
"""
# Everything a batch is planned on, in one statement run after the head is locked (see the
# module docstring): 'h' the head, 't' trust of the batch's portals, 'a' open allowances its
# installs could use (none asked for: no rows), 's' dedup keys already stored.
_FACTS = """
    SELECT 'h' AS kind, NULL::text AS member_id, NULL::text AS domain, NULL::text AS state,
        hash AS digest, position
    FROM ledger.stream_heads WHERE stream = 'events'
    UNION ALL
    SELECT 't', member_id, domain, state, token_sha256, NULL
    FROM ledger.portal_trust WHERE member_id = ANY($1::text[])
    UNION ALL
    SELECT 'a', member_id, domain, NULL, NULL, position FROM ledger.portal_allowances
    WHERE consumed_position IS NULL AND (member_id = ANY($4::text[]) OR domain = ANY($5::text[]))
    UNION ALL
    SELECT 's', e.member_id, NULL, NULL, e.dedup_key, e.position
    FROM unnest($2::text[], $3::bytea[]) AS k(member_id, dedup_key)
    JOIN ledger.events e USING (member_id, dedup_key)
"""
# The trust event a stored event was accepted under: the portal's last one before it that set
# its token or ended it, or, for an install, the establishment it caused (the follow-up right
# after it). An operator's allowance naming the portal changes neither its state nor its token,
# so it is passed over (the planner's `Plan.committed` reads the same from the portal's state).
# Trust events are few (partial index events_trust_changes); asked only for redeliveries
# today's trust refuses.
_ACCEPTED_UNDER = """
    SELECT k.position, t.payload
    FROM unnest($1::text[], $2::bigint[]) AS k(member_id, position)
    CROSS JOIN LATERAL (
        SELECT t.payload FROM ledger.events t
        WHERE t.event_type = 'LEDGER.TRUST_CHANGED' AND t.origin <> 'bitrix24'
          AND t.member_id = k.member_id AND t.payload->>'change' <> 'allowed'
          AND (t.position < k.position
               OR (t.position = k.position + 1
                   AND t.payload->>'change' = 'established'
                   AND t.payload->>'cause_position' = k.position::text))
        ORDER BY t.position DESC LIMIT 1
    ) t
"""
# The events and the head they move to, in one statement (the CTE runs to completion whether
# or not it is read); moving the head also wakes projectors everywhere when $18 says so (NOTIFY,
# delivered at COMMIT; a hint, not delivery — see `Announcer`).
_INSERT_EVENTS_MOVE_HEAD = """
    WITH inserted AS (
        INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids,
            occurred_at, received_at, dedup_key, body_sha256, payload, payload_sha256, metadata,
            prev_hash, hash, fold_record)
        SELECT p, m, t, o, b::bigint[], oa, ra, dk, bs, pl::json, ps, md::json, ph, h, fr::json
        FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                    $6::timestamptz[], $7::timestamptz[], $8::bytea[], $9::bytea[], $10::text[],
                    $11::bytea[], $12::text[], $13::bytea[], $14::bytea[], $15::text[])
            AS r(p, m, t, o, b, oa, ra, dk, bs, pl, ps, md, ph, h, fr)
        ORDER BY p
    ), moved AS (
        UPDATE ledger.stream_heads SET position = $16, hash = $17 WHERE stream = 'events'
        RETURNING stream, position
    )
    SELECT pg_notify('ledger_' || stream, position::text) FROM moved WHERE $18::bool
"""
# The one-round-trip append (module docstring; migrations 0012, 0013): no row when a check
# failed.
_APPEND_EVENTS = """
    SELECT start_position, start_hash, end_hash FROM ledger.append_events(
        $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
"""
_ANNOUNCE = """
    SELECT pg_notify('ledger_events', position::text) FROM ledger.stream_heads
    WHERE stream = 'events'
"""
# A drained draft that is "a duplicate" of the event it itself became (an append that timed out
# but committed, then drained from the spool) is no redelivery: the same arrival is not recorded
# twice. A real redelivery arrives at another time.
_INSERT_REDELIVERIES = """
    INSERT INTO ledger.redeliveries (position, received_at, body_sha256, peer)
    SELECT r.* FROM unnest($1::bigint[], $2::timestamptz[], $3::bytea[], $4::text[])
        AS r(position, received_at, body_sha256, peer)
    WHERE NOT EXISTS (
        SELECT 1 FROM ledger.events e
        WHERE e.position = r.position AND e.received_at = r.received_at
            AND e.body_sha256 IS NOT DISTINCT FROM r.body_sha256
    )
"""
_INSERT_REJECTIONS = """
    INSERT INTO ledger.rejections (position, received_at, status, reason, detail, member_id,
        event_type, peer, content_type, body_size, body_sha256, excerpt, prev_hash, hash,
        arrival_sha256)
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::smallint[], $4::text[],
        $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[],
        $11::bytea[], $12::text[], $13::bytea[], $14::bytea[], $15::bytea[])
"""
# A drained batch's rejections already in the log (a drain run again after a crash between its
# COMMIT and the spool's drained marker, or an online append given up on that committed after
# all): sent after the rejections head is locked, as its own statement, so its snapshot holds
# every rejection committed before the lock was granted (each writer holds it until COMMIT)
_REJECTIONS_LOGGED = """
    SELECT arrival_sha256, min(position) AS position FROM ledger.rejections
    WHERE arrival_sha256 = ANY($1::bytea[]) GROUP BY arrival_sha256
"""
_TRUST_ROWS = """
    SELECT member_id, domain, state, token_sha256, changed_at, changed_position
    FROM ledger.portal_trust ORDER BY changed_position
"""
_ALLOWANCE_ROWS = """
    SELECT member_id, domain, allowed_at, position FROM ledger.portal_allowances
    WHERE consumed_position IS NULL ORDER BY position
"""
_ALL_TRUST = "SELECT member_id, domain, state, token_sha256 FROM ledger.portal_trust"
_TRUST_HEAD = """
    SELECT coalesce(max(position), 0) FROM ledger.events
    WHERE event_type = 'LEDGER.TRUST_CHANGED'
"""
# The transaction an append of lifecycle deliveries runs in (`Transaction`): read under the head
# lock, where the transaction has its id already (the lock is a row lock: it assigns one), so
# asking for it assigns nothing new; one round trip, for lifecycle batches only.
_TRANSACTION_OF = """
    SELECT pg_current_xact_id()::text AS xid, pg_backend_pid() AS pid,
        (SELECT backend_start::text FROM pg_stat_get_activity(pg_backend_pid())) AS started
"""
# Whether a transaction is over. `pg_xact_status` answers for this server's history; the
# backend (pid and start) says whether it can still be running it at all: on a promoted replica
# or a restored cluster the same id may be another transaction's, or not yet exist. A backend
# at that pid whose start this role may not see (another role's: NULL) may be it: not known
# gone (taken for gone, a transaction in progress was decided "did not commit").
_TRANSACTION_STATUS = """
    SELECT pg_xact_status($1::text::xid8) AS status,
        EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $2
                AND (backend_start = $3::text::timestamptz OR backend_start IS NULL)) AS alive
"""
_BACKEND_ALIVE = """
    SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1
                   AND (backend_start = $2::text::timestamptz OR backend_start IS NULL))
"""
# Ends the backend only while it still runs that very transaction (same role: no superuser
# needed); waits up to $4 ms for it to be gone.
_END_TRANSACTION = """
    SELECT pg_terminate_backend(pid, $4) FROM pg_stat_activity
    WHERE pid = $1 AND backend_start = $2::text::timestamptz AND backend_xid::text = $3
"""
# Deliveries in doubt found stored, each with the trust event it caused (the follow-up right
# after it: `ledger.drafts.follow_up`).
_FOUND_STORED = """
    SELECT e.member_id, e.dedup_key, e.position, t.position AS trust_position,
        t.payload AS trust_payload
    FROM unnest($1::text[], $2::bytea[]) AS k(member_id, dedup_key)
    JOIN ledger.events e USING (member_id, dedup_key)
    LEFT JOIN ledger.events t ON t.position = e.position + 1
        AND t.event_type = 'LEDGER.TRUST_CHANGED' AND t.origin <> 'bitrix24'
        AND t.payload->>'cause_position' = e.position::text
    ORDER BY e.position
"""
_TRUST_EVENTS_SINCE = """
    SELECT position, payload FROM ledger.events
    WHERE event_type = 'LEDGER.TRUST_CHANGED' AND origin <> 'bitrix24' AND position > $1
    ORDER BY position
"""


async def _init_connection(connection: Connection) -> None:
    # jsonb read back as Python values (views); `json` columns stay text on purpose: the chain
    # hashes their exact bytes.
    await connection.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
        schema="pg_catalog",
    )


async def _keep_session(connection: Connection) -> None:
    """A connection's release: asyncpg itself rolls back an open transaction and drops listener
    callbacks first; nothing more is needed. Its default reset would add a round trip to every
    release (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL) for session state this code never
    leaves behind — settings only by SET LOCAL, no advisory locks, no LISTEN on a pooled
    connection (`ledger.storage.notifications` opens its own), cursors only in transactions. A
    session-level SET on a pooled connection would outlive its user: don't."""


def on_this_machine(dsn: str) -> bool:
    """Whether `dsn` names a Unix socket: the backend is then a process of this machine."""
    parts = urlsplit(dsn)
    host = parse_qs(parts.query).get("host", [unquote(parts.netloc.rpartition("@")[2])])[0]
    return host.startswith("/")


def backend_here(pid: int, user: str, database: str) -> bool:
    """Whether process `pid` of *this* machine's PID namespace is the backend serving `user` on
    `database`: a server behind a shared Unix socket may run in another PID namespace (a
    container), where its backend's pid names some other process here. A backend's title is
    "postgres: <user> <database> …" (also with update_process_title off)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.startswith(f"postgres: {user} {database} ".encode())


async def _renice_backend(connection: Connection, nice: int) -> None:
    """Lower the CPU priority of the connection's backend process to `nice`, and schedule it
    as batch work (no wake-up preemption), when it runs here and may be: a background
    reader's backend (the projector's) then yields the cores to the intake's as its own client
    process does. Anything else — another user's server, one in another PID namespace, not
    Linux — is left as it is."""
    pid = connection.get_server_pid()
    who = await connection.fetchrow("SELECT session_user, current_database()")
    assert who is not None  # one row, always
    if not backend_here(pid, who[0], who[1]):
        log.debug("backend %d is not a process of this machine we can see; not reniced", pid)
        return
    try:
        if os.getpriority(os.PRIO_PROCESS, pid) < nice:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        # no wake-up preemption either: each statement wakes the backend beside the intake's
        # (SCHED_BATCH: Linux; elsewhere nothing)
        if nice and os.sched_getscheduler(pid) == os.SCHED_OTHER:
            os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError) as exc:  # another user's server, not Linux: as it is
        log.debug("backend %d keeps its priority: %s", pid, exc)


async def create_pool(
    dsn: str, *, size: int, connect: bool = True, connect_timeout: float = 5.0,
    backend_nice: int = 0,
) -> Pool:
    """A pool whose every connection commits durably, whatever the server's default is.

    `connect=False` opens no connection now (PostgreSQL may be down); the first use does.
    `backend_nice`: for a background process's pool — each connection's backend, when it is a
    process of this machine (a Unix socket) we may renice, runs at that niceness.
    """
    init = _init_connection
    if backend_nice > 0 and on_this_machine(dsn):
        async def init(connection: Connection) -> None:
            await _init_connection(connection)
            await _renice_backend(connection, backend_nice)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1 if connect else 0,
            max_size=size,
            timeout=connect_timeout,  # an unreachable host must not hold a request for a minute
            command_timeout=60,  # bounds a statement stuck on a stalled server (or shutdown)
            init=init,
            reset=_keep_session,
            server_settings={"synchronous_commit": "on", "application_name": "ledger"},
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    assert pool is not None
    return pool


async def close_pool(pool: Pool, *, seconds: float = 5.0) -> None:
    """Close gracefully, but within `seconds`: asyncpg's `close` waits for every connection to
    be released, and one held by a task that did not stop would hold the shutdown for ever;
    past the deadline the remaining connections are terminated."""
    try:
        async with asyncio.timeout(seconds):
            await pool.close()
    except TimeoutError:
        log.error("connections still in use %gs into closing the pool; terminating them",
                  seconds)
        pool.terminate()


def _unavailable(exc: BaseException) -> bool:
    return isinstance(
        exc,
        OSError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | TimeoutError,
    )


class OutageLogLine(logging.Filter):
    """For the `asyncpg.pool` logger. The pool logs every failed attempt to restore its
    connection floor with a traceback: during an outage that is a screenful every second or
    two per pool, which reads like a crash. A failure because PostgreSQL is unavailable becomes
    one line that says so; any other failure keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _unavailable(exc):
            record.msg = (f"{record.getMessage()} (PostgreSQL unavailable: "
                          f"{type(exc).__name__}: {exc})")
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _cancelled_meanwhile(exc: BaseException) -> None:
    """A driver error raised while the task was being cancelled (a rollback on a connection
    whose query the cancellation interrupted) stays a cancellation: translated, it would be an
    error a background loop retries, and the task would never stop (shutdown would hang)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


@asynccontextmanager
async def translated_errors(action: str) -> AsyncIterator[None]:
    """Driver errors become ledger errors exactly once, here."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        _cancelled_meanwhile(exc)
        if _unavailable(exc):
            raise DatabaseUnavailable(f"{action}: PostgreSQL is unavailable ({exc})") from exc
        raise AppendFailed(f"{action}: {exc.__class__.__name__}: {exc}") from exc
    except _ClientDataError as exc:  # a value the driver cannot encode: the data, not the server
        raise AppendFailed(f"{action}: {exc.__class__.__name__}: {exc}") from exc
    except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError) as exc:
        # InternalClientError: the protocol state of a connection that broke mid-operation
        _cancelled_meanwhile(exc)
        raise DatabaseUnavailable(f"{action}: PostgreSQL is unavailable ({exc})") from exc


@asynccontextmanager
async def _transaction(
    connection: Connection, begin: str | None, before_commit: Callable[[], None] | None = None,
) -> AsyncIterator[None]:
    """A transaction opened by `begin` (BEGIN, perhaps with a lock in the same round trip):
    COMMIT when the block ends, ROLLBACK when it raises. asyncpg's own transaction sends BEGIN
    alone; should the ROLLBACK itself be cut short (a cancellation, a broken connection), the
    pool rolls back when the connection is released.

    The BEGIN is inside the `try`: a cancellation while it waits for the lock (shutdown, the
    append timeout) leaves the backend in a transaction that this ROLLBACK ends — and the
    driver may not know that yet (its cancel is still in flight), so the ROLLBACK is sent
    whatever `is_in_transaction` says; released in one, the pool would roll it back itself
    and report a leaked transaction to the loop's exception handler (an ERROR each time).
    `begin` None: the transaction is open already (a `_HeadLockAhead`'s). `before_commit` is
    called just before COMMIT is sent; what it raises rolls the transaction back."""
    try:
        if begin is not None:
            await connection.execute(begin)
        yield
        if before_commit is not None:
            before_commit()
    except BaseException as exc:
        await _rollback(connection)
        # the connection broke (a terminated backend, a restart, a protocol state the driver
        # cannot go on from): whatever ran on it, no COMMIT was sent — nothing was committed
        if (isinstance(exc, asyncpg.InternalClientError)
                or (_unavailable(exc) and not isinstance(exc, TimeoutError))):
            raise _LostBeforeCommit from exc
        raise
    await connection.execute("COMMIT")


def _then(first: Callable[[], None], second: Callable[[], None] | None) -> Callable[[], None]:
    def both() -> None:
        first()
        if second is not None:
            second()
    return both


def _changing(drafts: Sequence[Draft],
              effects: Sequence[PlannedEffect]) -> frozenset[tuple[str, bytes]]:
    """The deliveries (member_id, dedup key) whose trust changes a plan makes."""
    causes = [drafts[e.cause] for e in effects]
    return frozenset((d.member_id, d.dedup_key) for d in causes if isinstance(d, EventDraft))


class _LostBeforeCommit(Exception):
    """The transaction's connection died before its COMMIT was sent: nothing of it was
    committed, so the batch may be appended again, once, on another connection."""


def _alive(connection: Connection) -> bool:
    """Whether the connection is still open. A pooled one whose backend went away (terminated,
    a restart) is detached from its proxy by asyncpg and its slot handed back to the pool: the
    proxy then raises InterfaceError on every call, `is_closed` included."""
    try:
        return not connection.is_closed()
    except asyncpg.InterfaceError:
        return False


async def _rollback(connection: Connection) -> None:
    if _alive(connection):
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await connection.execute("ROLLBACK")


class _HeadLockAhead:
    """The events head locked for the *next* batch while this one commits.

    Sent as the current batch's COMMIT is, the BEGIN and the lock wait inside PostgreSQL and
    are granted the moment that COMMIT ends: the next batch starts with the lock held, one
    round trip (a wake-up of this process and of a backend) less on the serial path of group
    commit. Only the lock is taken early — the batch is still whatever waits once it is
    granted, and the facts are read after it, as always (module docstring). A lock nobody
    claims within `hold_seconds` of being granted is let go (ROLLBACK), so a committer that
    turned to its spool, or stopped, never keeps other workers from the head."""

    def __init__(self, pool: Pool, hold_seconds: float, keep: set[asyncio.Task[None]]) -> None:
        """`keep` holds the tasks that let go of a lock abandoned by a cancelled claimant."""
        self._pool, self._hold, self._keep = pool, hold_seconds, keep
        self._claimed = False
        self._connection: Pooled | None = None
        self._expired: asyncio.Future[None] | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name="head-lock-ahead")

    async def _run(self) -> None:
        connection: Pooled = await self._pool.acquire()
        try:
            try:
                await connection.execute(_BEGIN_LOCKED)
            except BaseException:
                await _rollback(connection)
                raise
            self._connection = connection
            if self._claimed:  # claimed while it waited: the claimant takes it from here
                return
            loop = asyncio.get_running_loop()
            self._expired = expired = loop.create_future()
            handle = loop.call_later(self._hold, _resolve, expired)
            try:
                await expired  # resolved by the timer, or by `claim`
            finally:
                handle.cancel()
            if self._claimed:
                return
            self._connection = None
            await _rollback(connection)
        except BaseException:
            self._connection = None
            await _rollback(connection)
            await self._pool.release(connection)
            raise
        await self._pool.release(connection)

    async def claim(self) -> Pooled | None:
        """The connection, in a transaction holding the head lock — the caller then owns
        it (COMMIT or ROLLBACK, and release to the pool); None when the lock could not be
        taken or was let go."""
        if self._claimed:
            return None
        self._claimed = True
        if self._expired is not None:
            _resolve(self._expired)
        try:
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            # the claimant is cancelled (shutdown): what the task still hands over is let go
            self.task.add_done_callback(self._abandoned)
            raise
        except Exception as exc:  # noqa: BLE001 - the ordinary path meets it again and says so
            log.debug("the head lock taken ahead failed (%s)", exc)
            return None
        connection = self._connection
        if connection is not None and not _alive(connection):
            # its backend went away while it held the lock (terminated, a restart): the
            # transaction died with it; the ordinary path takes a live connection instead
            self._connection = None
            await self._pool.release(connection)
            return None
        return connection

    def _abandoned(self, task: asyncio.Task[None]) -> None:
        """The claimant was cancelled: a failure of the task is nobody's to report (retrieved
        here, not logged as "never retrieved"), a lock it got is let go."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("the head lock taken ahead for a cancelled append failed (%s)", exc)
        self._let_go()

    async def abandon(self) -> None:
        """Nobody will append with it (shutdown): let the lock and the connection go."""
        if not self._claimed:
            connection = await self.claim()
            if connection is not None:
                await _rollback(connection)
                await self._pool.release(connection)
        elif not self.task.done():
            self.task.cancel()

    def _let_go(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not self.task.cancelled():
            async def let_go(connection: Pooled = connection) -> None:
                await _rollback(connection)
                await self._pool.release(connection)

            self._keep.add(task := asyncio.get_running_loop().create_task(let_go()))
            task.add_done_callback(self._keep.discard)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# How long a head lock taken ahead (`_HeadLockAhead`) waits, once granted, for the append it
# was taken for — normally the next turn or two of the event loop — before it is let go.
LOCK_AHEAD_HOLD_SECONDS = 0.1


class Announcer:
    """NOTIFY `ledger_events` at most once per `every` seconds, the last commit always included.

    Every listener (the projector, the Merkle tree follower) takes NOTIFY as a wake-up hint and
    then gathers for a while (1 s, 0.25 s); a notification per commit — hundreds a second at a
    moderate rate — woke each listening backend and its client for nothing (bench/RESULTS.md,
    "Latency at 1000/s"). So a commit within `every` of the last notification sends none, and
    one notification follows at the end of that slice, announcing the head then. `every` 0:
    every commit notifies (tools and tests, which wait on it).

    That notification is a statement and a transaction of its own (a WAL flush, a wake-up of
    a backend and of this loop, and PostgreSQL's notify lock against the appends' COMMITs) —
    so while `busy()` says another commit is on its way (an append in flight, drafts waiting),
    the slice's end leaves it to that commit, which carries it as any due commit does; only
    if none has carried it `every` later is it sent alone (`alone` counts those)."""

    def __init__(self, pool: Pool, every: float, busy: Callable[[], bool] | None = None) -> None:
        self._pool, self._every, self._busy = pool, every, busy
        self._last = -float("inf")
        self._owed = False
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.alone = 0  # notifications sent by a statement of their own

    def due(self) -> bool:
        """Whether the commit about to be made should carry the notification itself."""
        return self._every <= 0 or asyncio.get_running_loop().time() >= self._last + self._every

    def committed(self, notified: bool) -> None:
        """A commit that moved the events head: it notified, or one is owed at the slice end."""
        loop = asyncio.get_running_loop()
        if notified:
            self._last, self._owed = loop.time(), False
            if self._timer is not None:  # nothing is owed until a later commit owes it
                self._timer.cancel()
                self._timer = None
            return
        self._owed = True
        if self._timer is None:
            self._timer = loop.call_at(self._last + self._every, self._slice_end)

    async def flush(self) -> None:
        """Send what is owed now, and wait for it (before the pool closes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._send()
        if self._sending:
            await asyncio.gather(*self._sending)

    def _slice_end(self) -> None:
        """The slice is over: a commit on its way carries what is owed, else it is sent."""
        if self._owed and self._busy is not None and self._busy():
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + self._every, self._send)
            return
        self._send()

    def _send(self) -> None:
        self._timer = None
        if not self._owed:
            return
        self._owed = False
        self.alone += 1
        self._last = asyncio.get_running_loop().time()
        task = asyncio.get_running_loop().create_task(self._announce(), name="announce")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _announce(self) -> None:
        try:
            async with translated_errors("notify"), self._pool.acquire() as connection:
                await connection.execute(_ANNOUNCE)
        except Exception as exc:  # noqa: BLE001 - a hint: listeners poll as well
            log.debug("NOTIFY after a commit failed (%s); listeners poll", exc)


class _AppendConnection:
    """The appends' connection, kept from one append to the next (either way).

    At a fixed moderate rate (1,000 deliveries/s) nearly every delivery is a commit of its own,
    and asyncpg's pool charges each one an acquire and a release — a proxy, a future, a
    release task behind `asyncio.shield`, an inactivity timer armed and cancelled: ~50 µs of
    the intake's CPU per commit, twice a `SELECT 1` round trip (bench/RESULTS.md, "Latency at
    1000/s, fifth session"). Each append is a transaction that ends before the append returns,
    so between appends the connection holds no transaction, lock or session state: keeping it
    is keeping an idle pooled connection. One that failed or was cut short under a statement,
    or whose backend went away meanwhile, goes back to the pool, which replaces it; two
    appends at once (the committer's and a tool's) take a second one, and only one is kept.
    `keep` False: every append acquires and releases (tools and tests, which close their
    pools without `release`)."""

    def __init__(self, pool: Pool, *, keep: bool) -> None:
        self._pool = pool
        self._connection: Pooled | None = None
        self._keep = keep

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Pooled]:
        connection, self._connection = self._connection, None
        if connection is not None and not _alive(connection):
            await self._pool.release(connection)
            connection = None
        if connection is None:
            connection = await self._pool.acquire()
        try:
            yield connection
        except BaseException:
            await self._pool.release(connection)
            raise
        if self._connection is None and self._keep:
            self._connection = connection
        else:
            await self._pool.release(connection)

    async def release(self) -> None:
        """Stop keeping the connection (before the pool closes)."""
        self._keep = False
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._pool.release(connection)


_LIFECYCLE = frozenset({INSTALL, UNINSTALL})  # deliveries that may change a portal's trust
KNOWN_PORTALS = 10_000  # portals whose trust an intake keeps for the one-round-trip append


class _KnownTrust:
    """Portals' trust as this process last read it under the head lock (or moved it by its own
    commits), each with the events head it was true at (position and hash: trust is a fold of
    *that* chain); and the head it last saw. Only what the long way's facts said is kept — never
    a judgement of its own — and `ledger.append_events` checks it again under the lock, so a
    stale entry costs a round trip, never a wrong verdict. Bounded: the oldest portals are
    forgotten first (a sender cannot add portals: only trust events can, and those go the long
    way)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.portals: dict[str, tuple[PortalTrust, Head]] = {}
        self.head: Head | None = None

    def learn(self, portals: dict[str, PortalTrust], at: Head) -> None:
        known = self.portals
        for member_id, trust in portals.items():
            known.pop(member_id, None)
            known[member_id] = (trust, at)
        while len(known) > self.limit:
            del known[next(iter(known))]

    def forget(self, members: Sequence[str]) -> None:
        for member_id in members:
            self.portals.pop(member_id, None)

    def vouches(self, member_id: str, presented_sha256: bytes | None) -> bool:
        """Whether the portal's trust as last read here accepts this token (no I/O)."""
        entry = self.portals.get(member_id)
        return presented_sha256 is not None and entry is not None and token_matches(
            presented_sha256, entry[0])

    def facts(self, members: Sequence[str]) -> tuple[TrustFacts, Head] | None:
        """Trust of a batch's portals and the head it is all true at (the oldest), or None when
        one of them is not known."""
        trust = TrustFacts()
        at: Head | None = None
        for member_id in members:
            entry = self.portals.get(member_id)
            if entry is None:
                return None
            trust.portals[member_id] = entry[0]
            if at is None or entry[1].position < at.position:
                at = entry[1]
        return (trust, at) if at is not None else None


class EventStore:
    """Appends and reads of the ledger; the pool is owned by whoever created it.

    `notify_every`: see `Announcer` (0, the default: every commit notifies)."""

    def __init__(self, pool: Pool, *, policy: TrustPolicy, notify_every: float = 0.0,
                 one_round_trip: bool = True, keep_connection: bool = False) -> None:
        """`keep_connection`: appends keep their pooled connection from one to the next
        (`_AppendConnection`); whoever passes it calls `release_kept` before the pool closes
        (asyncpg's `close` waits for every connection)."""
        self._pool = pool
        self._appending_on = _AppendConnection(pool, keep=keep_connection)
        self._policy = policy
        self._known = _KnownTrust(KNOWN_PORTALS if one_round_trip else 0)
        self._counted: Callable[[str], None] = lambda way: None
        self.announcer = Announcer(pool, notify_every, busy=self._busy)
        self._appending = 0  # appends in flight
        self._waiting: Callable[[], bool] | None = None
        self._ahead: _HeadLockAhead | None = None
        self._letting_go: set[asyncio.Task[None]] = set()


    def vouches(self, member_id: str, presented_sha256: bytes | None) -> bool:
        """Whether this process's last reading of the portal's trust accepts the token: a hint
        read without I/O (the append judges again under the lock). Gateway mode seals a
        delivery into the outbox ahead of its commit only when it does — a delivery sealed
        before it is judged must not be a sender's forgery (see `IntakeService`)."""
        return self._known.vouches(member_id, presented_sha256)
    def lock_ahead_when(self, waiting: Callable[[], bool]) -> None:
        """From now on, as a batch commits while `waiting()` (more drafts wait for the next
        one: the group committer's queue), the events head is locked for the next batch at
        once (`_HeadLockAhead`); the next `append` starts with it."""
        self._waiting = waiting

    async def let_go_ahead(self) -> None:
        """Release a head lock taken ahead that no append will use now: before the pool
        closes, or before this worker waits on another (whose drain needs the head)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            await ahead.abandon()
        if self._letting_go:
            await asyncio.gather(*self._letting_go)

    async def release_kept(self) -> None:
        """Hand the connection the appends keep back to the pool (before it closes); from
        then on each append takes one from the pool and gives it back."""
        await self._appending_on.release()

    def count_ways(self, counted: Callable[[str], None]) -> None:
        """Call `counted` with the way each committed batch took: "one_statement" (the fast
        path), "retried" (it was tried, a check failed, then the long way), "long"."""
        self._counted = counted

    def _busy(self) -> bool:
        """Whether another commit is on its way: an append in flight, or drafts waiting."""
        return self._appending > 0 or (self._waiting is not None and self._waiting())

    def _lock_next(self) -> None:
        if self._ahead is None and self._waiting is not None and self._waiting():
            self._ahead = _HeadLockAhead(self._pool, LOCK_AHEAD_HOLD_SECONDS, self._letting_go)

    @property
    def pool(self) -> Pool:
        return self._pool

    async def append(self, drafts: Sequence[Draft], *, draining: bool = False) -> list[Outcome]:
        """Append a batch in one durable transaction; one outcome per draft, in order."""
        outcomes, _, _ = await self.append_planned(drafts, draining=draining)
        return outcomes

    async def append_planned(
        self, drafts: Sequence[Draft], *, draining: bool = False,
        held: frozenset[int] = frozenset(),
        under_lock: Callable[[Transaction], Awaitable[None]] | None = None,
        committing: Callable[[frozenset[tuple[str, bytes]]], None] | None = None,
        planned: Callable[[frozenset[tuple[str, bytes]]], Awaitable[None]] | None = None,
    ) -> tuple[list[Outcome], list[PlannedEffect], list[Committed]]:
        """`append`, also answering the trust changes and the Bitrix24 deliveries it committed
        (for the offline state: `Plan.committed`); `held`: see `ledger.planner.plan`.
        `under_lock`: awaited once the events head is locked, before the batch is judged
        (again if the batch is appended again on another connection), with the transaction's
        identity (`Transaction`: one round trip more); what it raises rolls the transaction
        back and propagates. `committing`: called just before COMMIT is sent, with the
        deliveries (member_id, dedup key) whose trust changes it commits (what it raises rolls
        back too) — from then on a lost connection leaves it unknown whether the batch
        committed. `planned`: awaited once the batch is judged and written, before COMMIT, with
        those same deliveries — only when there are any (what it raises rolls back too). Only
        a batch that goes the long way with events
        locks the head: the caller passes these for batches that never go the one-statement
        way (`ledger.offline.Appender`: lifecycle deliveries take their turn in the journal)."""
        # what does not need the serialisation point is done before taking it
        prepared = {id(d): entry_of(d) for d in drafts if isinstance(d, EventDraft)}
        event_drafts = [d for d in drafts if isinstance(d, EventDraft)]
        begin = _BEGIN_LOCKED if event_drafts else "BEGIN"
        notify = self.announcer.due()
        self._appending += 1
        try:
            ahead, self._ahead = self._ahead, None
            way = "long"
            # ordinary deliveries go the one-statement way; the head is locked ahead only for
            # a batch like those that never do (the next batch is most likely like this one)
            ordinary = (self._known.limit > 0 and not draining and not held
                        and 0 < len(event_drafts) == len(drafts)
                        and all(d.origin == ORIGIN_BITRIX24 and d.event_type not in _LIFECYCLE
                                for d in event_drafts))
            lock_next = None if ordinary else self._lock_next
            if ordinary and ahead is None:
                fast, tried = await self._append_fast(event_drafts, prepared, notify)
                if fast is not None:
                    self._counted("one_statement")
                    return fast
                way = "retried" if tried else way
            locked = await ahead.claim() if ahead is not None else None
            try:
                if locked is None:
                    async with translated_errors("append"), self._appending_on.use() as connection:
                        done = await self._append_in(
                            connection, begin, drafts, event_drafts, prepared, draining, notify,
                            held, lock_next, under_lock, committing, planned)
                else:
                    try:  # the head was locked ahead for this batch: the transaction is open
                        async with translated_errors("append"):
                            done = await self._append_in(
                                locked, None, drafts, event_drafts, prepared, draining,
                                notify, held, lock_next, under_lock, committing, planned)
                    finally:
                        await self._pool.release(locked)
            except _LostBeforeCommit as lost:
                # a connection the pool or a lock ahead handed over dead (a backend terminated
                # or restarted before the driver noticed): the batch goes again on a fresh one;
                # a second loss is PostgreSQL being away (the committer spools)
                log.info("an append's connection was lost before its COMMIT (%s); appending "
                         "the batch again on another", lost.__cause__)
                try:
                    async with translated_errors("append"), self._appending_on.use() as connection:
                        done = await self._append_in(
                            connection, begin, drafts, event_drafts, prepared, draining, notify,
                            held, lock_next, under_lock, committing, planned)
                except _LostBeforeCommit as again:
                    raise DatabaseUnavailable(
                        f"append: PostgreSQL is unavailable ({again.__cause__})") from again
            self._counted(way)
            return done
        finally:
            self._appending -= 1

    async def _append_in(
        self,
        connection: Connection,
        begin: str | None,
        drafts: Sequence[Draft],
        event_drafts: list[EventDraft],
        prepared: dict[int, tuple[bytes, bytes]],
        draining: bool,
        notify: bool,
        held: frozenset[int],
        lock_next: Callable[[], None] | None,
        under_lock: Callable[[Transaction], Awaitable[None]] | None = None,
        committing: Callable[[frozenset[tuple[str, bytes]]], None] | None = None,
        planned: Callable[[frozenset[tuple[str, bytes]]], Awaitable[None]] | None = None,
    ) -> tuple[list[Outcome], list[PlannedEffect], list[Committed]]:
        changes: list[PlannedEffect] = []  # the plan's trust changes, for `committing`
        if committing is not None:
            lock_next = _then(lambda: committing(_changing(drafts, changes)), lock_next)
        async with _transaction(connection, begin, lock_next):
            if under_lock is not None and event_drafts:
                row = await connection.fetchrow(_TRANSACTION_OF)
                assert row is not None
                await under_lock(Transaction(int(row["xid"]), row["pid"], row["started"]))
            outcomes, effects, committed, learned = await self._append(
                connection, drafts, event_drafts, prepared, draining, notify, held)
            changes.extend(effects)
            if planned is not None and effects:
                await planned(_changing(drafts, effects))
        if learned is not None:
            self._known.learn(learned[0].trust.portals, learned[1])
            self._known.head = learned[1]
        if committed is not None:
            self.announcer.committed(notify)
        return outcomes, effects, committed or []

    async def _append_fast(
        self, drafts: list[EventDraft], prepared: dict[int, tuple[bytes, bytes]], notify: bool,
    ) -> tuple[tuple[list[Outcome], list[PlannedEffect], list[Committed]] | None, bool]:
        """The one-round-trip append (module docstring), and whether its statement was sent.
        None when the batch must go the long way: its portals' trust is not known here, it is
        anything but ordinary deliveries the known trust accepts, or `ledger.append_events`
        found a check failed (and wrote nothing)."""
        members = list({d.member_id: None for d in drafts})
        known = self._known.facts(members)
        if known is None:
            return None, False
        trust, known_at = known
        guess = self._known.head or Head(0, bytes(32))
        # `plan` moves its facts along (the keys it stores become "seen"): a fresh copy each time
        planned = plan(drafts, Facts(trust=trust.copy()), Head(guess.position, guess.hash),
                       policy=self._policy, prepared=prepared)
        if (planned.effects or planned.redeliveries or planned.rejections
                or not all(isinstance(o, Stored) for o in planned.outcomes)):
            return None, False
        rows = planned.events
        async with translated_errors("append"), self._appending_on.use() as connection:
            found = await connection.fetchrow(
                _APPEND_EVENTS, known_at.position, known_at.hash, members,
                [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                [r[4] for r in rows], [r[5] for r in rows], [r[6] for r in rows],
                [r[7] for r in rows], [r[8] for r in rows], [r[9] for r in rows],
                [r[10] for r in rows], [r[11] for r in rows],
                [prepared[id(d)][1] for d in drafts], [r[14] for r in rows], notify,
            )
        if found is None:  # another history, a portal's trust moved, or a key is stored: the
            # long way decides
            self._known.forget(members)
            return None, True
        start = Head(found["start_position"], bytes(found["start_hash"]))
        if start != guess:  # another process appended meanwhile: the chain runs from its head
            planned = plan(drafts, Facts(trust=trust.copy()), Head(start.position, start.hash),
                           policy=self._policy, prepared=prepared)
        assert planned.head is not None
        if planned.head.hash != bytes(found["end_hash"]):
            raise AppendFailed(
                f"PostgreSQL chained the events up to position {planned.head.position} to a "
                "hash this service does not compute: they are stored, but `ledger verify` will "
                "report the chain broken there; report this as a bug with both hashes")
        self._known.head = planned.head
        self.announcer.committed(notify)
        return ([o for o in planned.outcomes if o is not None], [], planned.committed), True

    async def _append(
        self,
        connection: Connection,
        drafts: Sequence[Draft],
        event_drafts: list[EventDraft],
        prepared: dict[int, tuple[bytes, bytes]],
        draining: bool,
        notify: bool,
        held: frozenset[int],
    ) -> tuple[list[Outcome], list[PlannedEffect], list[Committed] | None,
               tuple[Facts, Head] | None]:
        """Inside the transaction; the events head is locked when there are event drafts.
        Also answers the Bitrix24 deliveries stored (None: the events head did not move),
        and the trust facts the plan left with the
        head they are true at (`_KnownTrust`: once committed)."""
        if not event_drafts:  # rejections only: nothing to judge, number or chain in `events`
            planned = Plan(outcomes=[None] * len(drafts))
            planned.rejections = [
                (i, d) for i, d in enumerate(drafts) if isinstance(d, RejectionDraft)
            ]
            learned = None
        else:
            head, facts = await self._load(connection, event_drafts)
            planned = plan(drafts, facts, head, policy=self._policy, draining=draining,
                           prepared=prepared, held=held)
            learned = (facts, Head(head.position, head.hash))  # `plan` moved `head` along
        await self._write(connection, planned, notify)
        outcomes = planned.outcomes
        if planned.rejections:
            positions = await self._write_rejections(connection, planned.rejections, draining)
            for (index, _), position in zip(planned.rejections, positions, strict=True):
                current = outcomes[index]
                if isinstance(current, Refusal):
                    outcomes[index] = dataclasses.replace(current, rejection_position=position)
                else:
                    outcomes[index] = RejectionLogged(position)
        assert all(o is not None for o in outcomes)
        return ([o for o in outcomes if o is not None], planned.effects,
                planned.committed if planned.events else None, learned)

    async def _load(self, connection: Connection, drafts: list[EventDraft]) -> tuple[Head, Facts]:
        """The head and the facts a batch is planned on — its portals' trust, the open
        allowances its installs could use, and which of its dedup keys are stored already — in
        one statement, which must start after the head is locked (module docstring)."""
        facts = Facts()
        head: Head | None = None
        installs = [d for d in drafts if d.event_type == INSTALL]
        domains = list({n for d in installs if (n := normalise_domain(d.domain))})
        rows = await connection.fetch(
            _FACTS, list({d.member_id for d in drafts}),
            [d.member_id for d in drafts], [d.dedup_key for d in drafts],
            [d.member_id for d in installs], domains,
        )
        for row in rows:
            kind = row["kind"]
            if kind == "s":
                facts.seen[(row["member_id"], bytes(row["digest"]))] = row["position"]
            elif kind == "t":
                facts.trust.portals[row["member_id"]] = PortalTrust(
                    row["member_id"], row["domain"], TrustState(row["state"]),
                    bytes(row["digest"]) if row["digest"] is not None else None,
                )
            elif kind == "a":
                facts.trust.allowances[row["position"]] = _allowance_of(row)
            else:
                head = Head(row["position"], bytes(row["digest"]))
        assert head is not None
        # a redelivery today's trust would refuse may prove itself by the original's token —
        # so may one batched after a change of its portal's trust (an uninstall, an operator's
        # re-provisioning): the planner judges it by the trust that change leaves
        changing = {d.member_id for d in drafts
                    if d.origin != ORIGIN_BITRIX24 or d.event_type in (INSTALL, UNINSTALL)}
        doubtful = {
            (d.member_id, known)
            for d in drafts
            if d.origin == ORIGIN_BITRIX24
            and (known := facts.seen.get((d.member_id, d.dedup_key))) is not None
            and (d.member_id in changing
                 or not token_matches(d.presented_sha256 or b"",
                                      facts.trust.portals.get(d.member_id)))
        }
        if doubtful:
            keys = sorted(doubtful)
            rows = await connection.fetch(
                _ACCEPTED_UNDER, [m for m, _ in keys], [p for _, p in keys]
            )
            for row in rows:
                digest = token_accepted_under(effect_of(orjson.loads(row["payload"])))
                if digest is not None:
                    facts.accepted[row["position"]] = digest
        return head, facts

    async def _write(self, connection: Connection, planned: Plan, notify: bool) -> None:
        """Trust rows follow from the trust events by trigger (migration 0005), not from here."""
        if planned.events:
            assert planned.head is not None
            await connection.execute(
                _INSERT_EVENTS_MOVE_HEAD, *map(list, zip(*planned.events, strict=True)),
                planned.head.position, planned.head.hash, notify,
            )
        if planned.redeliveries:
            await connection.execute(
                _INSERT_REDELIVERIES, *map(list, zip(*planned.redeliveries, strict=True))
            )

    async def _write_rejections(
        self, connection: Connection, rejections: list[tuple[int, RejectionDraft]],
        draining: bool,
    ) -> list[int]:
        """Chain and write the rejections; their positions. A drained batch's arrivals already
        logged are not written again (migration 0016): they answer with the logged position.
        Online ones are new arrivals: written with their key, looked up in no extra round trip."""
        row = await connection.fetchrow(_LOCK_HEAD, "rejections")
        assert row is not None
        head = Head(row["position"], bytes(row["hash"]))
        arrivals = [
            rejection_arrival(
                received_at=r.received_at, member_id=r.member_id, event_type=r.event_type,
                peer=r.peer, content_type=r.content_type, body_size=r.body_size,
                body_sha256=r.body_sha256,
            )
            for _, r in rejections
        ]
        logged: dict[bytes, int] = {}
        if draining:
            logged = {bytes(found["arrival_sha256"]): found["position"]
                      for found in await connection.fetch(_REJECTIONS_LOGGED, arrivals)}
        rows: list[tuple[Any, ...]] = []
        positions: list[int] = []
        for (_, r), arrival in zip(rejections, arrivals, strict=True):
            if draining and arrival in logged:
                positions.append(logged[arrival])
                continue
            position = head.position + 1
            entry = rejection_entry(
                received_at=r.received_at, status=r.status, reason=r.reason, detail=r.detail,
                member_id=r.member_id, event_type=r.event_type, peer=r.peer,
                content_type=r.content_type, body_size=r.body_size, body_sha256=r.body_sha256,
            )
            digest = chain_hash(head.hash, position, entry, sha256(r.excerpt.encode()))
            rows.append(
                (position, r.received_at, r.status, r.reason, r.detail, r.member_id,
                 r.event_type, r.peer, r.content_type, r.body_size, r.body_sha256, r.excerpt,
                 head.hash, digest, arrival)
            )
            if draining:
                logged[arrival] = position  # the same arrival twice in one drained batch
            positions.append(position)
            head.position, head.hash = position, digest
        if rows:
            await connection.execute(_INSERT_REJECTIONS, *map(list, zip(*rows, strict=True)))
            await connection.execute(_MOVE_HEAD, "rejections", head.position, head.hash)
        return positions

    # ---- trust, whole ------------------------------------------------------------------

    async def load_trust(self) -> tuple[TrustFacts, int]:
        """Every portal's trust and every open allowance, with the last trust event's position
        (consistent: one snapshot)."""
        async with (
            translated_errors("load trust"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            position = await connection.fetchval(_TRUST_HEAD)
            portals = await connection.fetch(_ALL_TRUST)
            allowances = await connection.fetch(_ALLOWANCE_ROWS)
        facts = TrustFacts(
            {r["member_id"]: _trust_of(r) for r in portals},
            {r["position"]: _allowance_of(r) for r in allowances},
        )
        return facts, int(position)

    async def trust_events_since(self, position: int) -> list[tuple[int, dict[str, Any]]]:
        """The trust events after `position`, in order, payloads parsed (for `fold_trust`)."""
        async with translated_errors("read trust events"), self._pool.acquire() as connection:
            rows = await connection.fetch(_TRUST_EVENTS_SINCE, position)
        return [(r["position"], orjson.loads(r["payload"])) for r in rows]

    async def settle_transaction(
        self, transaction: Transaction, keys: Sequence[tuple[str, bytes]], *,
        end_wait_ms: int = 0,
    ) -> list[FoundStored] | None:
        """Whether a transaction whose outcome is in doubt (`ledger.offline`) is over, and
        then which of these deliveries are stored: the ones it (or anything else) committed.
        None while it may still commit. `end_wait_ms` > 0: a transaction still running is ended
        first (`pg_terminate_backend`, waiting up to that long for its backend to go) — a
        COMMIT stalled for good must not keep its portals in doubt.

        The keys decide what was committed, not the transaction's status: a delivery found
        stored is in PostgreSQL's trust, however it got there (a copy stored by another
        worker counts the same), and the status may be another history's (a failover)."""
        async with translated_errors("settle a transaction in doubt"), \
                self._pool.acquire() as connection:
            if not await self._transaction_over(connection, transaction):
                if end_wait_ms <= 0:
                    return None
                await connection.fetchval(
                    _END_TRANSACTION, transaction.pid, transaction.backend_start,
                    str(transaction.xid & 0xFFFFFFFF), end_wait_ms)
                if not await self._transaction_over(connection, transaction):
                    return None
            rows = await connection.fetch(
                _FOUND_STORED, [m for m, _ in keys], [k for _, k in keys])
            found = [(r, orjson.loads(r["trust_payload"])
                      if r["trust_payload"] is not None else None) for r in rows]
            under: dict[int, bytes] = {}
            if found:
                accepted = await connection.fetch(
                    _ACCEPTED_UNDER, [r["member_id"] for r, _ in found],
                    [r["position"] for r, _ in found])
                for row in accepted:
                    digest = token_accepted_under(effect_of(orjson.loads(row["payload"])))
                    if digest is not None:
                        under[row["position"]] = digest
        return [FoundStored(r["member_id"], bytes(r["dedup_key"]), r["position"],
                            r["trust_position"], payload, under.get(r["position"]))
                for r, payload in found]

    @staticmethod
    async def _transaction_over(connection: Connection, transaction: Transaction) -> bool:
        """Over: committed or aborted, or its backend is gone (a backend that is not running
        cannot be running a transaction, whatever an id of another history says). A backend
        at its pid out of this role's sight is not known to be gone: while the id is in
        progress, the doubt waits for it (never ended: `_END_TRANSACTION` needs its start)."""
        try:
            row = await connection.fetchrow(
                _TRANSACTION_STATUS, str(transaction.xid), transaction.pid,
                transaction.backend_start)
        except asyncpg.PostgresError:  # an id in this server's future: another history
            return not await connection.fetchval(
                _BACKEND_ALIVE, transaction.pid, transaction.backend_start)
        assert row is not None
        return row["status"] != "in progress" or not row["alive"]

    # ---- reads -------------------------------------------------------------------------

    async def portals(self) -> list[PortalRow]:
        """Every portal the ledger trusts, trusted once, or was told to allow."""
        async with translated_errors("list portals"), self._pool.acquire() as connection:
            trusted = await connection.fetch(_TRUST_ROWS)
            allowances = await connection.fetch(_ALLOWANCE_ROWS)
        allowed_members = {a["member_id"] for a in allowances if a["member_id"]}
        allowed_domains = {a["domain"] for a in allowances if a["domain"]}
        rows = [
            PortalRow(
                member_id=r["member_id"],
                domain=r["domain"],
                state=r["state"],
                changed_at=r["changed_at"],
                changed_position=r["changed_position"],
                token_fingerprint=bytes(r["token_sha256"]).hex()[:12]
                if r["token_sha256"] is not None
                else None,
                allowed=r["member_id"] in allowed_members or r["domain"] in allowed_domains,
            )
            for r in trusted
        ]
        known_members = {r.member_id for r in rows}
        known_domains = {r.domain for r in rows if r.domain}
        rows.extend(
            PortalRow(
                member_id=a["member_id"] or "",
                domain=a["domain"],
                state="allowed",
                changed_at=a["allowed_at"],
                changed_position=a["position"],
                allowed=True,
            )
            for a in allowances
            if a["member_id"] not in known_members and a["domain"] not in known_domains
        )
        return rows

    @property
    def last_head(self) -> tuple[int, bytes] | None:
        """The events head this process last saw under the head lock (after its own commit,
        or found there): whatever it stored lies at or before it, in the chain it ends."""
        head = self._known.head
        return (head.position, head.hash) if head is not None else None

    async def holds(self, position: int, digest: bytes) -> bool:
        """Whether the event at `position` has this chain hash: the history ending there is
        still the database's (position 0: the empty chain, always)."""
        if position == 0:
            return True
        async with translated_errors("read an event's hash"), \
                self._pool.acquire() as connection:
            found = await connection.fetchval(_EVENT_HASH, position)
        return found is not None and bytes(found) == digest

    async def head(self, stream: str = "events") -> tuple[int, bytes]:
        """The stream's last position and hash (0 and the genesis hash when empty)."""
        async with translated_errors("read head"), self._pool.acquire() as connection:
            row = await connection.fetchrow(_HEAD, stream)
        assert row is not None
        return int(row["position"]), bytes(row["hash"])

    @asynccontextmanager
    async def chain_snapshot(self, stream: str) -> AsyncIterator[ChainSnapshot]:
        """A consistent, read-only view of one chain: its head and its rows in order."""
        async with (
            translated_errors(f"read {stream}"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await connection.fetchrow(_HEAD, stream)
            assert row is not None
            yield ChainSnapshot(connection, stream, int(row["position"]), bytes(row["hash"]))


def _allowance_of(row: Any) -> Allowance:
    return Allowance(row["position"], row["member_id"], row["domain"])


def _trust_of(row: Any) -> PortalTrust:
    token = row["token_sha256"]
    return PortalTrust(
        row["member_id"], row["domain"], TrustState(row["state"]),
        bytes(token) if token is not None else None,
    )


class ChainSnapshot:
    """Rows of one chain, read in position order through a server-side cursor."""

    _QUERIES: ClassVar[dict[str, str]] = {
        "events": "SELECT * FROM ledger.events ORDER BY position",
        "rejections": "SELECT * FROM ledger.rejections ORDER BY position",
    }

    def __init__(
        self, connection: Connection, stream: str, head_position: int, head_hash: bytes
    ) -> None:
        self._connection = connection
        self._stream = stream
        self.head_position = head_position
        self.head_hash = head_hash

    async def batches(self, size: int = 2000) -> AsyncIterator[list[asyncpg.Record]]:
        cursor = await self._connection.cursor(self._QUERIES[self._stream])
        while rows := await cursor.fetch(size):
            yield rows


async def schema_revision(pool: Pool) -> str | None:
    """The alembic revision the database is at, or None when it was never migrated."""
    async with translated_errors("read schema revision"), pool.acquire() as connection:
        exists = await connection.fetchval("SELECT to_regclass('public.alembic_version')")
        if exists is None:
            return None
        try:
            value = await connection.fetchval("SELECT version_num FROM public.alembic_version")
        except asyncpg.InsufficientPrivilegeError:
            return None
    return str(value) if value is not None else None


async def ping(pool: Pool) -> None:
    async with translated_errors("ping"), pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
