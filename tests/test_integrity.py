"""Tampering by a superuser with the triggers off is caught, at the right position and kind."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest
from click.testing import CliRunner

from ledger import checkpoints, drafts, integrity
from ledger.cli import main
from ledger.errors import CheckpointError
from ledger.hashing import chain_hash, event_entry, sha256
from ledger.settings import TrustPolicy
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange
from ledger.verification import Anchor, ProblemKind
from tests.conftest import Database

Connection: TypeAlias = "asyncpg.Connection[Any]"
EVENTS = 12


@pytest.fixture
async def store(database: Database) -> Any:
    pool = await create_pool(database.service_dsn, size=2)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    now = datetime.now(UTC)
    await store.append([
        drafts.operator_action(TrustChange.ALLOWED, member_id=f"portal-{i}", domain=None,
                               token=None, actor="test", received_at=now)
        for i in range(EVENTS)
    ])
    rejection = drafts.rejection_draft(
        received_at=now, status=401, reason="missing_auth", detail="", peer="10.0.0.1",
        content_type=None, body=b"x=1", claim=drafts.claim_of_text(b"x=1", 64),
    )
    await store.append([rejection, rejection])
    yield store
    await pool.close()


@pytest.fixture
async def tamperer(admin: Connection) -> Connection:
    """A superuser session with user triggers switched off, as a rogue DBA would have."""
    await admin.execute("SET session_replication_role = replica")
    return admin


async def shift(tamperer: Connection, *, after: int, by: int) -> None:
    """Renumber every event past `after` (in two steps: positions are a primary key)."""
    sql = "UPDATE ledger.events SET position = position + $1 WHERE position > $2"
    await tamperer.execute(sql, 1_000_000, after)
    await tamperer.execute(sql, by - 1_000_000, 1_000_000)


async def problem_of(store: EventStore, anchor: Anchor | None = None) -> Any:
    return (await integrity.verify_stream(store, "events", anchor=anchor)).problem


async def test_an_untouched_store_verifies(store: EventStore) -> None:
    for stream in integrity.STREAMS:
        report = await integrity.verify_stream(store, stream)
        assert report.problem is None
    assert (await integrity.verify_stream(store, "events")).verified == EVENTS


async def test_an_edited_payload_is_caught(store: EventStore, tamperer: Connection) -> None:
    await tamperer.execute(
        "UPDATE ledger.events SET payload = replace(payload::text, 'portal-4', 'portal-X')::json "
        "WHERE position = 5"
    )
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (5, ProblemKind.PAYLOAD_CHANGED)


async def test_edited_metadata_is_caught(store: EventStore, tamperer: Connection) -> None:
    await tamperer.execute("UPDATE ledger.events SET event_type = 'X' WHERE position = 7")
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (7, ProblemKind.EVENT_CHANGED)


async def test_a_deleted_event_is_caught(store: EventStore, tamperer: Connection) -> None:
    await tamperer.execute("DELETE FROM ledger.events WHERE position = 6")
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (6, ProblemKind.EVENT_MISSING)


async def test_a_deleted_event_with_renumbering_is_caught(
    store: EventStore, tamperer: Connection
) -> None:
    await tamperer.execute("DELETE FROM ledger.events WHERE position = 6")
    await shift(tamperer, after=6, by=-1)
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (6, ProblemKind.EVENT_MISSING)


async def test_the_last_event_deleted_is_caught_by_the_head(
    store: EventStore, tamperer: Connection
) -> None:
    await tamperer.execute("DELETE FROM ledger.events WHERE position = $1", EVENTS)
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (EVENTS, ProblemKind.EVENT_MISSING)


async def test_a_forged_event_inserted_mid_history_is_caught(
    store: EventStore, tamperer: Connection
) -> None:
    await shift(tamperer, after=4, by=1)
    previous = await tamperer.fetchrow("SELECT * FROM ledger.events WHERE position = 4")
    assert previous is not None
    forged = dict(previous)
    forged["payload"] = '{"change":"allowed","member_id":"evil"}'
    forged["payload_sha256"] = sha256(forged["payload"].encode())
    forged["dedup_key"] = sha256(b"forged")
    forged["position"], forged["prev_hash"] = 5, bytes(previous["hash"])
    forged["hash"] = chain_hash(forged["prev_hash"], 5, _entry(forged), forged["payload_sha256"])
    await _insert(tamperer, forged)
    await tamperer.execute(
        "UPDATE ledger.stream_heads SET position = position + 1 WHERE stream = 'events'"
    )
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (5, ProblemKind.EVENT_INSERTED)


async def test_two_swapped_events_are_caught(store: EventStore, tamperer: Connection) -> None:
    await tamperer.execute("UPDATE ledger.events SET position = 1000 WHERE position = 8")
    await tamperer.execute("UPDATE ledger.events SET position = 8 WHERE position = 9")
    await tamperer.execute("UPDATE ledger.events SET position = 9 WHERE position = 1000")
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (8, ProblemKind.ORDER_CHANGED)


async def test_an_edited_rejection_is_caught(store: EventStore, tamperer: Connection) -> None:
    await tamperer.execute("UPDATE ledger.rejections SET peer = '10.9.9.9' WHERE position = 2")
    problem = (await integrity.verify_stream(store, "rejections")).problem
    assert problem is not None
    assert (problem.position, problem.kind) == (2, ProblemKind.EVENT_CHANGED)


async def test_a_rewritten_self_consistent_history_is_caught_only_by_a_checkpoint(
    store: EventStore, tamperer: Connection, tmp_path: Path
) -> None:
    private, public = checkpoints.generate_keys(tmp_path, "test-ledger")
    statement = await integrity.make_checkpoint(
        store, checkpoints.load_private_key(private), "test-ledger"
    )
    origin, key = checkpoints.load_public_key(public)
    signed = checkpoints.verify(statement, key, origin)
    assert signed.position == EVENTS

    rows = [dict(r) for r in await tamperer.fetch("SELECT * FROM ledger.events ORDER BY position")]
    await tamperer.execute("TRUNCATE ledger.events CASCADE")
    rows[2]["payload"] = rows[2]["payload"].replace("portal-2", "portal-Z")
    previous = rows[1]["hash"]
    for row in rows[2:]:  # recompute everything after the edit: a self-consistent forgery
        row["payload_sha256"] = sha256(row["payload"].encode())
        row["prev_hash"] = previous
        row["hash"] = chain_hash(previous, row["position"], _entry(row), row["payload_sha256"])
        previous = row["hash"]
    for row in rows:
        await _insert(tamperer, row)
    await tamperer.execute(
        "UPDATE ledger.stream_heads SET hash = $1 WHERE stream = 'events'", previous
    )

    assert await problem_of(store) is None  # the chain alone cannot tell
    problem = await problem_of(store, Anchor(signed.position, signed.head_hash))
    assert (problem.position, problem.kind) == (EVENTS, ProblemKind.CHECKPOINT_MISMATCH)


def test_an_altered_checkpoint_statement_fails_its_signature(tmp_path: Path) -> None:
    private, public = checkpoints.generate_keys(tmp_path, "test-ledger")
    statement = checkpoints.sign(
        checkpoints.Checkpoint("test-ledger", 10, b"\1" * 32, datetime.now(UTC)),
        checkpoints.load_private_key(private),
    )
    origin, key = checkpoints.load_public_key(public)
    with pytest.raises(CheckpointError, match="altered"):
        checkpoints.verify(statement.replace("\n10\n", "\n11\n"), key, origin)
    assert oct(private.stat().st_mode & 0o777) == "0o600"


def test_cli_verify_exits_non_zero_naming_the_position(
    store: EventStore, database: Database, tmp_path: Path
) -> None:
    env = {"LEDGER_DATABASE_URL": database.service_dsn, "LEDGER_LOG_LEVEL": "WARNING",
           "LEDGER_DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    assert runner.invoke(main, ["keys", "generate"], env=env).exit_code == 0
    statement = tmp_path / "checkpoint.txt"
    assert runner.invoke(main, ["checkpoint", "--output", str(statement)], env=env).exit_code == 0
    public = str(tmp_path / "keys" / checkpoints.PUBLIC_NAME)
    checked = runner.invoke(main, ["verify-checkpoint", str(statement), "--public-key", public])
    assert checked.exit_code == 0, checked.output

    ok = runner.invoke(main, ["verify", "--quiet", "--checkpoint", str(statement),
                              "--public-key", public], env=env)
    assert ok.exit_code == 0, ok.output
    assert f"events: {EVENTS} rows verified" in ok.output

    import asyncio

    async def tamper() -> None:
        connection = await asyncpg.connect(database.admin_dsn)
        try:
            await connection.execute("SET session_replication_role = replica")
            await connection.execute("DELETE FROM ledger.events WHERE position = 3")
        finally:
            await connection.close()

    asyncio.run(tamper())
    failed = runner.invoke(main, ["verify", "--quiet"], env=env)
    assert failed.exit_code == 1
    assert "events position 3: event_missing" in failed.output


def _entry(row: dict[str, Any]) -> bytes:
    return event_entry(
        member_id=row["member_id"], event_type=row["event_type"], origin=row["origin"],
        bot_ids=row["bot_ids"], occurred_at=row["occurred_at"], received_at=row["received_at"],
        dedup_key=bytes(row["dedup_key"]),
        body_sha256=None if row["body_sha256"] is None else bytes(row["body_sha256"]),
        metadata=orjson.loads(row["metadata"]),
    )


async def _insert(connection: Connection, row: dict[str, Any]) -> None:
    columns = list(row)
    placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
    await connection.execute(
        f"INSERT INTO ledger.events ({', '.join(columns)}) VALUES ({placeholders})",
        *row.values(),
    )


async def test_serve_writes_signed_checkpoints_every_n_events(
    make_client: Any, settings_factory: Any, tmp_path: Path
) -> None:
    from ledger.web import CHECKPOINTER
    from tests.helpers import install_sample_portal

    private, public = checkpoints.generate_keys(tmp_path / "keys", "bitrix24-ledger")
    client = await make_client(settings_factory(
        checkpoint_dir=tmp_path / "checkpoints", checkpoint_key=private,
        checkpoint_every_events=3,
    ))
    await install_sample_portal(client)  # 3 events: allow, install, trust established
    async with asyncio.timeout(10):
        await client.app[CHECKPOINTER].wait_for(3)
    (written,) = sorted((tmp_path / "checkpoints").iterdir())
    origin, key = checkpoints.load_public_key(public)
    assert checkpoints.verify(written.read_text(), key, origin).position == 3


async def test_edited_metadata_json_is_caught_but_reformatting_is_not_a_change(
    store: EventStore, tamperer: Connection
) -> None:
    await tamperer.execute(
        "UPDATE ledger.events SET metadata = jsonb_pretty(metadata::jsonb)::json WHERE position = 2"
    )
    assert await problem_of(store) is None  # same JSON value, other text: the chain is on values
    await tamperer.execute(
        """UPDATE ledger.events SET metadata = '{"peer": "6.6.6.6"}' WHERE position = 3"""
    )
    problem = await problem_of(store)
    assert (problem.position, problem.kind) == (3, ProblemKind.EVENT_CHANGED)
