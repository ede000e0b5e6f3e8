"""Derived state that cannot be bent: a total fold, a guarded and verifiable projection, and
answers as of a position, a received time or a Bitrix24 time."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import asof, foldrecord, integrity, wire
from ledger.cli import main
from ledger.errors import BadQuery
from ledger.models import TRUST_EVENT
from ledger.projections import fold, readers, rows
from ledger.projections.fold import State
from ledger.projections.projector import Projector
from ledger.settings import Settings, TrustPolicy
from ledger.storage.projection_store import COLUMNS, TABLES, ProjectionStore
from ledger.storage.store import EventStore, create_pool
from ledger.storage.target import PROJECTOR_ROLE, with_login
from tests.conftest import MEMBER_ID, ClientFactory, Database, sample
from tests.helpers import Client, install_sample_portal, post
from tests.test_api import bearer, get
from tests.test_projections import projections_of, projector_of

Admin: TypeAlias = "asyncpg.Connection[Any]"
POISON = "data%5BBOT%5D%5B%C2%B2%5D%5BBOT_CODE%5D=x"  # data[BOT][²][BOT_CODE]=x
KNOWN_TYPES = [
    "ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL", "ONIMBOTDELETE", "ONIMBOTV2DELETE",
    "ONIMBOTMESSAGEADD", "ONIMBOTV2MESSAGEADD", "ONIMBOTMESSAGEUPDATE", "ONIMBOTMESSAGEDELETE",
    "ONIMCOMMANDADD", "ONIMBOTV2COMMANDADD", "ONIMBOTJOINCHAT", "ONIMBOTV2JOINCHAT",
    "ONIMBOTV2REACTIONCHANGE", "ONIMBOTV2CONTEXTGET", TRUST_EVENT,
]


async def cli(database: Database, *args: str) -> Any:
    """The `ledger` command, in a thread of its own (it runs its own event loop)."""
    env = {"LEDGER_DATABASE_URL": database.service_dsn,
           "LEDGER_ADMIN_DATABASE_URL": database.admin_dsn, "LEDGER_LOG_LEVEL": "WARNING"}
    return await asyncio.to_thread(
        CliRunner().invoke, main, list(args), env=env, catch_exceptions=False
    )


def poisoned(name: str) -> bytes:
    return sample(name) + b"&" + POISON.encode()


# ---- 1. the fold is total ------------------------------------------------------------------


def test_the_old_digit_test_is_what_let_the_poison_in() -> None:
    assert "²".isdigit()  # so the fold's old `int(str(bot_id))` raised on it
    for text in ["²", "١٢", " 7", "7\n", "+7", "1_0", "-1", "", "9223372036854775808"]:
        assert asof.strict_int64(text) is None, text
    assert asof.strict_int64("9223372036854775807") == 2**63 - 1
    assert asof.strict_int64("0567") == 567


async def test_a_poisoned_delivery_is_stored_and_everything_derived_keeps_working(
    client: Client, database: Database
) -> None:
    await install_sample_portal(client)
    status, stored = await post(client, poisoned("onimbotdelete-1"))
    assert status == 200, stored
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200
    projector = projector_of(client)
    await projector.catch_up()
    assert projector.lag == 0  # the registry is current, past the poison

    (deletion,) = await readers.deletions(projections_of(client), None)
    assert (deletion.bot_id, deletion.position) == (567, stored["position"])
    assert any("not a bot id" in note for note in deletion.payload_anomalies)
    assert "unexpected_payload" in readers.as_record(deletion)["anomalies"]
    headers = await bearer(client)
    history = await get(client, f"/portals/{MEMBER_ID}/bots/567", headers)
    (event,) = [e for e in history["events"] if e["position"] == stored["position"]]
    assert event["anomalies"] == deletion.payload_anomalies
    before = await get(client, "/bots", headers, as_of=f"position:{stored['position'] - 1}")
    assert before == []
    after = await get(client, "/bots", headers, as_of=f"position:{stored['position']}")
    assert [(b["bot_id"], b["status"]) for b in after] == [(567, "deleted")]
    assert (await get(client, "/bots", headers, as_of="ts:2026-02-27T00:00:00Z"))  # ts of 567's end

    assert (await cli(database, "rebuild", "--quiet")).exit_code == 0
    listed = await cli(database, "deletions", "--as-of", f"position:{stored['position']}", "--json")
    assert listed.exit_code == 0, listed.output
    assert orjson.loads(listed.output)["payload_anomalies"] == deletion.payload_anomalies
    verified = await cli(database, "verify", "--projections", "--quiet")
    assert verified.exit_code == 0, verified.output


async def test_a_deletion_flagged_only_unexpected_payload_is_among_the_anomalies(
    client: Client,
) -> None:
    """`anomalies=true` ("only rows with an anomaly") keeps every row whose `anomalies` list is
    not empty — `unexpected_payload` too — live and as of a position alike."""
    await install_sample_portal(client)
    assert (await post(client, sample("onimbotmessageadd-1")))[0] == 200  # 567 is seen first
    status, stored = await post(client, poisoned("onimbotdelete-1"))
    assert status == 200, stored
    await projector_of(client).catch_up()
    headers = await bearer(client)
    for as_of in ({}, {"as_of": f"position:{stored['position']}"}):
        everything = await get(client, "/deletions", headers, **as_of)
        assert [d["anomalies"] for d in everything] == [["unexpected_payload"]]
        flagged = await get(client, "/deletions", headers, anomalies="true", **as_of)
        assert flagged == everything, as_of


async def test_as_of_a_position_past_the_head_is_refused_not_answered_as_the_head(
    client: Client, database: Database
) -> None:
    """Asked as of a position nothing is stored at yet, the answer would be the head's —
    looking pinned, yet changing as the next events arrive. It is a 409 naming the head (the
    CLI: a one-line error); as of the head itself it is answered."""
    await install_sample_portal(client)
    status, stored = await post(client, sample("onimbotdelete-1"))
    assert status == 200, stored
    head = stored["position"]
    headers = await bearer(client)
    for path in ["/bots", "/deletions"]:
        response = await client.get(f"/api/v1{path}", headers=headers,
                                     params={"as_of": f"position:{head + 1}"})
        assert response.status == 409, await response.text()
        answer = await response.json()
        assert answer["error"] == "past_the_head"
        assert f"ends at position {head}" in answer["message"]
        assert await get(client, path, headers, as_of=f"position:{head}") is not None
    listed = await cli(database, "bots", "--as-of", f"position:{head + 1}")
    assert listed.exit_code != 0
    assert f"ends at position {head}" in listed.output


async def test_wrong_types_huge_ids_and_other_scripts_digits_are_noted_not_fatal(
    client: Client,
) -> None:
    await install_sample_portal(client)
    document = wire.parse_php_form(sample("onimbotdelete-1"), max_fields=99, max_nesting=9)
    document["data"] = {
        "BOT_ID": "567", "BOT_CODE": ["not", "text"],
        "BOT": {"99999999999999999999": {"BOT_CODE": "huge"}, "١٢": "not an object"},
        "COMMAND": [1, 2], "bot": 5, "PARAMS": {"BOT_ID": {"x": 1}},
    }
    document["auth"]["user_id"] = {"id": 27}
    status, stored = await post(client, orjson.dumps(document), content_type="application/json")
    assert status == 200, stored
    projector = projector_of(client)
    await projector.catch_up()
    assert projector.lag == 0
    (deletion,) = await readers.deletions(projections_of(client), None)
    notes = "\n".join(deletion.payload_anomalies)
    for expected in ["data.BOT_ID.code: a list where text belongs",
                     "'99999999999999999999' is not a bot id",
                     "key '\\u0661\\u0662' is not a bot id", "where an object belongs",
                     "data.COMMAND: a list", "data.bot: a number"]:
        assert expected in notes, (expected, notes)
    # an `auth` field that is not text never reaches the store (a token could hide in it:
    # redaction keeps only public scalar fields of `auth`), so the fold never sees it
    assert "auth.user_id" not in notes
    assert deletion.actor_user_id is None  # not made up from a wrong-typed value


def test_normal_traffic_has_no_anomalies() -> None:
    from ledger.envelope import read_envelope
    from ledger.simulation import Traffic

    traffic, state = Traffic(seed=5, portals=3), State()
    for position in range(1, 1500):
        document = traffic.next().document
        envelope = read_envelope(document)
        fold.apply(state, fold.StoredEvent(
            position, envelope.member_id, envelope.event_type, "bitrix24", envelope.bot_ids,
            envelope.occurred_at, datetime(2026, 3, 1, tzinfo=UTC), document, bytes(32),
        ))
    assert state.anomalies == {}
    assert len(state.bots) > 10


json_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
ids = st.sampled_from(["567", "²", "١٢", "99999999999999999999", "9223372036854775807",
                       "9223372036854775808", "-1", " 7", "7\n", "", "0"]) | json_text
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | json_text | ids,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ids, inner, max_size=3),
    max_leaves=12,
)
shaped = st.fixed_dictionaries({}, optional={
    "event": json_values, "ts": json_values, "domain": json_values, "change": json_values,
    "auth": json_values | st.fixed_dictionaries({}, optional={
        "user_id": json_values, "domain": json_values, "member_id": json_values}),
    "data": json_values | st.fixed_dictionaries({}, optional={
        "BOT_ID": json_values, "BOT_CODE": json_values, "VERSION": json_values,
        "BOT": json_values | st.dictionaries(ids, json_values | st.fixed_dictionaries(
            {}, optional={"BOT_ID": json_values, "BOT_CODE": json_values}), max_size=3),
        "COMMAND": json_values | st.dictionaries(ids, json_values, max_size=2),
        "PARAMS": json_values,
        "bot": json_values | st.fixed_dictionaries(
            {}, optional={"id": json_values, "code": json_values}),
    }),
})
column_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                      max_size=10)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.just(UTC))
events = st.lists(st.fixed_dictionaries({
    "member_id": st.sampled_from(["p1", "p2", ""]) | column_text,
    "event_type": st.sampled_from(KNOWN_TYPES) | column_text,
    "origin": st.sampled_from(["bitrix24", "operator", "ledger"]),
    "bot_ids": st.lists(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([1, 2, 567]),
                        max_size=3, unique=True),
    "occurred_at": st.none() | moments,
    "received_at": moments,
    "payload": shaped | json_values,
    "batch": st.integers(1, 4),
}), min_size=1, max_size=25)


POISONS = {  # every place a bot id is read, each with something int() or isdigit() misjudge
    "auth": {"user_id": ["27"], "domain": 7},
    "data": {"BOT_ID": "²", "BOT_CODE": "x", "VERSION": {"v": 1},
             "BOT": {"²": {"BOT_CODE": "x"}, "1": {"BOT_ID": "١٢", "BOT_CODE": "y"},
                     "2": {"BOT_ID": "99999999999999999999"}, "3": [], "4": {"BOT_ID": 1.5}},
             "COMMAND": {"a": {"BOT_ID": "7\n", "BOT_CODE": "z"}, "b": "x"},
             "bot": {"id": " 7", "code": 5}},
    "change": ["ended"],
}


async def insert_events(admin: Admin, items: list[dict[str, Any]]) -> None:
    """Store rows as they are (the fold reads only ledger.events); chain hashes are random:
    this exercises the fold, not the chain. Trust events of the ledger's own origins are
    written only by the ledger (migration 0005's trigger refuses malformed ones), so arbitrary
    payloads of that type are stored as a Bitrix24 sender's — which nothing may honour.

    Every other row has its fold record, as the intake writes it; the rest have none, as
    events stored before migration 0011: the fold reads both kinds in one store."""
    start = await admin.fetchval("SELECT position FROM ledger.stream_heads WHERE stream = 'events'")
    for offset, item in enumerate(items, start=1):
        origin = "bitrix24" if item["event_type"] == TRUST_EVENT else item["origin"]
        position = start + offset
        await admin.execute(
            "INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids, "
            "occurred_at, received_at, dedup_key, body_sha256, payload, payload_sha256, "
            "metadata, prev_hash, hash, fold_record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
            "NULL, $9, $10, '{}', $11, $12, $13)",
            position, item["member_id"], item["event_type"], origin,
            item["bot_ids"], item["occurred_at"], item["received_at"], os.urandom(32),
            orjson.dumps(item["payload"]).decode(), os.urandom(32), bytes(32), os.urandom(32),
            foldrecord.stored(item["event_type"], origin, item["payload"])
            if position % 2 else None,
        )
    await admin.execute("UPDATE ledger.stream_heads SET position = $1 WHERE stream = 'events'",
                        start + len(items))


async def table_contents(admin: Admin) -> dict[str, list[Any]]:
    return {t: [tuple(r) for r in await admin.fetch(
        f"SELECT {', '.join(COLUMNS[t])} FROM projections.{t} ORDER BY 1, 2")] for t in TABLES}


async def test_any_payload_folds_and_writes_and_rebuild_equals_incremental(
    database: Database, admin: Admin
) -> None:
    """Arbitrary JSON under every event type, arbitrary bot ids: the fold never raises, the
    SQL writers accept what it makes, and a rebuild gives what incremental updating gave.

    The examples go one after another into one store (each on top of what the ones before
    left), each in several batches and catch-ups, each followed by a rebuild."""
    examples: list[list[dict[str, Any]]] = []

    @given(events)
    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    def collect(example: list[dict[str, Any]]) -> None:
        examples.append(example)

    collect()
    every_type = [{"member_id": "p1", "event_type": t, "origin": "bitrix24", "bot_ids": [567],
                   "occurred_at": None, "received_at": datetime(2026, 3, 1, tzinfo=UTC),
                   "payload": POISONS, "batch": 1} for t in KNOWN_TYPES]
    writer = await create_pool(with_login(database.service_dsn, user=PROJECTOR_ROLE), size=2)
    reader = await create_pool(database.service_dsn, size=2)
    try:
        for example in [every_type, *examples]:
            projector = Projector(EventStore(writer, policy=TrustPolicy.ALLOWLIST),
                                  ProjectionStore(writer), batch_size=example[0]["batch"])
            for start in range(0, len(example), 3):  # several batches, several catch-ups
                await insert_events(admin, example[start:start + 3])
                await projector.catch_up()
            incremental = await table_contents(admin)
            report = await integrity.verify_projections(ProjectionStore(reader))
            # arbitrary trust-event payloads make trust rows the store never wrote
            assert report.difference is None or report.difference.table == "ledger.portal_trust", (
                str(report.difference), example)
            await projector.rebuild()
            assert await table_contents(admin) == incremental, example
    finally:
        await reader.close()
        await writer.close()


# ---- 2. guarded and verifiable -------------------------------------------------------------


async def test_the_service_role_cannot_write_projections(
    client: Client, service_connection: Admin, database: Database
) -> None:
    await install_sample_portal(client)
    await post(client, sample("onimbotdelete-1"))
    await projector_of(client).catch_up()
    for statement in [
        "DELETE FROM projections.deletions WHERE bot_id = 567",
        "UPDATE projections.bots SET status = 'active', deleted_at = NULL WHERE bot_id = 567",
        "INSERT INTO projections.anomalies VALUES (1, 'x', 'y', '{}', '{}')",
        "UPDATE projections.checkpoints SET position = 0",
        "TRUNCATE projections.portals",
        "DELETE FROM projections.snapshots",
    ]:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await service_connection.execute(statement)
    assert await service_connection.fetchval("SELECT count(*) FROM audit.deletions") == 1
    projector = await asyncpg.connect(with_login(database.admin_dsn, user=PROJECTOR_ROLE))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await projector.execute("INSERT INTO ledger.events DEFAULT VALUES")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await projector.execute("UPDATE ledger.portal_trust SET state = 'ended'")
    finally:
        await projector.close()


async def test_the_checkpoint_records_the_chain_head_it_folded_to(client: Client) -> None:
    await install_sample_portal(client)
    _, stored = await post(client, sample("onimbotdelete-1"))
    await projector_of(client).catch_up()
    answer = await get(client, "/projection", await bearer(client))
    assert client.app is not None
    from ledger.web import STORE

    position, head = await client.app[STORE].head()
    assert (answer["position"], answer["head_hash"]) == (position, head.hex())
    assert position == stored["position"]


TAMPERING = {
    "a deleted deletion row": (
        "DELETE FROM projections.deletions WHERE bot_id = 567",
        "projections.deletions (position={p}, bot_id=567) (row): stored 'missing'"),
    "a resurrected bot": (
        "UPDATE projections.bots SET status = 'active', deleted_at = NULL WHERE bot_id = 567",
        "projections.bots (member_id='" + MEMBER_ID + "', bot_id=567) status: stored 'active', "
        "expected 'deleted'"),
    "a changed trust row": (
        "UPDATE ledger.portal_trust SET state = 'ended', token_sha256 = NULL",
        "ledger.portal_trust (member_id='" + MEMBER_ID + "') state: stored 'ended', "
        "expected 'trusted'"),
    "a re-opened allowance": (  # found by a break test: it let a forged install in
        "UPDATE ledger.portal_allowances SET consumed_position = NULL",
        "ledger.portal_allowances (open) (position="),
    "an altered recorded head": (
        "UPDATE projections.checkpoints SET head_hash = decode(repeat('ab', 32), 'hex')",
        "projections.checkpoints (projection='registry') head_hash: stored abab"),
}


@pytest.mark.parametrize("edit", list(TAMPERING))
async def test_verify_projections_names_a_superusers_edit(
    edit: str, client: Client, admin: Admin, database: Database
) -> None:
    await install_sample_portal(client)
    _, stored = await post(client, sample("onimbotdelete-1"))
    await projector_of(client).catch_up()
    clean = await cli(database, "verify", "--projections", "--quiet")
    assert clean.exit_code == 0, clean.output
    assert "rows match a fold of the store" in clean.output
    statement, named = TAMPERING[edit]
    await admin.execute(statement)
    tampered = await cli(database, "verify", "--projections", "--quiet")
    assert tampered.exit_code == 1
    assert named.format(p=stored["position"]) in tampered.output, tampered.output


async def test_verify_projections_names_an_altered_snapshot(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin,
    database: Database,
) -> None:
    """Found by a break test: a saved fold state edited by a superuser changed `as_of` answers
    and `verify --projections` passed."""
    client = await make_client(settings_factory(projector_snapshot_every=1))
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
        await projector_of(client).catch_up()
    assert await admin.fetchval("SELECT count(*) FROM projections.snapshots") >= 2
    clean = await cli(database, "verify", "--projections", "--quiet")
    assert clean.exit_code == 0, clean.output
    await admin.execute(
        "UPDATE projections.snapshots SET state = (SELECT state FROM projections.snapshots "
        "ORDER BY position LIMIT 1) WHERE position = (SELECT max(position) "
        "FROM projections.snapshots)")
    tampered = await cli(database, "verify", "--projections", "--quiet")
    assert tampered.exit_code == 1
    assert "projections.snapshots (position=" in tampered.output, tampered.output


@pytest.mark.parametrize("column", ["max_received_at", "max_effective_at"])
async def test_verify_projections_names_a_snapshot_claiming_earlier_times(
    column: str, make_client: ClientFactory, settings_factory: Callable[..., Settings],
    admin: Admin, database: Database,
) -> None:
    """A snapshot's recorded times decide which time questions start from it: moved earlier
    by a superuser, `as_of=received:`/`ts:` answers would count events after their moment."""
    client = await make_client(settings_factory(projector_snapshot_every=1))
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
        await projector_of(client).catch_up()
    clean = await cli(database, "verify", "--projections", "--quiet")
    assert clean.exit_code == 0, clean.output
    await admin.execute(
        f"UPDATE projections.snapshots SET {column} = '2000-01-01T00:00:00Z' "
        "WHERE position = (SELECT max(position) FROM projections.snapshots)")
    tampered = await cli(database, "verify", "--projections", "--quiet")
    assert tampered.exit_code == 1
    assert "projections.snapshots (position=" in tampered.output, tampered.output
    assert column in tampered.output, tampered.output


# ---- 3. time, both ways --------------------------------------------------------------------

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def bot_event(event_type: str, bot_id: int, *, received: datetime, ts: datetime
              ) -> dict[str, Any]:
    return {"member_id": "p1", "event_type": event_type, "origin": "bitrix24",
            "bot_ids": [bot_id], "occurred_at": ts, "received_at": received,
            "payload": {"data": {"BOT_ID": str(bot_id), "BOT_CODE": f"b{bot_id}"}}}


async def test_as_of_a_time_takes_every_event_of_then_whatever_its_position(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin,
    database: Database,
) -> None:
    client = await make_client(settings_factory(projector_snapshot_every=1))
    projector = projector_of(client)
    for item in [  # position 3 was spooled: received before position 2, stored after it
        bot_event("ONIMBOTJOINCHAT", 1, received=T0, ts=T0 - timedelta(hours=1)),
        bot_event("ONIMBOTDELETE", 1, received=T0 + timedelta(minutes=10),
                  ts=T0 - timedelta(minutes=55)),
        bot_event("ONIMBOTJOINCHAT", 2, received=T0 + timedelta(minutes=1),
                  ts=T0 - timedelta(hours=2)),
    ]:
        await insert_events(admin, [item])
        await projector.catch_up()  # a snapshot after every event
    assert await admin.fetchval("SELECT count(*) FROM projections.snapshots") == 3
    headers = await bearer(client)

    async def bots(as_of: str) -> set[tuple[int, str]]:
        return {(b["bot_id"], b["status"]) for b in await get(client, "/bots", headers,
                                                                as_of=as_of)}

    at = (T0 + timedelta(minutes=5)).isoformat()
    assert await bots(f"received:{at}") == {(1, "active"), (2, "active")}
    assert await bots(at) == {(1, "active"), (2, "active")}  # a plain time is a received time
    assert await bots(f"ts:{(T0 - timedelta(minutes=90)).isoformat()}") == {(2, "active")}
    assert await bots(f"ts:{int((T0 - timedelta(minutes=50)).timestamp())}") == {
        (1, "deleted"), (2, "active")}
    assert await bots("position:2") == {(1, "deleted")}
    assert await bots("2") == {(1, "deleted")}
    assert await bots("received:2026-03-01T11:00:00Z") == await bots("position:3")
    cli_answer = await cli(database, "bots", "--as-of", f"received:{at}", "--json")
    assert {orjson.loads(x)["bot_id"] for x in cli_answer.output.splitlines()} == {1, 2}


@pytest.mark.parametrize("value", ["²", "position:²", "position:-1", "99999999999999999999",
                                   "position:9223372036854775808", "received:yesterday",
                                   "ts:soon", "later:5", "٣"])
async def test_a_bad_as_of_is_a_400_and_a_one_line_cli_error(
    value: str, client: Client, database: Database
) -> None:
    response = await client.get("/api/v1/bots", params={"as_of": value},
                                headers=await bearer(client))
    assert response.status == 400
    assert (await response.json())["error"] == "bad_query"
    result = await cli(database, "bots", "--as-of", value)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output
    assert "--as-of" in result.output
    with pytest.raises(BadQuery):
        asof.parse_as_of(value)


def test_as_of_forms() -> None:
    assert asof.parse_as_of("position:412") == asof.Position(412)
    assert asof.parse_as_of("412") == asof.Position(412)
    assert asof.parse_as_of("received:2026-03-01T00:00:00Z") == asof.Received(
        datetime(2026, 3, 1, tzinfo=UTC))
    assert asof.parse_as_of("2026-03-01T00:00:00") == asof.Received(
        datetime(2026, 3, 1, tzinfo=UTC))
    assert asof.parse_as_of("ts:1772323200") == asof.Occurred(datetime(2026, 3, 1, tzinfo=UTC))
    assert asof.parse_as_of(None) is None
    assert asof.parse_as_of("") is None


# ---- 4. explicit wiring --------------------------------------------------------------------


async def test_projection_columns_are_the_tables_columns(admin: Admin) -> None:
    for table in TABLES:
        columns = await admin.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "'projections' AND table_name = $1 ORDER BY ordinal_position", table)
        assert tuple(r["column_name"] for r in columns) == COLUMNS[table], table


def test_fold_values_round_trip_through_rows() -> None:
    from ledger.envelope import read_envelope
    from ledger.simulation import Traffic

    traffic, state = Traffic(seed=9, portals=2), State()
    for position in range(1, 400):
        document = traffic.next().document
        envelope = read_envelope(document)
        fold.apply(state, fold.StoredEvent(
            position, envelope.member_id, envelope.event_type, "bitrix24", envelope.bot_ids,
            envelope.occurred_at, datetime(2026, 3, 1, tzinfo=UTC), document,
            hashlib.sha256(str(position).encode()).digest()))
    written = rows.all_rows(state)
    for table, items in written.items():
        for item in items:
            assert tuple(item) == COLUMNS[table], table
    assert fold.dump_state(rows.state_of(written, state.position)) == fold.dump_state(state)

