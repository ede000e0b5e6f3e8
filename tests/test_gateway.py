"""Gateway mode, checked from outside with a destination of our own: every stored delivery
reaches it byte-identical, after it is stored, in ledger order; outages of the destination are
waited out; every attempt and every giving-up is on record."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias
from unittest import mock

import asyncpg
import orjson
import pytest
from yarl import URL

from ledger.audit import new_token
from ledger.errors import DatabaseUnavailable, LedgerError, NoSuchRoute, RouteRefused
from ledger.gateway import admin as routes_admin
from ledger.gateway.forwarder import Forwarder
from ledger.gateway.handoff import HANDOFF, LOOP_WRITE_MAX_BYTES
from ledger.gateway.outbox import OutboxReader, OutboxWriter
from ledger.gateway.routes import check_destination
from ledger.settings import Settings
from ledger.storage.audit_store import AuditStore
from ledger.storage.gateway_store import AttemptRecord
from ledger.web import INTAKE, SETTINGS, STORE
from tests.conftest import FIXTURES, FORM, MEMBER_ID, ClientFactory, Database, sample
from tests.gateway_helpers import Destination, Forwarders, eventually
from tests.helpers import (
    Client,
    allow_sample_portal,
    distinct_messages,
    install_sample_portal,
    post,
)

Admin: TypeAlias = "asyncpg.Connection[Any]"
QUERY = "CLIENT_ID=wh%2Ftest+1&x%5B%5D=%C3%A9"  # raw, as a webhook-registered bot gets it


@pytest.fixture
async def destination(database: Database) -> AsyncIterator[Destination]:
    checker = await asyncpg.connect(database.admin_dsn)
    lock = asyncio.Lock()

    async def stored(position: int) -> bool:
        async with lock:
            return bool(await checker.fetchval(
                "SELECT count(*) FROM ledger.events WHERE position = $1", position))

    dest = Destination(stored)
    await dest.start()
    yield dest
    await dest.stop()
    await checker.close()


@pytest.fixture
async def forwarders(make_client: ClientFactory) -> AsyncIterator[Forwarders]:
    """Closed before the clients whose pools they use."""
    running = Forwarders()
    yield running
    await running.close()


@pytest.fixture
def gateway_settings(settings_factory: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "forward_plain_http_hosts": "127.0.0.1",
            "forward_retry_initial_seconds": 0.02,
            "forward_retry_max_seconds": 0.1,
            "forward_poll_seconds": 0.01,
            "forward_status_seconds": 0.05,
        }
        return settings_factory(**(values | overrides))

    return make


async def routed_client(
    make_client: ClientFactory, forwarders: Forwarders, settings: Settings, url: str,
    **route: Any,
) -> tuple[Client, Forwarder, str]:
    """A served app with one route, and the forwarder (process's work) beside it."""
    client = await make_client(settings)
    assert client.app is not None
    route_id, _ = await routes_admin.add_route(
        client.app[STORE], settings, member_id=route.pop("member_id", None), url=url,
        actor="test", **route,
    )
    await client.app[HANDOFF].reload()
    forwarder = await forwarders.start(client)
    return client, forwarder, route_id


def outbox_record(route_id: str, position: int) -> tuple[dict[str, Any], bytes]:
    """What a worker's handoff appends for a message at `position` (body `n=<position>`)."""
    return ({"routes": [route_id], "member_id": MEMBER_ID,
             "event_type": "ONIMBOTMESSAGEADD", "position": position,
             "event_hash": f"{position:064x}", "dedup_key": f"{position:032x}",
             "content_type": FORM, "raw_query": "", "accepted_at": time.time()},
            f"n={position}".encode())


async def readiness(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    return response.status, await response.json()


async def post_raw(
    client: Client, body: bytes, content_type: str, query: str
) -> tuple[int, dict[str, Any]]:
    """POST with the query string exactly as given (no re-quoting on our side either)."""
    url = str(client.make_url("/bitrix24/events")) + (f"?{query}" if query else "")
    async with client.session.post(
        URL(url, encoded=True), data=body, headers={"Content-Type": content_type}
    ) as response:
        return response.status, await response.json()


def messages(count: int, start: int = 0) -> list[bytes]:
    return distinct_messages(count, first=900000 + start)


def sample_deliveries(kind: str) -> list[tuple[str, bytes, str, str]]:
    """(name, body, content type, raw query) of every sample: install first, uninstall last."""
    names = sorted(p.stem for p in (FIXTURES / "bitrix24").glob(f"*.{kind}"))
    ordered = (
        [n for n in names if n.startswith("onappinstall")]
        + [n for n in names if not n.startswith(("onappinstall", "onappuninstall"))]
        + [n for n in names if n.startswith("onappuninstall")]
    )
    content_type = FORM if kind == "form" else "application/json"
    return [
        (n, (FIXTURES / "bitrix24" / f"{n}.{kind}").read_bytes(), content_type,
         QUERY if "webhook" in n else "")
        for n in ordered
    ]


@pytest.mark.parametrize("kind", ["form", "json"])
async def test_every_sample_reaches_the_destination_byte_identical_after_it_is_stored_in_order(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination, admin: Admin, kind: str,
) -> None:
    client, _, route_id = await routed_client(
        make_client, forwarders, gateway_settings(), destination.url)
    await allow_sample_portal(client)
    sent: dict[int, tuple[bytes, str, str]] = {}
    for name, body, content_type, query in sample_deliveries(kind):
        status, answer = await post_raw(client, body, content_type, query)
        assert status == 200, (name, answer)
        sent[answer["position"]] = (body, content_type, query)

    await destination.wait_until(lambda d: len(d.requests) >= len(sent))
    assert len(destination.requests) == len(sent)
    positions = [r.position for r in destination.requests]
    assert positions == sorted(sent)  # ledger order
    hashes = {r["position"]: bytes(r["hash"]).hex() for r in await admin.fetch(
        "SELECT position, hash FROM ledger.events")}
    for received in destination.requests:
        assert received.position is not None
        assert (received.body, received.content_type, received.raw_query) == sent[
            received.position]
        assert received.stored_when_received is True
        assert received.headers["X-Ledger-Event-Hash"] == hashes[received.position]
        assert received.headers["X-Ledger-Route"] == route_id


async def test_a_destination_down_for_a_while_then_up_gets_everything_in_order(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination, admin: Admin,
) -> None:
    # only the newest ~3 bodies are held in memory: the rest are read back from the outbox
    client, forwarder, route_id = await routed_client(
        make_client, forwarders, gateway_settings(forward_memory_bytes=3 * len(messages(1)[0])),
        destination.url)
    await install_sample_portal(client)
    await destination.wait_until(lambda d: len(d.delivered) == 1)
    destination.status = 503
    bodies = messages(20)
    answers = await asyncio.gather(*(post(client, b) for b in bodies))
    assert all(status == 200 for status, _ in answers)
    sent = {a["position"]: body for (_, a), body in zip(answers, bodies, strict=True)}
    await destination.wait_until(lambda d: len(d.requests) >= 6)  # retried, refused

    async def reported() -> bool:  # as the forwarder publishes it for the intake
        status, ready = await readiness(client)
        assert status == 200  # intake must not stop for a destination
        (route,) = ready["forwarding"]
        return (route["route_id"], route["state"], route["backlog"]) == (
            route_id, "failing", 20)

    await eventually(reported)
    metrics = await (await client.get("/metrics")).text()
    assert f'ledger_forward_backlog{{route="{route_id}"}} 20.0' in metrics
    assert f'ledger_forward_attempts_total{{outcome="failed",route="{route_id}"}}' in metrics
    assert "ledger_forwarder_up 1" in metrics

    destination.status = 200
    await destination.wait_until(lambda d: len(d.delivered) == 21)
    delivered = [r.position or 0 for r in destination.delivered]
    assert delivered == sorted(delivered)
    assert set(delivered[1:]) == set(sent)
    assert all(r.body == sent[r.position or 0] for r in destination.delivered[1:])
    await eventually(lambda: forwarder.backlog()[route_id] == (0, 0.0))  # settled
    await forwarder.records_flushed()
    rows = await admin.fetch(
        "SELECT position, attempt, outcome, status FROM audit.forwards ORDER BY id")
    assert {r["position"] for r in rows if r["outcome"] == "delivered"} == set(delivered)
    assert any(r["outcome"] == "failed" and r["status"] == 503 for r in rows)
    assert all(r["position"] is not None for r in rows)
    # all settled: deleted (the newest segment once its writer left it idle a moment)
    await eventually(lambda: not list((Path(".ledger") / "outbox" / "worker-0").glob("seg-*")))


async def test_a_forward_past_its_age_is_given_up_and_auditors_see_it_with_its_position(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination, admin: Admin,
) -> None:
    client, forwarder, _ = await routed_client(
        make_client, forwarders, gateway_settings(forward_max_age_seconds=2), destination.url)
    destination.status = 500
    await install_sample_portal(client)
    status, answer = await post(client, messages(1)[0])
    assert status == 200
    await eventually(given_up_count(forwarder, admin, 2))
    await admin.execute("SET ROLE ledger_reader")  # what an auditor's login sees
    given_up = await admin.fetch(
        "SELECT position, event_type, outcome, error, attempt FROM audit.forwards "
        "WHERE outcome = 'given_up' ORDER BY position")
    assert [(r["position"], r["error"]) for r in given_up] == [
        (answer["position"] - 2, "expired"), (answer["position"], "expired")]  # + the install
    # the install was tried until it expired; the message behind it (same lane) may expire
    # before its own turn comes: given up with no attempt, which is recorded all the same
    assert given_up[0]["attempt"] >= 1
    failed = await admin.fetchval(
        "SELECT count(*) FROM audit.forwards WHERE outcome = 'failed' AND status = 500")
    assert failed >= 2
    await eventually(lambda: not list((Path(".ledger") / "outbox" / "worker-0").glob("seg-*")))


async def test_a_stuck_destination_delays_neither_intake_nor_other_routes(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination,
) -> None:
    stuck = Destination()
    stuck.gate = asyncio.Event()  # answers nothing until released
    await stuck.start()
    try:
        settings = gateway_settings()
        client, _, _ = await routed_client(make_client, forwarders, settings, stuck.url)
        assert client.app is not None
        await routes_admin.add_route(client.app[STORE], settings, member_id=MEMBER_ID,
                                     url=destination.url, event_pattern="ONIMBOT*")
        await client.app[HANDOFF].reload()
        await install_sample_portal(client)
        async with asyncio.timeout(10):
            answers = await asyncio.gather(*(post(client, b) for b in messages(10)))
        assert all(status == 200 for status, _ in answers)
        await destination.wait_until(lambda d: len(d.delivered) == 10)  # not the install
        assert [r.position for r in destination.delivered] == [a["position"] for _, a in answers]
        stuck.gate.set()
        await stuck.wait_until(lambda d: len(d.delivered) == 11)
    finally:
        stuck.gate.set()
        await stuck.stop()


async def test_routes_changed_by_an_operator_are_noticed_while_serving_and_recorded(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination, admin: Admin,
) -> None:
    settings = gateway_settings(routes_reload_seconds=0.05)
    client = await make_client(settings)
    assert client.app is not None
    await install_sample_portal(client)
    route_id, _ = await routes_admin.add_route(
        client.app[STORE], settings, member_id=MEMBER_ID, url=destination.url,
        event_pattern="onimbotmessage*", actor="alice")
    handoff = client.app[HANDOFF]
    forwarder = await forwarders.start(client)
    await eventually(lambda: [r.route_id for r in handoff.routes] == [route_id])
    for body in messages(2):
        await post(client, body)
    await post(client, sample("onimbotjoinchat-1"))  # does not match the pattern
    await destination.wait_until(lambda d: len(d.delivered) == 2)

    await routes_admin.remove_route(client.app[STORE], route_id, actor="bob")
    await eventually(lambda: handoff.routes == [] and forwarder.routes == [])
    await post(client, messages(1, start=5)[0])
    with pytest.raises(NoSuchRoute):
        await routes_admin.remove_route(client.app[STORE], route_id)
    rows = [(r["origin"], orjson.loads(r["payload"])) for r in await admin.fetch(
        "SELECT origin, payload FROM ledger.events "
        "WHERE event_type = 'LEDGER.ROUTE_CHANGED' ORDER BY position")]
    assert [(origin, p["action"], p["actor"]) for origin, p in rows] == [
        ("operator", "added", "alice"), ("operator", "removed", "bob")]
    assert rows[0][1]["url"] == destination.url
    assert len(destination.requests) == 2


async def test_the_read_api_lists_routes_with_their_health(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination,
) -> None:
    client, _, route_id = await routed_client(
        make_client, forwarders, gateway_settings(), destination.url)
    assert client.app is not None
    token, digest = new_token()
    await AuditStore(client.app[STORE].pool).create_token("reader", digest, "test")

    async def listed() -> tuple[str, str, str, int]:
        response = await client.get("/api/v1/routes",
                                    headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200
        (route,) = await response.json()
        return route["route_id"], route["url"], route["state"], route["backlog"]

    await eventually(async_equals(listed, (route_id, destination.url, "ok", 0)))
    await forwarders.close()  # the forwarder process is gone: the intake says so, stays ready
    await eventually(async_equals(listed, (route_id, destination.url, "forwarder_down", 0)),
                     within=10)
    status, ready = await readiness(client)
    assert (status, ready["forwarder"]["state"]) == (200, "down")
    assert ready["forwarding"][0]["state"] == "forwarder_down"
    metrics = await (await client.get("/metrics")).text()
    assert "ledger_forwarder_up 0" in metrics


def given_up_count(forwarder: Forwarder, admin: Admin, count: int) -> Callable[[], Awaitable[bool]]:
    """Whether `count` forwards were given up, as auditors see it."""

    async def check() -> bool:
        await forwarder.records_flushed()
        found = await admin.fetchval(
            "SELECT count(*) FROM audit.forwards WHERE outcome = 'given_up'")
        return bool(found >= count)

    return check


def async_equals(
    value: Callable[[], Awaitable[Any]], expected: Any
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await value() == expected)

    return check


async def test_redirects_are_not_followed(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination, admin: Admin,
) -> None:
    client, forwarder, _ = await routed_client(
        make_client, forwarders, gateway_settings(forward_max_age_seconds=0.3), destination.url)
    destination.status = 307
    await install_sample_portal(client)
    await eventually(given_up_count(forwarder, admin, 1))
    statuses = {r["status"] for r in await admin.fetch(
        "SELECT status FROM audit.forwards WHERE outcome = 'failed'")}
    assert statuses == {307}
    assert {r.answered for r in destination.requests} == {307}


@pytest.mark.parametrize(
    ("url", "allow_http", "why"),
    [
        ("http://bot.example/h", False, "plain http"),
        ("ftp://bot.example/h", True, "https:// URL"),
        ("https://bot.example/h?x=1", False, "no query string"),
        ("http://127.0.0.1:8080/bitrix24/events", True, "own listen address"),
        ("http://localhost:8080/x", True, "own listen address"),
        # every other spelling of a loopback or unspecified address (found by a break test)
        ("http://0.0.0.0:8080/bitrix24/events", True, "own listen address"),
        ("http://[::ffff:127.0.0.1]:8080/x", True, "own listen address"),
        ("http://[::1]:8080/x", True, "own listen address"),
        ("http://127.0.0.2:8080/x", True, "own listen address"),
        ("http://127.0.0.1.:8080/x", True, "own listen address"),
        ("http://localhost.:8080/x", True, "own listen address"),
        ("http://0x7f000001:8080/x", True, "four decimal numbers"),
        ("http://127.1:8080/x", True, "four decimal numbers"),
        ("http://2130706433:8080/x", True, "four decimal numbers"),
        ("https://user:pw@bot.example/h", False, "credentials"),
    ],
)
def test_destinations_are_https_unless_allowed_and_never_the_ledger_itself(
    url: str, allow_http: bool, why: str
) -> None:
    with pytest.raises(RouteRefused, match=why):
        check_destination(url, allow_http=allow_http, http_hosts=frozenset(),
                          listen_host="127.0.0.1", listen_port=8080)


def test_allowed_destinations() -> None:
    for url, allow_http, hosts in [
        ("https://bot.example/handler", False, frozenset[str]()),
        ("http://10.0.0.5:9000/h", False, frozenset({"10.0.0.5"})),
        ("http://127.0.0.1:8081/h", True, frozenset[str]()),
    ]:
        assert check_destination(url, allow_http=allow_http, http_hosts=hosts,
                                 listen_host="127.0.0.1", listen_port=8080) == url


async def test_a_duplicate_is_not_forwarded_again(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings],
    destination: Destination,
) -> None:
    client, _, _ = await routed_client(make_client, forwarders, gateway_settings(), destination.url)
    await install_sample_portal(client)
    body = messages(1)[0]
    _, first = await post(client, body)
    status, again = await post(client, body)
    assert (status, again["duplicate"], again["position"]) == (200, True, first["position"])
    later = json.loads((FIXTURES / "bitrix24" / "onimbotjoinchat-1.json").read_text())
    _, last = await post(client, json.dumps(later).encode(), content_type="application/json")
    await destination.wait_until(lambda d: len(d.delivered) == 3)  # the install, 2 events
    assert [r.position for r in destination.delivered][1:] == [
        first["position"], last["position"]]



async def test_a_delivery_no_route_matches_is_stored_and_never_handed_to_the_outbox(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """The intake asks the handoff first (`Handoff.forwards`): a delivery no route takes is
    not sealed; one a route takes is sealed and forwarded."""
    client, _, _ = await routed_client(make_client, forwarders, gateway_settings(),
                                       destination.url, event_pattern="ONIMBOTDELETE")
    assert client.app is not None
    handoff = client.app[HANDOFF]
    await install_sample_portal(client)
    with mock.patch.object(handoff, "_write", wraps=handoff._write) as sealed:
        _, message = await post(client, messages(1)[0])
        _, deleted = await post_raw(client, sample("onimbotdelete-1"), FORM, "")
    assert (message["status"], deleted["status"]) == ("stored", "stored")
    # sealed ahead of its commit (no position yet), forwarded once found stored
    assert [(c.args[0]["stage"], c.args[0]["event_type"])
            for c in sealed.call_args_list] == [("ahead", "ONIMBOTDELETE")]
    await destination.wait_until(lambda d: len(d.delivered) == 1)
    assert [r.position for r in destination.delivered] == [deleted["position"]]


async def test_a_commit_of_large_bodies_is_sealed_and_written_off_the_event_loop(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """The sender sizes the bodies (up to LEDGER_MAX_BODY_BYTES, 256 to a commit): sealed and
    written by the event loop, 64 bodies of 1 MiB held every delivery up for 350 ms. A commit
    of usual bodies is still written by the loop; both are forwarded."""
    client, _, _ = await routed_client(make_client, forwarders, gateway_settings(),
                                       destination.url)
    assert client.app is not None
    await install_sample_portal(client)
    outbox: OutboxWriter = client.app[HANDOFF]._outbox
    loop_thread = threading.get_ident()
    sealed: list[tuple[bool, int]] = []
    seal = outbox.seal

    def spied(records: list[tuple[dict[str, Any], bytes]]) -> bytes:
        sealed.append((threading.get_ident() == loop_thread, sum(len(b) for _, b in records)))
        data: bytes = seal(records)
        return data

    small = messages(1, start=40)[0]
    large = small.replace(b"Hello", b"Hello" + b"y" * (LOOP_WRITE_MAX_BYTES + 1))
    with mock.patch.object(outbox, "seal", spied):
        assert (await post(client, small))[0] == 200
        assert (await post(client, large))[0] == 200
    assert [on_loop for on_loop, _ in sealed] == [True, False], sealed
    assert sealed[1][1] > LOOP_WRITE_MAX_BYTES
    await destination.wait_until(lambda d: len(d.delivered) == 3)  # the install too


def test_routes_from_the_command_line(database: Database) -> None:
    from tests.test_cli import run

    refused = run(database, "routes", "add", "--all", "--url", "http://bot.example/h")
    assert refused.exit_code == 1
    assert "plain http" in refused.output
    added = run(database, "routes", "add", "--member-id", MEMBER_ID, "--event", "ONIMBOT*",
                "--url", "https://bot.example/h")
    assert added.exit_code == 0, added.output
    route_id = added.output.split()[2]
    listed = [orjson.loads(line) for line in
              run(database, "routes", "list", "--json").output.splitlines()]
    assert [(r["route_id"], r["member_id"], r["event"], r["url"]) for r in listed] == [
        (route_id, MEMBER_ID, "ONIMBOT*", "https://bot.example/h")]
    assert "via cli" in listed[0]["added_by"]
    assert run(database, "routes", "attempts").exit_code == 0
    assert run(database, "routes", "remove", route_id).exit_code == 0
    assert run(database, "routes", "list", "--json").output == ""
    missing = run(database, "routes", "remove", route_id)
    assert (missing.exit_code, "no route" in missing.output) == (1, True)
    assert run(database, "verify").exit_code == 0  # route events are in the chain like others


async def test_an_unreachable_destination_is_recorded_without_the_query_string(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], admin: Admin,
) -> None:
    from tests.servers import free_port

    closed = f"http://127.0.0.1:{free_port()}/bot"  # nobody listens there
    client, forwarder, _ = await routed_client(
        make_client, forwarders, gateway_settings(forward_max_age_seconds=0.3), closed)
    await allow_sample_portal(client)
    status, _ = await post_raw(client, sample("onappinstall-1"), FORM, QUERY)
    assert status == 200
    await eventually(given_up_count(forwarder, admin, 1))
    errors = [r["error"] for r in await admin.fetch(
        "SELECT error FROM audit.forwards WHERE outcome = 'failed'")]
    assert errors
    assert all("Connect" in e and "CLIENT_ID" not in e for e in errors)


async def test_the_console_shows_each_routes_health_as_the_forwarder_reports_it(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    from tests.test_console import make_token, page, sign_in

    client, _, route_id = await routed_client(
        make_client, forwarders, gateway_settings(), destination.url)
    destination.status = 503
    await install_sample_portal(client)
    assert (await sign_in(client, await make_token(client))).status == 303

    async def shown(state: str) -> bool:
        overview = await page(client, "/console/")
        row = overview.split(f"<code>{route_id}</code>", 1)
        return len(row) == 2 and f'class="state state-{state}"' in row[1].split("</tr>")[0]

    await eventually(lambda: shown("failing"))
    assert "HTTP 503" in await page(client, "/console/")
    destination.status = 200
    await eventually(lambda: shown("ok"))
    await forwarders.close()
    await eventually(lambda: shown("forwarder_down"), within=10)


async def test_a_forward_the_outbox_cannot_take_is_answered_counted_and_recorded_as_given_up(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    client, _, route_id = await routed_client(
        make_client, forwarders, gateway_settings(), destination.url)
    assert client.app is not None
    await allow_sample_portal(client)
    outbox = client.app[HANDOFF]._outbox

    def full(records: Any) -> None:
        raise OSError(28, "No space left on device")

    with mock.patch.object(outbox, "write_now", full), mock.patch.object(outbox, "write", full):
        status, answer = await post_raw(client, sample("onappinstall-1"), FORM, "")
    assert (status, answer["status"]) == (200, "stored")  # durable: the sender hears so
    rows = await admin.fetch("SELECT route_id, position, outcome, error FROM audit.forwards")
    assert [tuple(r) for r in rows] == [(route_id, answer["position"], "given_up",
                                         "outbox_unwritable")]
    metrics = await (await client.get("/metrics")).text()
    assert "ledger_forward_handoff_failures_total 1.0" in metrics


async def test_a_position_one_worker_appends_after_another_workers_later_one_goes_first(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """Worker 2 committed position 10 just before worker 1 committed 11, but 11 reached the
    outbox (and was read) first: the portal still gets 10 before 11."""
    from ledger.gateway.forwarder import outbox_key
    from ledger.gateway.outbox import OutboxWriter

    # wide enough for a loaded machine; the defect it closes does not depend on its width
    settings = gateway_settings(forward_order_window_seconds=2.0)
    key = outbox_key(settings)
    # worker-0 is the served app's own outbox; two more stand for other workers
    late, early = (OutboxWriter(settings.outbox_root / f"worker-{n}", key) for n in (1, 2))
    _, forwarder, route_id = await routed_client(
        make_client, forwarders, settings, destination.url)

    try:
        await asyncio.to_thread(late.append, [outbox_record(route_id, 11)])
        await forwarder.poll()  # 11 is read before 10 was appended
        await asyncio.to_thread(early.append, [outbox_record(route_id, 10)])
        await destination.wait_until(lambda d: len(d.delivered) >= 2)
        assert [r.position for r in destination.delivered] == [10, 11]
        assert [r.body for r in destination.delivered] == [b"n=10", b"n=11"]
    finally:
        late.close()
        early.close()


async def test_an_empty_outbox_whose_worker_is_gone_costs_no_order_window(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """`worker-1`, left by an earlier run with two workers: empty and its writer gone, so a
    one-worker forwarder does not wait the order window (a minute here) for it."""
    from ledger.gateway.forwarder import outbox_key
    from ledger.gateway.outbox import OutboxWriter, writer_gone

    settings = gateway_settings(forward_order_window_seconds=60.0)
    stale = OutboxWriter(settings.outbox_root / "worker-1", outbox_key(settings))
    assert not writer_gone(stale.directory)  # open: it might still append
    stale.close()
    assert writer_gone(stale.directory)
    client, _, _ = await routed_client(make_client, forwarders, settings, destination.url)
    await install_sample_portal(client)
    await destination.wait_until(lambda d: len(d.delivered) == 1, within=20)


async def test_what_a_gone_worker_left_in_its_outbox_is_forwarded_in_order(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """A worker appended position 10 and ended; a live one appended 11 first: both are
    forwarded, 10 before 11 (the gone worker's outbox is not skipped while it holds records)."""
    from ledger.gateway.forwarder import outbox_key
    from ledger.gateway.outbox import OutboxWriter

    settings = gateway_settings(forward_order_window_seconds=1.0)
    key = outbox_key(settings)
    gone, live = (OutboxWriter(settings.outbox_root / f"worker-{n}", key) for n in (1, 2))
    _, forwarder, route_id = await routed_client(
        make_client, forwarders, settings, destination.url)

    try:
        await asyncio.to_thread(live.append, [outbox_record(route_id, 11)])
        await forwarder.poll()
        await asyncio.to_thread(gone.append, [outbox_record(route_id, 10)])
        gone.close()
        await destination.wait_until(lambda d: len(d.delivered) >= 2)
        assert [r.position for r in destination.delivered] == [10, 11]
    finally:
        live.close()
        gone.close()


async def test_with_no_route_the_forwarder_idles_and_a_new_route_wakes_it(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No route: the outboxes are read once per status interval, not at the polling interval
    (20 times a second by default: ~1.7 % of a core for nothing). The reload that brings a
    route starts the polling at once: the first forward waits no longer than that reload."""
    settings = gateway_settings(routes_reload_seconds=30, forward_poll_seconds=0.002,
                                forward_status_seconds=0.2)
    client = await make_client(settings)
    assert client.app is not None
    await install_sample_portal(client)
    forwarder = await forwarders.start(client)
    polls, published = [0], [0]
    poll, publish = forwarder.poll, forwarder.publish

    async def counted_poll(**options: Any) -> None:
        polls[0] += 1
        await poll(**options)

    def counted_publish() -> None:
        published[0] += 1
        publish()

    monkeypatch.setattr(forwarder, "poll", counted_poll)
    monkeypatch.setattr(forwarder, "publish", counted_publish)
    await eventually(lambda: published[0] >= 5)  # 5 status intervals: 500 polling intervals
    assert polls[0] <= 2 * published[0] + 2

    await routes_admin.add_route(client.app[STORE], settings, member_id=None,
                                 url=destination.url, actor="test")
    await client.app[HANDOFF].reload()
    await post(client, messages(1)[0])
    await forwarder.reload()  # its reload (every 30 s here) learns the route ...
    await destination.wait_until(lambda d: len(d.delivered) == 1, within=10)  # reading too


async def test_an_attempt_record_postgresql_refuses_holds_back_no_other_record(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """Found by a break test: one record PostgreSQL refuses (a NUL in its text) made every flush
    retry the same batch forever, and later records piled up until they were dropped."""
    _, forwarder, route_id = await routed_client(
        make_client, forwarders, gateway_settings(), destination.url)
    now = datetime.now(UTC)

    def record(error: str) -> AttemptRecord:
        return AttemptRecord(route_id=route_id, member_id=MEMBER_ID, position=None,
                             dedup_key=b"k" * 32, attempt=1, outcome="failed", status=None,
                             error=error, latency_ms=None, accepted_at=now, attempted_at=now)

    forwarder._records.extend(  # what forwards append, one of them bad
        [record("before"), record("a\x00b"), record("after")])
    await forwarder.records_flushed()
    errors = await admin.fetch(
        "SELECT error FROM ledger.forward_attempts WHERE route_id = $1 ORDER BY id", route_id)
    assert [r["error"] for r in errors] == ["before", "after"]


async def test_attempt_records_wait_while_postgresql_refuses_every_write_and_none_is_dropped(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """Found by a break test: PostgreSQL out of disk (or a failed-over, read-only primary,
    or a cancelled statement) refuses the COPY with an error that is not a connection
    failure; the forwarder took it for a record's bad data, wrote the batch one by one, saw
    each refused alone and dropped them all — the audit trail of every forward lost for as
    long as it lasted. Only a data error (SQLSTATE class 22/23) is one record's fault."""
    _, forwarder, route_id = await routed_client(
        make_client, forwarders, gateway_settings(), destination.url)
    now = datetime.now(UTC)

    def record(error: str) -> AttemptRecord:
        return AttemptRecord(route_id=route_id, member_id=MEMBER_ID, position=None,
                             dedup_key=b"k" * 32, attempt=1, outcome="failed", status=None,
                             error=error, latency_ms=None, accepted_at=now, attempted_at=now)

    await admin.execute("""
        CREATE FUNCTION public.disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'
              USING ERRCODE = 'disk_full'; END $$;
        CREATE TRIGGER disk_full BEFORE INSERT ON ledger.forward_attempts
            FOR EACH ROW EXECUTE FUNCTION public.disk_full();
    """)
    forwarder._records.extend([record("first"), record("second")])
    with pytest.raises(LedgerError, match="could not be recorded"):
        await forwarder.records_flushed()
    await admin.execute("DROP TRIGGER disk_full ON ledger.forward_attempts")
    await forwarder.records_flushed()
    errors = await admin.fetch(
        "SELECT error FROM ledger.forward_attempts WHERE route_id = $1 ORDER BY id", route_id)
    assert [r["error"] for r in errors] == ["first", "second"]


async def test_a_poll_whose_settling_fails_forwards_what_it_read_all_the_same(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination,
) -> None:
    """Found by a break test: `done.log` could not be written (the disk full), the poll that
    had just read new records raised, and they were dropped on the floor — read (never to be
    read again by this process), not queued: not forwarded, not given up, not counted, and
    their segment never deleted, until the forwarder happened to restart."""
    client, _, _ = await routed_client(make_client, forwarders, gateway_settings(),
                                       destination.url)
    await install_sample_portal(client)
    first, second = messages(2)
    await post(client, first)
    await destination.wait_until(lambda d: len(d.delivered) == 2)  # the install, the first
    full = OSError(28, "No space left on device")
    with mock.patch.object(OutboxReader, "apply_settled", side_effect=full) as settling:
        _, answer = await post(client, second)
        await eventually(lambda: settling.call_count >= 3)  # polls that read it went by
    await destination.wait_until(lambda d: len(d.delivered) == 3, within=5)
    assert destination.delivered[-1].position == answer["position"]


async def test_a_forward_is_settled_only_once_its_record_is_written(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """Found by a break test: a delivered forward was written down as settled in `done.log`
    at the next poll, its attempt record up to a batch interval later — or, with PostgreSQL
    away, whenever it came back. A `kill -9` between the two (or a shutdown during the
    outage) lost the record for good: nothing sent the forward again, and `audit.forwards`
    never showed that the bot received it. Now the record goes first; killed before it, the
    forward is owed still (not in `done.log`), sent again and recorded by the next forwarder."""
    client, forwarder, route_id = await routed_client(
        make_client, forwarders, gateway_settings(), destination.url)
    (directory,) = client.app[SETTINGS].outbox_root.glob("worker-*")
    away = DatabaseUnavailable("record forward attempts: PostgreSQL is unavailable")
    with mock.patch.object(forwarder._store, "record_attempts", side_effect=away):
        await install_sample_portal(client)
        _, answer = await post(client, messages(1)[0])
        await eventually(lambda: sum(r.outcome == "delivered" for r in forwarder._records) == 2)
        await forwarder.poll(apply_settled=True)  # what the outbox loop does meanwhile
        # a kill -9 now: a new forwarder sends again all that done.log does not hold
        assert f" {route_id} " not in (directory / "done.log").read_text()
    await forwarder.records_flushed()  # PostgreSQL back: recorded, then settled
    recorded = await admin.fetch("SELECT position FROM ledger.forward_attempts "
                                 "WHERE route_id = $1 AND outcome = 'delivered'", route_id)
    assert answer["position"] in {r["position"] for r in recorded}
    done = (directory / "done.log").read_text()
    assert done.count(f" {route_id} ") == 2 or not list(directory.glob("seg-*"))


async def _stuck_after_the_commit(
    client: Client, body: bytes, admin: Admin,
) -> tuple[asyncio.Task[Any], asyncio.Event, int]:
    """POST `body` and hold its handler between the COMMIT and what follows it (a `kill -9`
    or a shutdown cancelling the handler there): the event is stored, the handler never
    goes on. Returns the request's task, the event that lets the handler go on, and the
    position stored."""
    assert client.app is not None
    intake = client.app[INTAKE]
    committer = intake._committer
    submit = committer.submit
    held = asyncio.Event()

    async def stuck(draft: Any) -> Any:
        outcome = await submit(draft)
        await held.wait()
        return outcome

    before = await admin.fetchval("SELECT coalesce(max(position), 0) FROM ledger.events")
    with mock.patch.object(committer, "submit", stuck):
        request = asyncio.ensure_future(post(client, body))
        await eventually(lambda: admin.fetchval(
            "SELECT count(*) FROM ledger.events WHERE position > $1", before))
    position = await admin.fetchval("SELECT max(position) FROM ledger.events")
    return request, held, int(position)


async def test_an_event_stored_whose_handler_never_went_on_is_forwarded_all_the_same(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """The seal used to follow the commit in the handler: a `kill -9` (or a cancelled handler)
    between the two left the event stored and never forwarded, with no record saying so."""
    client, _, _ = await routed_client(make_client, forwarders, gateway_settings(),
                                       destination.url)
    await install_sample_portal(client)
    request, held, position = await _stuck_after_the_commit(client, messages(1)[0], admin)
    try:
        await destination.wait_until(
            lambda d: position in [r.position for r in d.delivered], within=10)
    finally:
        request.cancel()
        held.set()
        await asyncio.gather(request, return_exceptions=True)
    received = [r for r in destination.delivered if r.position == position]
    assert [r.stored_when_received for r in received] == [True]


async def test_a_redelivery_of_an_event_whose_handler_never_went_on_is_forwarded_once(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """Bitrix24 redelivers what it was not answered: a duplicate. The event is forwarded once
    whatever number of deliveries (and outbox records) name it."""
    client, forwarder, _ = await routed_client(make_client, forwarders, gateway_settings(),
                                               destination.url)
    await install_sample_portal(client)
    body = messages(1)[0]
    request, held, position = await _stuck_after_the_commit(client, body, admin)
    try:
        status, again = await post(client, body)
        assert (status, again["duplicate"], again["position"]) == (200, True, position)
        _, later = await post(client, messages(1, start=1)[0])
        await destination.wait_until(
            lambda d: later["position"] in [r.position for r in d.delivered], within=10)
    finally:
        request.cancel()
        held.set()
        await asyncio.gather(request, return_exceptions=True)
    await forwarder.records_flushed()
    assert [r.position for r in destination.delivered][1:] == [position, later["position"]]


async def test_a_stalled_outbox_holds_no_answer_past_its_bound_and_the_give_up_is_recorded(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """A write to the outbox that hangs (a stalled disk) held the answer with no timeout.
    Past LEDGER_OUTBOX_WRITE_TIMEOUT_SECONDS the forward is given up (recorded, counted, in
    /readyz, logged once) and the delivery answered; while the write still hangs, later
    deliveries are not held at all. The stalled record, written late after all, is not sent:
    its forward stands given up."""
    client, forwarder, route_id = await routed_client(
        make_client, forwarders, gateway_settings(outbox_write_timeout_seconds=0.3),
        destination.url)
    assert client.app is not None
    await install_sample_portal(client)
    await destination.wait_until(lambda d: len(d.delivered) == 1)
    outbox = client.app[HANDOFF]._outbox
    release = threading.Event()
    write = outbox.write

    def stalled(data: bytes) -> None:
        release.wait(30)
        write(data)

    first, second = messages(2)
    try:
        with mock.patch.object(outbox, "write_now", return_value=False), \
                mock.patch.object(outbox, "write", stalled):
            began = time.monotonic()
            status, stored = await post(client, first)
            held = time.monotonic() - began
            began = time.monotonic()
            status_2, stored_2 = await post(client, second)
            held_2 = time.monotonic() - began
            _, ready = await readiness(client)
    finally:
        release.set()
    assert (status, stored["status"], status_2, stored_2["status"]) == (
        200, "stored", 200, "stored")
    assert 0.3 <= held < 5, held  # the bound, not the stall
    assert held_2 < 0.3, held_2  # the write still hangs: not waited for again
    assert ready["outbox"]["state"] == "outbox_stalled"
    assert ready["outbox"]["given_up"] == 2
    rows = await admin.fetch("SELECT route_id, position, outcome, error FROM audit.forwards "
                             "WHERE outcome = 'given_up' ORDER BY position")
    assert [tuple(r) for r in rows] == [
        (route_id, stored["position"], "given_up", "outbox_stalled"),
        (route_id, stored_2["position"], "given_up", "outbox_stalled")]
    metrics = await (await client.get("/metrics")).text()
    assert 'ledger_forward_seals_given_up_total{reason="outbox_stalled"} 2.0' in metrics
    # the disk is back: the next delivery is sealed and forwarded; the late record is not
    _, later = await post(client, messages(1, start=5)[0])
    await destination.wait_until(
        lambda d: later["position"] in [r.position for r in d.delivered], within=10)
    await forwarder.records_flushed()
    assert [r.position for r in destination.delivered][1:] == [later["position"]]
    assert (await readiness(client))[1]["outbox"]["state"] == "ok"


async def test_past_the_outbox_bound_new_forwards_are_given_up_never_the_answer(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """The outboxes grew without bound while the forwarder was down: past
    LEDGER_OUTBOX_MAX_BYTES a new forward is given up (outbox_full), recorded; the delivery
    is stored and answered all the same."""
    client, _, route_id = await routed_client(
        make_client, forwarders, gateway_settings(outbox_max_bytes=1), destination.url)
    await install_sample_portal(client)  # written: the outbox now holds more than 1 byte
    status, stored = await post(client, messages(1)[0])
    assert (status, stored["status"]) == (200, "stored")
    rows = await admin.fetch("SELECT route_id, position, outcome, error FROM audit.forwards "
                             "WHERE outcome = 'given_up'")
    assert [tuple(r) for r in rows] == [(route_id, stored["position"], "given_up",
                                         "outbox_full")]
    assert (await readiness(client))[1]["outbox"]["state"] == "outbox_full"


async def test_a_refused_delivery_is_never_forwarded_nor_given_up_and_an_unstored_one_is(
    make_client: ClientFactory, forwarders: Forwarders,
    gateway_settings: Callable[..., Settings], destination: Destination, admin: Admin,
) -> None:
    """Refused (a portal the ledger does not trust), a delivery is never sealed, so nothing
    is forwarded or recorded; sealed ahead of a commit that never stored it (a 503) it is
    given up as never_stored once past LEDGER_FORWARD_MAX_AGE_SECONDS."""
    client, forwarder, route_id = await routed_client(
        make_client, forwarders, gateway_settings(forward_max_age_seconds=0.5),
        destination.url)
    assert client.app is not None
    refused, _ = await post(client, messages(1)[0])  # no portal installed yet
    assert refused == 403
    await install_sample_portal(client)  # its deliveries are sealed ahead from now on
    await eventually(lambda: len(destination.requests) == 1, within=10)  # the install
    destination.requests.clear()
    committer = client.app[INTAKE]._committer

    async def failing(draft: Any) -> Any:
        raise DatabaseUnavailable("not stored")

    with mock.patch.object(committer, "submit", failing):
        unstored, _ = await post(client, messages(1, start=1)[0])
    assert unstored == 503

    async def given_up() -> list[tuple[Any, ...]]:
        await forwarder.records_flushed()
        return [tuple(r) for r in await admin.fetch(
            "SELECT route_id, position, outcome, error FROM audit.forwards "
            "WHERE outcome <> 'delivered'")]  # the install's forward was delivered

    await eventually(given_up, within=10)
    assert await given_up() == [(route_id, None, "given_up", "never_stored")]
    assert destination.requests == []
