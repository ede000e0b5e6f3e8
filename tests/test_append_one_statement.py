"""The one-statement append: ordinary deliveries of portals whose trust the intake knows are
stored in one round trip (`ledger.append_events`), and whatever another process changed
meanwhile — a portal's trust, a stored occurrence, the head — is found under the lock, so the
answers are those of the long way: PostgreSQL's trust, PostgreSQL's dedup facts, one chain."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from ledger import drafts, intake, integrity
from ledger.models import Duplicate, Refusal, Stored
from ledger.operations import change_trust
from ledger.planner import Head
from ledger.settings import Settings, TrustPolicy
from ledger.storage.store import EventStore, Pool, _KnownTrust, create_pool
from ledger.storage.target import ensure_database
from ledger.trust import PortalTrust, TrustChange, TrustState
from tests.conftest import FORM, MEMBER_ID, Cluster, Database, sample


def _delivery(settings: Settings, name: str, text: str | None = None) -> Any:
    """A sample delivery; `text` makes a message of its own (another occurrence)."""
    body = sample(name)
    if text is not None:
        body = body.replace(b"%5BMESSAGE%5D=Hello", b"%5BMESSAGE%5D=" + text.encode())
    delivery = intake.Delivery(body, FORM, "", "127.0.0.1")
    return intake.draft_of(settings, delivery, intake.decode(settings, delivery),
                           datetime.now(UTC), 1000)


class _Process:
    """A store on a pool of its own, as one `serve` worker has, counting the ways it took."""

    def __init__(self, pool: Pool, *, one_round_trip: bool = True) -> None:
        self.pool = pool
        self.store = EventStore(pool, policy=TrustPolicy.ALLOWLIST,
                                one_round_trip=one_round_trip)
        self.ways: Counter[str] = Counter()
        self.store.count_ways(lambda way: self.ways.update([way]))


@pytest.fixture
async def processes(database: Database) -> Any:
    pools = [await create_pool(database.service_dsn, size=2) for _ in range(2)]
    yield [_Process(pool) for pool in pools]
    for pool in pools:
        await pool.close()


async def _installed(process: _Process, settings: Settings) -> None:
    await change_trust(process.store, TrustChange.ALLOWED, member_id=MEMBER_ID, actor="test")
    (installed,) = await process.store.append([_delivery(settings, "onappinstall-1")])
    assert isinstance(installed, Stored), installed


async def _installed_then_copied(cluster: Cluster, database: Database,
                                 settings: Settings) -> str:
    """The sample portal installed, then a copy of the database as it is then (a replica that
    will lose what comes after): its name. The caller drops it."""
    pool = await create_pool(database.service_dsn, size=2)
    try:
        await _installed(_Process(pool), settings)
    finally:
        await pool.close()
    replica = f"{database.name}_replica"
    await ensure_database(cluster.admin_dsn, replica, template=database.name)
    return replica


async def _chain_verified(process: _Process) -> int:
    report = await integrity.verify_stream(process.store, "events")
    assert report.problem is None, report.problem
    return report.verified


@pytest.mark.parametrize("one_round_trip", [True, False], ids=["default", "switched-off"])
async def test_messages_of_a_known_portal_are_stored_in_one_statement_on_one_chain(
    database: Database, settings: Settings, one_round_trip: bool
) -> None:
    pool = await create_pool(database.service_dsn, size=2)
    try:
        process = _Process(pool, one_round_trip=one_round_trip)
        await _installed(process, settings)  # the long way: the install changes trust
        positions = []
        for batch in range(4):
            outcomes = await process.store.append(
                [_delivery(settings, "onimbotmessageadd-1", f"m{batch}-{i}") for i in range(3)])
            assert all(isinstance(o, Stored) for o in outcomes), outcomes
            positions += [o.position for o in outcomes if isinstance(o, Stored)]
        head = await process.store.head()
        assert positions == list(range(head[0] - 11, head[0] + 1))  # gap-free, in order
        assert await _chain_verified(process) == head[0]  # PostgreSQL chained as Python does
        if one_round_trip:
            assert process.ways["one_statement"] == 4, process.ways
        else:
            assert process.ways["one_statement"] == process.ways["retried"] == 0, process.ways
    finally:
        await pool.close()


@pytest.mark.parametrize("change", ["uninstall", "re-provisioning"])
async def test_a_trust_change_committed_by_another_process_decides_the_next_batch(
    processes: list[_Process], settings: Settings, change: str
) -> None:
    """The first process knows the portal's trust from before; the second ends it (or gives the
    portal a new token). The first's next message under the old token is refused, as the long
    way would refuse it — its one statement found the trust moved and wrote nothing."""
    first, second = processes
    await _installed(first, settings)
    (warm,) = await first.store.append([_delivery(settings, "onimbotmessageadd-1", "warm")])
    assert isinstance(warm, Stored)
    assert first.ways["one_statement"] == 1, first.ways
    if change == "uninstall":
        (ended,) = await second.store.append([_delivery(settings, "onappuninstall-1")])
    else:
        (ended,) = await second.store.append([drafts.operator_action(
            TrustChange.PROVISIONED, member_id=MEMBER_ID, domain="some-domain.bitrix24.com",
            token="f" * 32, actor="test", received_at=datetime.now(UTC))])
    assert isinstance(ended, Stored), ended
    (late,) = await first.store.append([_delivery(settings, "onimbotmessageadd-1", "late")])
    assert isinstance(late, Refusal), late
    assert late.status == (403 if change == "uninstall" else 401)
    assert first.ways["retried"] == 1, first.ways
    assert await _chain_verified(first) == (await first.store.head())[0]


async def test_a_redelivery_of_what_another_process_stored_is_a_duplicate(
    processes: list[_Process], settings: Settings
) -> None:
    first, second = processes
    await _installed(first, settings)
    await first.store.append([_delivery(settings, "onimbotmessageadd-1", "warm")])
    (original,) = await second.store.append([_delivery(settings, "onimbotmessageadd-1", "x")])
    assert isinstance(original, Stored)
    again = await first.store.append([_delivery(settings, "onimbotmessageadd-1", "x"),
                                      _delivery(settings, "onimbotmessageadd-1", "y")])
    assert again[0] == Duplicate(original.position), again
    assert isinstance(again[1], Stored), again
    assert first.ways["retried"] == 1, first.ways


async def test_two_processes_appending_at_once_share_one_gap_free_chain(
    processes: list[_Process], settings: Settings
) -> None:
    """Each process plans on the head it last saw; PostgreSQL numbers and chains from the head
    it finds, so neither process's statements fail for the other's commits."""
    first, second = processes
    await _installed(first, settings)
    await second.store.append([_delivery(settings, "onimbotmessageadd-1", "warm")])  # learns

    async def messages(process: _Process, tag: str) -> list[int]:
        positions = []
        for batch in range(12):
            outcomes = await process.store.append(
                [_delivery(settings, "onimbotmessageadd-1", f"{tag}{batch}-{i}")
                 for i in range(2)])
            assert all(isinstance(o, Stored) for o in outcomes), outcomes
            positions += [o.position for o in outcomes if isinstance(o, Stored)]
        return positions

    a, b = await asyncio.gather(messages(first, "a"), messages(second, "b"))
    head, _ = await first.store.head()
    assert sorted(a + b) == list(range(head - 47, head + 1))
    assert await _chain_verified(first) == head
    assert first.ways["retried"] == second.ways["retried"] == 0
    assert first.ways["one_statement"] == second.ways["one_statement"] == 12


def test_the_trust_an_intake_keeps_is_bounded_and_forgets_the_oldest_first() -> None:
    known = _KnownTrust(2)
    trust = {m: PortalTrust(m, None, TrustState.TRUSTED, bytes(32)) for m in "abc"}
    known.learn({"a": trust["a"], "b": trust["b"]}, Head(5, b"5" * 32))
    known.learn({"a": trust["a"]}, Head(7, b"7" * 32))  # learned again: now the newest
    known.learn({"c": trust["c"]}, Head(9, b"9" * 32))
    assert set(known.portals) == {"a", "c"}
    found = known.facts(["a", "c"])
    assert found is not None
    assert found[1] == Head(7, b"7" * 32)  # true at the older of the two heads
    assert known.facts(["b"]) is None
