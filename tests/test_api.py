"""The read API, via a real running server: tokens, every resource, pagination, OpenAPI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from ledger import checkpoints, wire
from ledger.api import ROUTES, TOKEN_CACHE, openapi_document
from ledger.audit import new_token
from ledger.cli.common import event_filter
from ledger.proving import make_checkpoint
from ledger.simulation import Traffic
from ledger.storage.audit_store import AuditStore
from ledger.storage.tree_store import TreeStore
from ledger.web import STORE
from tests.conftest import MEMBER_ID, sample
from tests.helpers import PROJECTOR, Client, install_sample_portal, post
from tests.test_projections import ingest


async def bearer(client: Client, name: str = "auditor") -> dict[str, str]:
    assert client.app is not None
    token, digest = new_token()
    await AuditStore(client.app[STORE].pool).create_token(name, digest, "test")
    return {"Authorization": f"Bearer {token}"}


async def get(client: Client, path: str, headers: dict[str, str], **params: Any) -> Any:
    response = await client.get(f"/api/v1{path}", headers=headers, params=params)
    assert response.status == 200, await response.text()
    return await response.json()


@pytest.fixture
async def history(client: Client) -> Client:
    """The samples (bot 567 deleted by user 27) plus a generated history, projected."""
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimcommandadd-1",
                 "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
    await ingest(client, Traffic(seed=3, portals=3), 400)
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    return client


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
async def test_without_a_valid_token_the_api_answers_401(
    client: Client, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    for path in ROUTES:
        concrete = path.replace("{member_id}", MEMBER_ID).replace("{bot_id}", "567")
        response = await client.get(f"/api/v1{concrete}", headers=headers)
        assert response.status == 401
        assert (await response.json())["error"] == "unauthorized"


async def test_a_revoked_token_stops_working(client: Client) -> None:
    headers = await bearer(client)
    assert client.app is not None
    await AuditStore(client.app[STORE].pool).revoke_token("auditor", "test")
    assert (await client.get("/api/v1/portals", headers=headers)).status == 401


async def test_a_revoked_token_in_use_works_until_its_cache_window_ends(client: Client) -> None:
    """The token cache spares the database a lookup per request; the price is that revoking
    a token in use takes effect when its window (TOKEN_CACHE_SECONDS) ends, not at once."""
    headers = await bearer(client)
    assert client.app is not None
    assert (await client.get("/api/v1/portals", headers=headers)).status == 200
    await AuditStore(client.app[STORE].pool).revoke_token("auditor", "test")
    assert (await client.get("/api/v1/portals", headers=headers)).status == 200  # cached
    api = next(a for a in client.app._subapps if TOKEN_CACHE in a)
    cache = api[TOKEN_CACHE]
    assert len(cache) == 1
    for digest in cache:  # the window has passed
        cache[digest] = 0.0
    assert (await client.get("/api/v1/portals", headers=headers)).status == 401
    assert cache == {}  # a revoked token is not kept


async def test_every_resource_answers_as_its_openapi_schema_says(
    history: Client, tmp_path: Path
) -> None:
    headers = await bearer(history)
    assert history.app is not None
    private, _ = checkpoints.generate_keys(tmp_path, "test-ledger")  # for the proof resource
    await make_checkpoint(TreeStore(history.app[STORE].pool),
                          checkpoints.load_private_key(private), "test-ledger")
    document = openapi_document()
    assert set(document["paths"]) == set(ROUTES)
    for path, (route, _) in ROUTES.items():
        concrete = (path.replace("{member_id}", MEMBER_ID).replace("{bot_id}", "567")
                    .replace("{position}", "5"))
        body = await get(history, concrete, headers)
        TypeAdapter(route.response).validate_python(body)  # raises on any mismatch
        schema = document["paths"][path]["get"]["responses"]["200"]["content"]
        assert schema["application/json"]["schema"]
    spec = await (await history.get("/api/v1/openapi.json")).json()
    assert spec["openapi"].startswith("3.")


async def test_registry_and_timeline_answer_the_forensic_questions(history: Client) -> None:
    headers = await bearer(history)
    bots = await get(history, "/bots", headers, portal=MEMBER_ID, status="deleted")
    assert [(b["bot_id"], b["deleted_by_user_id"]) for b in bots] == [(567, "27")]
    deletions = await get(history, "/deletions", headers, portal=MEMBER_ID, actor="27")
    assert [d["bot_id"] for d in deletions] == [567]
    assert len(deletions[0]["event_hash"]) == 64
    anomalies = await get(history, "/deletions", headers, anomalies="true")
    assert anomalies
    assert all(d["anomalies"] for d in anomalies)
    one = await get(history, f"/portals/{MEMBER_ID}/bots/567", headers)
    assert one["bot"]["status"] == "deleted"
    assert [e["event_type"] for e in one["events"]][-1] == "ONIMBOTDELETE"
    assert all(567 in e["bot_ids"] for e in one["events"])
    missing = await history.get(f"/api/v1/portals/{MEMBER_ID}/bots/1", headers=headers)
    assert missing.status == 404
    portals = await get(history, "/portals", headers)
    assert MEMBER_ID in {p["portal_member_id"] for p in portals}


async def test_event_pages_are_stable_under_concurrent_appends(history: Client) -> None:
    headers = await bearer(history)
    first = await get(history, "/events", headers, limit=50)
    assert len(first["items"]) == 50
    document = wire.parse_php_form(sample("onimbotmessageadd-1"), max_fields=999, max_nesting=9)
    appends = []
    for i in range(30):  # new events arrive while the reader pages
        document["data"]["PARAMS"]["MESSAGE_ID"] = str(500000 + i)
        appends.append(post(history, wire.http_build_query(document)))
    seen = [e["position"] for e in first["items"]]
    after = first["next_after"]
    pages = [get(history, "/events", headers, after=after, limit=1000)]
    results = await asyncio.gather(*appends, *pages)
    rest = results[-1]
    seen += [e["position"] for e in rest["items"]]
    assert seen == list(range(1, len(seen) + 1))  # no gap, no repeat, in order


async def test_filters_and_page_limits(history: Client) -> None:
    headers = await bearer(history)
    deletes = await get(history, "/events", headers, type="onimbotdelete", limit=1000)
    assert deletes["items"]
    assert {e["event_type"] for e in deletes["items"]} == {"ONIMBOTDELETE"}
    for unlike in ("on\u0131mbotdelete", "ON\u0131MBOTDELETE"):  # str.upper: dotless i -> I
        assert (await get(history, "/events", headers, type=unlike))["items"] == [], unlike
        assert event_filter(None, unlike, None, None, None).event_type != "ONIMBOTDELETE"
    with_payload = await get(history, "/events", headers, portal=MEMBER_ID, payload="true")
    # the portal's first event is the operator's allowance; its install comes next
    assert with_payload["items"][0]["payload"]["change"] == "allowed"
    assert with_payload["items"][1]["payload"]["event"] == "ONAPPINSTALL"
    too_many = await history.get("/api/v1/events", headers=headers, params={"limit": "5000"})
    assert too_many.status == 400
    assert (await too_many.json())["error"] == "bad_query"
    bad_time = await history.get("/api/v1/deletions", headers=headers, params={"from": "x"})
    assert bad_time.status == 400
