"""The bot registry, portals and deletion timeline — live, rebuilt, and as of a moment."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import wire
from ledger.projections import readers
from ledger.projections.fold import APP_UNINSTALLED, BOT_DELETED
from ledger.projections.projector import Projector
from ledger.settings import Settings
from ledger.simulation import Traffic
from ledger.storage import target as targets
from ledger.storage.projection_store import ProjectionStore
from ledger.web import STORE
from tests.conftest import MEMBER_ID, ClientFactory, Database, sample
from tests.helpers import PROJECTOR, Client, allow_installs, install_sample_portal, post

Admin: TypeAlias = "asyncpg.Connection[Any]"
VIEWS = {
    "audit.bots": "portal_member_id, bot_id",
    "audit.deletions": "position, bot_id",
    "audit.portals": "portal_member_id",
    "audit.portal_lifecycle": "position",
}


def projector_of(client: Client) -> Projector:
    assert client.app is not None
    projector: Projector = client.app[PROJECTOR]
    return projector


def projections_of(client: Client) -> ProjectionStore:
    assert client.app is not None
    return ProjectionStore(client.app[STORE].pool)


async def view_contents(admin: Admin) -> dict[str, str]:
    """Every row of every view, as text, in a stable order: for byte-for-byte comparison."""
    contents = {}
    for view, order in VIEWS.items():
        contents[view] = await admin.fetchval(
            f"SELECT coalesce(string_agg(v::text, E'\\n' ORDER BY {order}), '') FROM {view} v"
        )
    return contents


def two_bot_message() -> bytes:
    """A v1 ONIMBOTMESSAGEADD addressed to bot 567 and bot 571 at once."""
    document = wire.parse_php_form(sample("onimbotmessageadd-1"), max_fields=999, max_nesting=9)
    first = document["data"]["BOT"]["567"]
    document["data"]["BOT"]["571"] = {**first, "BOT_ID": "571", "BOT_CODE": "BOT2"}
    document["data"]["PARAMS"]["MESSAGE_ID"] = "99999"
    return wire.http_build_query(document)


async def test_samples_answer_who_deleted_which_bot_and_uninstall_ends_the_rest(
    client: Client,
) -> None:
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimcommandadd-1"]:
        assert (await post(client, sample(name)))[0] == 200
    assert (await post(client, two_bot_message()))[0] == 200
    assert (await post(client, sample("onimbotdelete-1")))[0] == 200
    assert (await post(client, sample("onappuninstall-1")))[0] == 200
    projector, projections = projector_of(client), projections_of(client)

    bots = {b.bot_id: b for b in await readers.bots(projections, projector)}
    assert bots[567].status == "deleted"
    assert (bots[567].deleted_by, bots[567].deletion_cause) == ("27", BOT_DELETED)
    assert bots[567].message_count == 2  # its own message and the one to two bots
    assert bots[571].message_count == 1
    assert bots[571].chat_join_count == 1
    assert bots[1291].command_count == 1
    assert bots[571].deletion_cause == APP_UNINSTALLED

    timeline = await readers.deletions(projections, projector)
    assert [(d.bot_id, d.cause) for d in timeline] == [
        (567, BOT_DELETED), (571, APP_UNINSTALLED), (1291, APP_UNINSTALLED),
    ]
    deleted_567 = timeline[0]
    assert deleted_567.actor_user_id == "27"
    assert deleted_567.message_count == 2
    assert deleted_567.domain == "some-domain.bitrix24.com"
    (portal,) = await readers.portals(projections, projector)
    assert (portal.member_id, portal.trust_state) == (MEMBER_ID, "ended")
    assert portal.uninstalled_position is not None


async def test_anomalies_are_flagged(client: Client) -> None:
    await install_sample_portal(client)
    await post(client, sample("onimbotdelete-1"))  # bot 567 was never seen before
    document = wire.parse_php_form(sample("onimbotdelete-1"), max_fields=99, max_nesting=9)
    document["ts"] = str(int(document["ts"]) + 60)
    await post(client, wire.http_build_query(document))  # deleted again
    await post(client, sample("onimbotmessageadd-1"))  # and active afterwards
    timeline = await readers.deletions(projections_of(client), projector_of(client))
    assert [(d.never_seen, d.repeated) for d in timeline] == [(True, False), (False, True)]
    assert timeline[-1].activity_after_deletion is True


async def ingest(client: Client, traffic: Traffic, count: int) -> None:
    deliveries = [traffic.next() for _ in range(count)]
    await allow_installs(client, deliveries)
    for start in range(0, count, 40):
        answers = await asyncio.gather(*(
            post(client, wire.http_build_query(d.document), query=d.query)
            for d in deliveries[start:start + 40]
        ))
        assert all(status == 200 for status, _ in answers), answers


async def test_rebuilding_gives_exactly_what_incremental_updating_gave(
    client: Client, admin: Admin
) -> None:
    traffic = Traffic(seed=7, portals=8)
    projector = projector_of(client)
    for _ in range(6):  # incremental updates at many different batch boundaries
        await ingest(client, traffic, 500)
        await projector.catch_up()
    incremental = await view_contents(admin)
    assert incremental["audit.deletions"].count("\n") > 50
    assert "application uninstalled" in incremental["audit.deletions"]
    flagged = await admin.fetchrow(
        "SELECT count(*) FILTER (WHERE anomaly_never_seen) AS never_seen, "
        "count(*) FILTER (WHERE anomaly_repeated) AS repeated, "
        "count(*) FILTER (WHERE anomaly_activity_after_deletion) AS late FROM audit.deletions"
    )
    assert flagged is not None
    assert min(flagged.values()) > 0  # the history exercises every anomaly

    await projector.rebuild()
    assert await view_contents(admin) == incremental


async def test_as_of_answers_match_what_the_live_registry_showed(
    client: Client, admin: Admin
) -> None:
    traffic = Traffic(seed=11, portals=4)
    projector, projections = projector_of(client), projections_of(client)
    seen: list[tuple[int, datetime, list[Any], list[Any]]] = []
    for _ in range(4):
        await ingest(client, traffic, 300)
        await projector.catch_up()
        position = projector.checkpoint
        moment = await admin.fetchval(
            "SELECT received_at FROM ledger.events WHERE position = $1", position
        )
        seen.append((position, moment, await readers.bots(projections, None),
                     await readers.deletions(projections, None)))
    for position, moment, live_bots, live_deletions in seen:
        assert await readers.bots(projections, projector, as_of=position) == live_bots
        assert await readers.deletions(projections, projector, as_of=position) == live_deletions
        assert await readers.bots(projections, projector, as_of=moment) == live_bots


async def test_a_reader_role_sees_the_views_and_nothing_else(
    client: Client, database: Database, settings: Settings
) -> None:
    await install_sample_portal(client)
    await post(client, sample("onimbotdelete-1"))
    await projector_of(client).catch_up()
    target = await targets.open_target(settings)
    dsn = await targets.create_reader(target, "auditor_test", "secret-pw")
    reader = await asyncpg.connect(dsn)
    try:
        assert await reader.fetchval("SELECT count(*) FROM audit.deletions") == 1
        assert await reader.fetchval("SELECT count(*) FROM audit.events") >= 1
        assert await reader.fetchval(
            "SELECT deleted_by_user_id FROM audit.deletions WHERE bot_id = 567"
        ) == "27"
        for statement in [
            "SELECT * FROM ledger.events", "SELECT * FROM projections.bots",
            "SELECT * FROM ledger.rejections", "DELETE FROM projections.bots",
            "INSERT INTO ledger.events DEFAULT VALUES",
        ]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(statement)
    finally:
        await reader.close()


async def test_the_readmes_forensic_sql_runs_for_a_reader(
    client: Client, settings: Settings
) -> None:
    import re
    from pathlib import Path

    await install_sample_portal(client)
    for name in ["onimbotmessageadd-1", "onimbotdelete-1"]:
        await post(client, sample(name))
    _, odd = await post(client, sample("onimbotjoinchat-1") + b"&data%5BBOT%5D%5B%C2%B2%5D=x")
    await projector_of(client).catch_up()
    readme = (Path(__file__).parent.parent / "docs" / "auditors.md").read_text()
    (block,) = re.findall(r"```sql\n(.*?)```", readme, re.S)
    statements = [s.strip() for s in block.replace("'X'", f"'{MEMBER_ID}'").split(";")]
    target = await targets.open_target(settings)
    reader = await asyncpg.connect(await targets.create_reader(target, "readme_test", "pw"))
    try:
        who, last_month, life, odd_ones = [await reader.fetch(s) for s in statements if s]
    finally:
        await reader.close()
    assert [(r["deleted_by_user_id"], r["cause"]) for r in who] == [("27", BOT_DELETED)]
    assert [r["event_type"] for r in life] == ["ONIMBOTMESSAGEADD", "ONIMBOTDELETE"]
    assert [r["position"] for r in odd_ones] == [odd["position"]]
    assert last_month == []  # the samples' deletion is from 2026-02


async def test_as_of_from_snapshots_equals_folding_from_position_zero(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin
) -> None:
    from ledger.projections.fold import State, dump_state, load_state

    client = await make_client(settings_factory(projector_snapshot_every=250))
    projector = projector_of(client)
    traffic = Traffic(seed=13, portals=4)
    for _ in range(4):
        await ingest(client, traffic, 300)
        await projector.catch_up()
    snapshots = [r["position"] for r in await admin.fetch(
        "SELECT position FROM projections.snapshots ORDER BY position")]
    assert len(snapshots) >= 3
    head = projector.checkpoint
    for position in [snapshots[0], snapshots[1] + 17, head - 5, head]:
        from_snapshot = await projector.fold_to(position)
        from_zero = await projector._fold(State(), position, lambda n: None)
        assert dump_state(from_snapshot) == dump_state(from_zero)
        assert dump_state(load_state(dump_state(from_zero))) == dump_state(from_zero)
        assert from_snapshot.position == from_zero.position == position
    folded: list[int] = []
    await projector.fold_to(head, folded.append)
    assert sum(folded) == head - snapshots[-1]  # it started from the latest snapshot
    await projector.rebuild()
    assert await admin.fetchval("SELECT count(*) FROM projections.snapshots") == 0
