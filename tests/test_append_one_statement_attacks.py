"""Attacks on the one-statement append (`ledger.append_events`, `EventStore._append_fast`): what
the intake remembers of trust must never let it accept what the long way — PostgreSQL's trust,
PostgreSQL's dedup facts — would refuse, whatever happened to the database meanwhile."""

from __future__ import annotations

import asyncio
import copy
import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest

from ledger import intake, integrity, wire
from ledger.errors import DatabaseUnavailable, LedgerError
from ledger.hashing import sha256
from ledger.models import Duplicate, Refusal, Stored
from ledger.operations import change_trust
from ledger.settings import Settings, TrustPolicy
from ledger.simulation import Traffic
from ledger.storage.store import _APPEND_EVENTS, EventStore, create_pool
from ledger.trust import TRUST_EVENT, TrustChange, TrustFacts, TrustState, apply, effect_of
from tests.conftest import (
    DOMAIN,
    FORM,
    MEMBER_ID,
    TOKEN,
    Cluster,
    Database,
    _create_database,
    _drop_database,
)
from tests.gateway_helpers import eventually
from tests.test_append_one_statement import (
    _chain_verified,
    _delivery,
    _installed,
    _installed_then_copied,
    _Process,
)
from tests.test_store_interrupted import BLOCKERS, _waiting_backend, cut_short, slow_commit

Connection: TypeAlias = "asyncpg.Connection[Any]"
_ = slow_commit  # a fixture of that module, used here by name


async def test_a_database_that_went_back_in_history_is_not_trusted_from_memory(
    cluster: Cluster, database: Database, settings: Settings
) -> None:
    """A failover to a replica that had not received the last commits (or a restore from a
    backup) under a running worker: the history the worker learned trust in is not the
    database's any more. There an operator ended the portal's trust at the position the worker
    learned it at, and the head has since moved past what the worker saw. A delivery under the
    old token is refused, as the long way refuses it — not stored on the worker's memory."""
    replica = await _installed_then_copied(cluster, database, settings)
    try:
        pool = await create_pool(database.service_dsn, size=2)
        worker = _Process(pool)
        try:
            for batch in range(3):  # learned at the first (the long way), then one statement
                (stored,) = await worker.store.append(
                    [_delivery(settings, "onimbotmessageadd-1", f"before-{batch}")])
                assert isinstance(stored, Stored), stored
            assert worker.ways["one_statement"] == 2, worker.ways
            # the replica lost those three; there an operator ended the portal's trust, at the
            # position the worker learned it at, and the head moved on past what it saw
            other = _Process(replica_pool := await create_pool(
                cluster.dsn(replica, user="ledger_app"), size=2))
            try:
                await change_trust(other.store, TrustChange.ENDED, member_id=MEMBER_ID,
                                   actor="test")
                for i in range(4):
                    await change_trust(other.store, TrustChange.ALLOWED, member_id=f"m{i}",
                                       actor="test")
            finally:
                await replica_pool.close()
            # failover: the same pool's new connections reach the replica
            pool.set_connect_args(dsn=cluster.dsn(replica, user="ledger_app"))
            await pool.expire_connections()
            (late,) = await worker.store.append(
                [_delivery(settings, "onimbotmessageadd-1", "after-failover")])
            assert isinstance(late, Refusal), late
            assert (late.status, late.code) == (403, "portal_uninstalled")
            assert worker.ways["retried"] == 1, worker.ways  # sent, and refused under the lock
        finally:
            await pool.close()
    finally:
        await _drop_database(cluster, replica)



@pytest.mark.parametrize("how", ["cancel", "terminate"])
@pytest.mark.parametrize("step", list(BLOCKERS))
async def test_a_statement_cut_short_at_any_step_stores_nothing_and_drains_once(
    database: Database, admin: Connection, settings: Settings, slow_commit: None, step: str,
    how: str,
) -> None:
    """The one statement waits for the head lock, the trust check, the insert or its commit —
    and is cancelled (shutdown) or its backend terminated there. Nothing of it is stored, no
    connection is left in a transaction or holding the head, and the batch, spooled and drained,
    is stored once; the next batch goes the one-statement way again."""
    loop = asyncio.get_running_loop()
    complaints: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: complaints.append(context))
    pool = await create_pool(database.service_dsn, size=2)
    worker = _Process(pool)
    blocker = await asyncpg.connect(database.admin_dsn)
    try:
        await _installed(worker, settings)
        (warm,) = await worker.store.append([_delivery(settings, "onimbotmessageadd-1", "warm")])
        assert isinstance(warm, Stored)
        assert worker.ways["one_statement"] == 1, worker.ways
        await blocker.execute("BEGIN")
        for statement in BLOCKERS[step]:
            await blocker.execute(statement)
        cut = [_delivery(settings, "onimbotmessageadd-1", f"cut-{i}") for i in range(3)]
        task = asyncio.create_task(worker.store.append(cut))
        await cut_short(task, admin, how)
        await blocker.execute("ROLLBACK")
        await eventually(lambda: admin.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'ledger' "
            "AND state <> 'idle'"), within=10)
        head = (await worker.store.head())[0]
        assert head == warm.position  # nothing of the cut-short statement
        async with asyncio.timeout(10):
            drained = await worker.store.append(cut, draining=True)  # the spool's copy
            (after,) = await worker.store.append(
                [_delivery(settings, "onimbotmessageadd-1", "after")])
        assert [o.position for o in drained if isinstance(o, Stored)] == [
            head + 1, head + 2, head + 3]
        assert isinstance(after, Stored)
        assert after.position == head + 4
        assert worker.ways["one_statement"] == 2, worker.ways
        assert await _chain_verified(worker) == head + 4
    finally:
        await blocker.close()
        await pool.close()
        loop.set_exception_handler(previous)
    assert [c["message"] for c in complaints] == []


async def test_a_statement_that_commits_after_its_connection_is_lost_drains_as_itself(
    proxy: Any, database: Database, admin: Connection, settings: Settings,
) -> None:
    """The connection to PostgreSQL breaks while the statement waits for the head lock: the
    worker hears nothing (DatabaseUnavailable: the committer spools the batch, 202) while
    PostgreSQL, unaware, commits the statement when the lock is granted. The drain of the
    spooled copy then finds each delivery stored — as the duplicate of itself, recorded once,
    no redelivery — and acknowledged nothing twice."""
    relay, dsn = proxy
    pool = await create_pool(dsn, size=2)
    worker = _Process(pool)
    blocker = await asyncpg.connect(database.admin_dsn)
    try:
        await _installed(worker, settings)
        await worker.store.append([_delivery(settings, "onimbotmessageadd-1", "warm")])
        await blocker.execute("BEGIN")
        await blocker.execute(BLOCKERS["lock"][0])
        cut = [_delivery(settings, "onimbotmessageadd-1", f"lost-{i}") for i in range(2)]
        task = asyncio.create_task(worker.store.append(cut))
        await eventually(lambda: _waiting_backend(admin), within=10)
        await relay.cut()
        with pytest.raises(DatabaseUnavailable):
            await task
        await blocker.execute("COMMIT")  # the statement goes on, and commits
        await eventually(lambda: admin.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'ledger' "
            "AND state <> 'idle'"), within=10)
        stored = await admin.fetch(
            "SELECT position FROM ledger.events WHERE dedup_key = ANY($1::bytea[])",
            [d.dedup_key for d in cut])
        assert len(stored) == 2
        await relay.start()
        drained = await worker.store.append(cut, draining=True)
        assert drained == [Duplicate(r["position"]) for r in sorted(
            stored, key=lambda r: r["position"])], drained
        assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 0
        assert await _chain_verified(worker) == (await worker.store.head())[0]
    finally:
        await blocker.close()
        await pool.close()


_MESSAGES = ["ünïcødé ✓ 😀 ﷺ", "a NUL \x00 inside", "\\u0000 as text", "%00%ff+&=", "x" * 300_000,
             "\u2028\u2029\ufeff", ""]


def _hostile_drafts(settings: Settings, seed: int, count: int) -> list[Any]:
    """Simulated traffic with install/uninstall/reinstall churn (tokens change), as forms and
    as JSON, with odd values where the SQL and the Python of the chain could part: unicode,
    NULs, escapes, a large value, no `ts` (occurred_at NULL), forged tokens, portals nobody knows
    — and redeliveries, some of them in the same batch as their original."""
    rng = random.Random(seed)  # noqa: S311 - simulated traffic, not secrets
    traffic = Traffic(seed=seed, portals=3)
    made: list[Any] = []
    while len(made) < count:
        if made and rng.random() < 0.12:
            made.append(rng.choice(made))  # a redelivery: the same body, received again
            continue
        sim = traffic.next()
        document = copy.deepcopy(sim.document)
        params = document.get("data", {}).get("PARAMS")
        if isinstance(params, dict) and "MESSAGE" in params and rng.random() < 0.5:
            params["MESSAGE"] = rng.choice(_MESSAGES)
        if rng.random() < 0.15:
            document.pop("ts", None)
        if rng.random() < 0.06:
            document["auth"]["application_token"] = f"{rng.getrandbits(128):032x}"  # forged
        if rng.random() < 0.03:
            document["auth"]["member_id"] = f"{rng.getrandbits(128):032x}"  # never seen
        if rng.random() < 0.4:
            body, content_type = orjson.dumps(document), "application/json"
        else:
            body, content_type = wire.http_build_query(document), FORM
        made.append((body, content_type, sim.query))
    drafts: list[Any] = []
    for body, content_type, query in made:
        delivery = intake.Delivery(body, content_type, query, "127.0.0.1")
        try:
            drafts.append(intake.draft_of(settings, delivery, intake.decode(settings, delivery),
                                          datetime.now(UTC), 1000))
        except LedgerError:
            continue  # refused at the edge: never reaches the store
    return drafts


async def test_the_one_statement_way_stores_what_the_long_way_stores_row_for_row(
    cluster: Cluster, template: str, database: Database, settings: Settings,
) -> None:
    """The same batches — lifecycle churn, odd values, redeliveries — appended by a worker that
    may take the one-statement way and, into another database, by one that never does: the same
    answers, and the same rows, byte for byte (positions, hashes, payloads, metadata, fold
    records; redeliveries and rejections too)."""
    drafts = _hostile_drafts(settings, seed=15, count=260)
    rng = random.Random(15)  # noqa: S311 - test batches, not secrets
    batches: list[list[Any]] = []
    while len(batches) < 200 and drafts:
        size = rng.choice([1, 1, 2, 3, 5, 8, 13])
        batches.append(drafts[:size])
        drafts = drafts[size:]
    other = await _create_database(cluster, template)
    pools = [await create_pool(database.service_dsn, size=2),
             await create_pool(other.service_dsn, size=2)]
    try:
        fast, long = (EventStore(pool, policy=TrustPolicy.TOFU, one_round_trip=way)
                      for pool, way in zip(pools, (True, False), strict=True))
        ways: Counter[str] = Counter()
        fast.count_ways(lambda way: ways.update([way]))
        for batch in batches:
            assert await fast.append(batch) == await long.append(batch)
        assert ways["one_statement"] >= 20, ways
        assert ways["retried"] >= 3, ways  # redeliveries a worker's memory cannot know
        tables = {"events": "position", "redeliveries": "position, received_at",
                  "rejections": "position"}
        for table, order in tables.items():
            rows = [[dict(r) for r in await pool.fetch(
                f"SELECT * FROM ledger.{table} ORDER BY {order}")] for pool in pools]
            assert rows[0] == rows[1], table
        for store in (fast, long):
            report = await integrity.verify_stream(store, "events")
            assert report.problem is None, report.problem
    finally:
        for pool in pools:
            await pool.close()
        await _drop_database(cluster, other.name)


async def test_only_the_service_may_call_the_function_and_it_lends_it_no_right(
    admin: Connection,
) -> None:
    """`ledger.append_events` runs with its caller's rights (not SECURITY DEFINER): the service
    role can do through it only what it may do anyway (insert events, move the head), and the
    trust trigger still derives trust. Readers and the projector cannot call it at all, and its
    search_path is pinned, so nothing a caller puts first on its own path (pg_temp included) is
    used inside it. Exactly one such function exists (0012's is gone)."""
    (function,) = await admin.fetch(
        "SELECT p.oid, p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner) AS owner "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'ledger' AND p.proname = 'append_events'")
    assert not function["prosecdef"]
    assert function["proconfig"] == ["search_path=pg_catalog, pg_temp"]
    assert function["owner"] == "ledger_owner"
    may = {role: await admin.fetchval("SELECT has_function_privilege($1, $2::oid, 'EXECUTE')",
                                      role, function["oid"])
           for role in ("ledger_app", "ledger_reader", "ledger_projector")}
    assert may == {"ledger_app": True, "ledger_reader": False, "ledger_projector": False}
    for role in ("ledger_reader", "ledger_projector"):
        async with admin.transaction():
            await admin.execute(f"SET LOCAL ROLE {role}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await admin.fetch(_APPEND_EVENTS, 0, bytes(32), [], [], [], [], [], [], [],
                                  [], [], [], [], [], [], [], False)


async def test_a_worker_racing_trust_changes_stores_only_under_the_trust_of_its_position(
    database: Database, settings: Settings
) -> None:
    """One worker appends messages under the portal's token while another process changes
    that portal's trust again and again — re-provisioned with another token and back, ended
    and re-provisioned. Every message stored was stored where, by the trust events before its
    position, the portal trusted the token it presented: no batch of the one-statement way
    slipped past a trust change committed ahead of it."""
    pools = [await create_pool(database.service_dsn, size=2) for _ in range(2)]
    worker, operator = (_Process(pool) for pool in pools)
    try:
        await _installed(worker, settings)
        sent: dict[bytes, str] = {}

        async def messages() -> None:
            for batch in range(40):
                drafts = [_delivery(settings, "onimbotmessageadd-1", f"race-{batch}-{i}")
                          for i in range(3)]
                sent.update((d.dedup_key, d.member_id) for d in drafts)
                await worker.store.append(drafts)

        async def changes() -> None:
            for turn in range(12):
                if turn % 3 == 2:
                    await change_trust(operator.store, TrustChange.ENDED, member_id=MEMBER_ID,
                                       actor="test")
                token = "e" * 32 if turn % 2 == 0 else TOKEN
                await change_trust(operator.store, TrustChange.PROVISIONED, member_id=MEMBER_ID,
                                   domain=DOMAIN, token=token, actor="test")

        await asyncio.gather(messages(), changes())
        rows = await pools[0].fetch(
            "SELECT position, event_type, origin, dedup_key, payload FROM ledger.events "
            "ORDER BY position")
        trust = TrustFacts()
        checked = 0
        for row in rows:
            if row["event_type"] == TRUST_EVENT and row["origin"] != "bitrix24":
                effect = effect_of(orjson.loads(row["payload"]))
                assert effect is not None
                apply(trust, effect, row["position"])
            elif bytes(row["dedup_key"]) in sent:
                portal = trust.portals[MEMBER_ID]
                assert portal.state is TrustState.TRUSTED, row["position"]
                assert portal.token_sha256 == sha256(TOKEN.encode()), row["position"]
                checked += 1
        assert checked > 0
        assert worker.ways["one_statement"] > 0, worker.ways
        assert await _chain_verified(worker) == rows[-1]["position"]
    finally:
        for pool in pools:
            await pool.close()


async def _events_scanned(admin: Connection) -> int:
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    scans: int = await admin.fetchval(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'ledger.events'::regclass")
    return scans


async def test_the_statement_never_scans_the_events_table_however_young_its_plans(
    database: Database, admin: Connection, settings: Settings
) -> None:
    """The statement runs under the head lock, so its cost is everybody's wait. A session's
    plans inside the function are cached, generic after five calls — and a plan made while
    `ledger.events` was young (a new installation, a benchmark's fresh database: no ANALYZE yet)
    looked up stored dedup keys by a hash join over a sequential scan of the whole table, kept
    as the table grew until autovacuum's next analyze: each statement read every event (its
    cost grew by ~0.3 µs per stored event, measured). The dedup keys are the unique index's to
    check, which no plan can route around."""
    pool = await create_pool(database.service_dsn, size=1)
    try:
        worker = _Process(pool)
        await _installed(worker, settings)
        await worker.store.append([_delivery(settings, "onimbotmessageadd-1", "learn")])
    finally:
        await pool.close()
    await eventually(lambda: admin.fetchval(  # each backend reports its statistics as it ends
        "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'ledger'"), within=10)
    before = await _events_scanned(admin)
    pool = await create_pool(database.service_dsn, size=1)  # one session: one plan cache
    try:
        worker = _Process(pool)
        await worker.store.append([_delivery(settings, "onimbotmessageadd-1", "relearn")])
        for i in range(20):
            (stored,) = await worker.store.append(
                [_delivery(settings, "onimbotmessageadd-1", f"young-{i}")])
            assert isinstance(stored, Stored), stored
        assert worker.ways["one_statement"] == 20, worker.ways
    finally:
        await pool.close()
    await eventually(lambda: admin.fetchval(  # each backend reports its statistics as it ends
        "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'ledger'"), within=10)
    scanned = await _events_scanned(admin) - before
    assert scanned <= 1, scanned  # the long way's one batch may; the 20 statements may not
