"""Deliveries as Bitrix24 sends them: verified, redacted, stored once, durably — or refused."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Callable
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest

from ledger import wire
from ledger.identity import SECRET_KEYS
from ledger.operations import change_trust
from ledger.settings import Settings, TrustPolicy
from ledger.trust import TrustChange
from ledger.web import STORE
from tests.conftest import (
    FIXTURES,
    MEMBER_ID,
    TOKEN,
    ClientFactory,
    Database,
    sample,
    sample_names,
)
from tests.helpers import Client, allow_sample_portal, install_sample_portal, post

Admin: TypeAlias = "asyncpg.Connection[Any]"
PHP = {
    c["name"]: c["php"]
    for c in json.loads((FIXTURES / "php" / "parse_str.json").read_text())["cases"]
}


def without_secrets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_secrets(v) for k, v in node.items() if k.lower() not in SECRET_KEYS}
    return node


def forge(name: str, *, ts: str | None = None, **auth: str | None) -> bytes:
    """A sample body with its top-level auth fields replaced (None removes one)."""
    document = wire.parse_php_form(sample(name), max_fields=10_000, max_nesting=32)
    if ts is not None:
        document["ts"] = ts
    for key, value in auth.items():
        if value is None:
            document["auth"].pop(key, None)
        else:
            document["auth"][key] = value
    return wire.http_build_query(document)


async def bitrix_events(admin: Admin) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT * FROM ledger.events WHERE origin = 'bitrix24' ORDER BY position"
    )


async def test_every_sample_is_stored_once_as_php_decodes_it_minus_secrets(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)
    others = [n for n in sample_names() if not n.startswith(("onappinstall", "onappuninstall"))]
    for name in [*others, "onappuninstall-1"]:
        status, answer = await post(client, sample(name))
        assert status == 200, (name, answer)
        assert answer["duplicate"] is False

    rows = await bitrix_events(admin)
    stored = {row["position"]: row for row in rows}
    assert len(rows) == len(sample_names())
    by_type = {row["event_type"]: row for row in rows}
    for name in sample_names():
        expected = without_secrets(PHP[f"sample {name}"])
        matches = [r for r in rows if orjson.loads(r["payload"]) == expected]
        assert len(matches) == 1, name
        # key order is kept too: the stored text is the PHP order
        assert json.dumps(orjson.loads(matches[0]["payload"])) == json.dumps(expected)
    assert by_type["ONIMBOTDELETE"]["bot_ids"] == [567]
    assert by_type["ONIMBOTV2DELETE"]["bot_ids"] == [456]
    assert len(stored) == len(rows)


async def test_posting_every_sample_twice_stores_each_once(client: Client, admin: Admin) -> None:
    await install_sample_portal(client)
    names = [n for n in sample_names() if not n.startswith(("onappinstall", "onappuninstall"))]
    first = {name: (await post(client, sample(name)))[1] for name in names}
    for name in names:
        status, answer = await post(client, sample(name))
        assert status == 200
        assert answer == {**first[name], "status": "duplicate", "duplicate": True}
    assert len(await bitrix_events(admin)) == len(names) + 1  # + the install
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == len(names)


async def test_redelivery_with_fresh_tokens_is_still_a_duplicate(client: Client) -> None:
    await install_sample_portal(client)
    document = wire.parse_php_form(sample("onimbotmessageadd-1"), max_fields=999, max_nesting=9)
    _, first = await post(client, wire.http_build_query(document))
    document["auth"]["access_token"] = "another-access-token"
    document["data"]["BOT"]["567"]["access_token"] = "another-bot-token"
    document["data"]["BOT"]["567"]["expires"] = "1999999999"
    document["event_handler_id"] = "999"
    _, second = await post(client, wire.http_build_query(document))
    assert second["duplicate"] is True
    assert second["position"] == first["position"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (forge("onimbotdelete-1", application_token="0" * 32), 401, "invalid_application_token"),
        (forge("onimbotdelete-1", member_id="another-portal"), 403, "unknown_portal"),
        (forge("onimbotdelete-1", application_token=None), 401, "missing_application_token"),
        (b"event=ONIMBOTDELETE&data%5BBOT_ID%5D=1&ts=1", 401, "missing_auth"),
    ],
    ids=["wrong token", "another portal", "token only inside data", "no auth"],
)
async def test_forged_deliveries_are_refused_and_logged_never_stored(
    client: Client, admin: Admin, body: bytes, status: int, code: str
) -> None:
    await install_sample_portal(client)
    events_before = await admin.fetchval("SELECT count(*) FROM ledger.events")
    got, answer = await post(client, body)
    assert (got, answer["error"]) == (status, code)
    assert await admin.fetchval("SELECT count(*) FROM ledger.events") == events_before
    rejection = await admin.fetchrow(
        "SELECT * FROM ledger.rejections ORDER BY position DESC LIMIT 1"
    )
    assert rejection is not None
    assert rejection["reason"] == code
    assert rejection["body_size"] == len(body)
    assert TOKEN not in rejection["excerpt"]


async def test_a_token_only_inside_data_does_not_verify(client: Client) -> None:
    # data.BOT[*].application_token carries the real token; the top-level one is wrong
    await install_sample_portal(client)
    status, answer = await post(
        client, forge("onimbotmessageadd-1", application_token="f" * 32)
    )
    assert (status, answer["error"]) == (401, "invalid_application_token")


async def test_install_of_a_portal_nobody_allowed_is_refused(client: Client) -> None:
    status, answer = await post(client, sample("onappinstall-1"))
    assert (status, answer["error"]) == (403, "portal_not_allowed")


async def test_trust_on_first_use_policy_trusts_the_first_install(
    make_client: ClientFactory, settings_factory: Callable[..., Settings]
) -> None:
    client = await make_client(settings_factory(trust_policy=TrustPolicy.TOFU))
    assert (await post(client, sample("onappinstall-1")))[0] == 200
    assert (await post(client, sample("onimbotdelete-1")))[0] == 200


async def test_an_install_cannot_replace_a_live_portals_token(client: Client) -> None:
    await install_sample_portal(client)
    status, answer = await post(
        client, forge("onappinstall-1", application_token="e" * 32)
    )
    assert (status, answer["error"]) == (403, "token_replacement_refused")
    assert (await post(client, sample("onimbotdelete-1")))[0] == 200


async def test_uninstall_ends_trust_and_a_reinstall_needs_a_new_allowance(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)
    assert (await post(client, sample("onappuninstall-1")))[0] == 200
    status, answer = await post(client, sample("onimbotdelete-1"))
    assert (status, answer["error"]) == (403, "portal_uninstalled")

    # the allowance was used by the first install: a replay, or anyone's install, is refused
    new_token = "d" * 32
    reinstall = forge("onappinstall-1", application_token=new_token, ts="1796526400")
    status, answer = await post(client, reinstall)
    assert (status, answer["error"]) == (403, "portal_not_allowed")
    replay = await post(client, forge("onappinstall-1", application_token=new_token))
    assert replay[0] == 403
    assert (await post(client, sample("onimbotdelete-1")))[0] == 403

    await allow_sample_portal(client)  # the operator allows the reinstall
    assert (await post(client, reinstall))[0] == 200
    assert (await post(client, forge("onimbotdelete-1", application_token=new_token)))[0] == 200
    rows = await admin.fetch(
        "SELECT position, payload FROM ledger.events "
        "WHERE event_type = 'LEDGER.TRUST_CHANGED' ORDER BY position"
    )
    payloads = [orjson.loads(r["payload"]) for r in rows]
    changes = [(p["change"], p["allowance_position"]) for p in payloads]
    first, second = (r["position"] for r, p in zip(rows, payloads, strict=True)
                     if p["change"] == "allowed")
    assert changes == [("allowed", None), ("established", first), ("ended", None),
                       ("allowed", None), ("established", second)]


async def _refusal_logged_without_redelivery(
    admin: Admin, answer: dict[str, Any], code: str, redeliveries: int
) -> None:
    assert answer["error"] == code
    reason = await admin.fetchval(
        "SELECT reason FROM ledger.rejections ORDER BY position DESC LIMIT 1")
    assert reason == code
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == redeliveries


async def test_after_an_uninstall_a_redelivery_with_the_original_token_is_a_duplicate(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)
    _, bot_event = await post(client, sample("onimbotmessageadd-1"))
    status, uninstall = await post(client, sample("onappuninstall-1"))
    assert (status, uninstall["duplicate"]) == (200, False)

    for name, original in (("onappuninstall-1", uninstall), ("onimbotmessageadd-1", bot_event)):
        status, answer = await post(client, sample(name))
        assert (status, answer["status"], answer["duplicate"]) == (200, "duplicate", True), answer
        assert answer["position"] == original["position"]
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 2

    # the same bodies under a token the originals were not accepted with prove nothing
    for name in ("onappuninstall-1", "onimbotmessageadd-1"):
        status, answer = await post(client, forge(name, application_token="f" * 32))
        assert status == 403
        await _refusal_logged_without_redelivery(admin, answer, "portal_uninstalled", 2)
    # and a new occurrence of a stored event type is refused as before
    status, answer = await post(client, sample("onimbotdelete-1"))
    assert (status, answer["error"]) == (403, "portal_uninstalled")


async def test_after_re_provisioning_a_redelivery_under_the_old_token_is_a_duplicate(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)
    _, bot_event = await post(client, sample("onimbotmessageadd-1"))
    assert client.app is not None
    new_token = "a" * 32
    await change_trust(client.app[STORE], TrustChange.PROVISIONED, member_id=MEMBER_ID,
                       token=new_token, actor="test")

    status, answer = await post(client, sample("onimbotmessageadd-1"))
    assert (status, answer["duplicate"], answer["position"]) == (200, True, bot_event["position"])
    status, answer = await post(client, sample("onappinstall-1"))  # stored under the old token
    assert (status, answer["duplicate"]) == (200, True), answer
    # the new token also names the occurrence (trusted now); a third token does not
    assert (await post(client, forge("onimbotmessageadd-1", application_token=new_token)))[
        1]["duplicate"] is True
    assert await admin.fetchval("SELECT count(*) FROM ledger.redeliveries") == 3
    status, answer = await post(client, forge("onimbotmessageadd-1",
                                              application_token="f" * 32))
    assert status == 401
    await _refusal_logged_without_redelivery(admin, answer, "invalid_application_token", 3)
    # a new occurrence under the old token is refused: it is no longer trusted
    status, answer = await post(client, sample("onimbotdelete-1"))
    assert (status, answer["error"]) == (401, "invalid_application_token")


async def test_a_reinstall_by_another_user_in_the_same_second_is_a_new_occurrence(
    make_client: ClientFactory, settings_factory: Callable[..., Settings]
) -> None:
    client = await make_client(settings_factory(trust_policy=TrustPolicy.TOFU))
    assert (await post(client, sample("onappinstall-1")))[1]["duplicate"] is False
    assert (await post(client, sample("onappuninstall-1")))[1]["duplicate"] is False
    new_token = "e" * 32
    status, answer = await post(
        client, forge("onappinstall-1", application_token=new_token, user_id="28")
    )
    assert (status, answer["duplicate"]) == (200, False), answer
    assert (await post(client, forge("onimbotdelete-1", application_token=new_token)))[0] == 200


async def test_update_with_the_current_token_is_stored_and_a_new_token_is_refused(
    client: Client,
) -> None:
    await install_sample_portal(client)
    assert (await post(client, sample("onappupdate-1")))[0] == 200
    status, answer = await post(client, forge("onappupdate-1", application_token="c" * 32))
    assert (status, answer["error"]) == (401, "invalid_application_token")


async def test_json_bodies_and_query_strings_are_recorded(client: Client, admin: Admin) -> None:
    await install_sample_portal(client)
    document = json.loads((FIXTURES / "bitrix24" / "onimbotv2joinchat-webhook.json").read_text())
    status, answer = await post(
        client, json.dumps(document).encode(), content_type="application/json",
        query="CLIENT_ID=abc123",
    )
    assert status == 200, answer
    row = await admin.fetchrow(
        "SELECT metadata, payload FROM ledger.events WHERE position = $1", answer["position"]
    )
    assert row is not None
    assert orjson.loads(row["metadata"])["query"] == {"CLIENT_ID": "abc123"}
    assert TOKEN not in row["payload"]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("text/plain", b"event=X", 415, "unsupported_media_type"),
        ("application/json", b"{oops", 400, "malformed_json"),
        ("application/x-www-form-urlencoded", b"m=%FF", 400, "invalid_utf8"),
        ("application/x-www-form-urlencoded", b"data[x]=1", 400, "missing_event"),
    ],
)
async def test_bad_bodies_get_a_json_4xx_and_a_rejection_record(
    client: Client, admin: Admin, content_type: str, body: bytes, status: int, code: str
) -> None:
    got, answer = await post(client, body, content_type=content_type)
    assert (got, answer["error"]) == (status, code)
    assert answer["message"]
    assert await admin.fetchval("SELECT reason FROM ledger.rejections") == code


async def test_an_oversized_body_is_refused_with_413(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin
) -> None:
    client = await make_client(settings_factory(max_body_bytes=2048))
    status, answer = await post(client, b"event=X&pad=" + b"a" * 4096)
    assert (status, answer["error"]) == (413, "body_too_large")
    assert await admin.fetchval("SELECT reason FROM ledger.rejections") == "body_too_large"


async def test_concurrent_deliveries_get_gap_free_positions_each_stored_once(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)
    document = wire.parse_php_form(sample("onimbotmessageadd-1"), max_fields=999, max_nesting=9)
    bodies = []
    for i in range(200):
        document["data"]["PARAMS"]["MESSAGE_ID"] = str(100000 + i)
        bodies.append(wire.http_build_query(document))
    answers = await asyncio.gather(*(post(client, b) for b in bodies + bodies[:50]))
    assert all(status == 200 for status, _ in answers)
    positions = await admin.fetch("SELECT position FROM ledger.events ORDER BY position")
    assert [r["position"] for r in positions] == list(range(1, len(positions) + 1))
    assert len(await bitrix_events(admin)) == 201  # the install and 200 messages
    assert sum(1 for _, a in answers if a["duplicate"]) == 50


async def test_a_database_dump_holds_no_token_of_the_samples(
    client: Client, database: Database
) -> None:
    await install_sample_portal(client)
    for name in sample_names():
        await post(client, sample(name))
        await post(client, forge(name, application_token="0" * 32))  # rejected ones too
    secrets: set[str] = set()
    for name in sample_names():
        document = wire.parse_php_form(sample(name), max_fields=999, max_nesting=9)
        secrets |= _secret_values(document)
    process = await asyncio.create_subprocess_exec(
        _pg_dump(), "--no-owner", database.admin_dsn, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    assert process.returncode == 0
    dump = output.decode()
    assert "ONIMBOTMESSAGEADD" in dump
    assert [s for s in secrets if s in dump] == []


def _secret_values(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key.lower() in SECRET_KEYS and isinstance(value, str):
                found.add(value)
            found |= _secret_values(value)
    return found


def _pg_dump() -> str:
    try:
        from pgserver import _commands
    except ImportError:
        found = shutil.which("pg_dump")
        assert found, "pg_dump is needed: install pgserver or PostgreSQL client tools"
        return found
    return str(_commands.POSTGRES_BIN_PATH / "pg_dump")


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {
        "database": "ok", "tasks": "ok", "projector": "ok", "spool": "ok"
    }


async def test_member_id_of_the_sample_portal_is_what_gets_trusted(
    client: Client, admin: Admin
) -> None:
    await allow_sample_portal(client)
    await post(client, sample("onappinstall-1"))
    assert await admin.fetchval("SELECT state FROM ledger.portal_trust WHERE member_id = $1",
                                MEMBER_ID) == "trusted"


async def test_event_types_not_modelled_yet_are_stored_not_dropped(
    client: Client, admin: Admin
) -> None:
    await install_sample_portal(client)
    document = wire.parse_php_form(sample("onimbotdelete-1"), max_fields=99, max_nesting=9)
    document["event"] = "ONIMBOTV3SOMETHINGNEW"
    status, answer = await post(client, wire.http_build_query(document))
    assert (status, answer["status"]) == (200, "stored")
    assert await admin.fetchval(
        "SELECT event_type FROM ledger.events WHERE position = $1", answer["position"]
    ) == "ONIMBOTV3SOMETHINGNEW"


async def test_deliveries_are_summed_up_at_info_and_each_logged_at_debug_refusals_always(
    make_client: Any, settings_factory: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A line per delivery costs ~10 µs at INFO: stored ones go to DEBUG, and INFO gets one
    line per interval counting them by outcome; every refusal is still logged with its reason."""
    caplog.set_level(logging.INFO)
    client = await make_client(settings_factory(log_summary_seconds=0.2))
    await install_sample_portal(client)
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200  # a redelivery
    assert (await post(client, b"event=ONIMBOTDELETE", content_type="text/plain"))[0] == 415
    async with asyncio.timeout(10):
        while True:
            summaries = [r.getMessage() for r in caplog.records
                         if r.getMessage().startswith("deliveries: ")]
            if summaries:
                break
            await asyncio.sleep(0.05)
    assert summaries[0].startswith(
        "deliveries: stored=2 duplicate=1 rejected=1 (unsupported_media_type=1) in the last"
    ), summaries
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING
                and "rejected delivery" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert "unsupported_media_type: " in refusals[0].getMessage()
    assert not [r for r in caplog.records if r.name == "ledger.intake"
                and r.levelno == logging.INFO and " position=" in r.getMessage()]
