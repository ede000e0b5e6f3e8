"""Trust cannot be claimed by whoever sends HTTP, and cannot be bent behind the ledger's back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from ledger.confirmation import RestConfirmer
from ledger.operations import change_trust
from ledger.projections.fold import StoredEvent
from ledger.settings import Settings
from ledger.trust import TrustChange, TrustState, fold_trust
from ledger.web import STORE
from tests.conftest import DOMAIN, MEMBER_ID, ClientFactory, sample
from tests.helpers import Client, post
from tests.test_intake import forge

Admin: TypeAlias = "asyncpg.Connection[Any]"
ACCESS_TOKEN = "s6p6eclrvim6da22ft9ch94ekreb52lv"  # the sample install's auth.access_token
APP_CODE = "local.ledger-test.0001"  # the application's code, as app.info names it


@dataclass
class FakeBitrix24:
    """A portal's REST API as far as `app.info` and `profile` go: it accepts the access tokens
    it issued, each of one application and one user."""

    url: str = ""
    issued: dict[str, str] = field(default_factory=dict)  # access token -> member_id
    apps: dict[str, str] = field(default_factory=dict)  # access token -> app code (else ours)
    not_admin: set[str] = field(default_factory=set)  # access tokens of ordinary users
    profiles: list[str] = field(default_factory=list)  # tokens `profile` was asked with
    name_member: bool = False  # answer with install.member_id (undocumented, but seen)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (domain, auth)
    hold: asyncio.Event | None = None  # when set up, answers wait for it (a slow portal)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    in_parts: bool = False  # the answer's body in two chunks, a pause between (a slow link)

    async def app_info(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = str(form.get("auth", ""))
        self.calls.append((request.match_info["domain"], token))
        async with self.arrived:
            self.arrived.notify_all()
        if self.hold is not None:
            await self.hold.wait()
        member = self.issued.get(token)
        if member is None:
            return web.json_response(
                {"error": "invalid_token", "error_description": "The access token provided is "
                 "invalid."}, status=401)
        result: dict[str, Any] = {"ID": 5, "CODE": self.apps.get(token, APP_CODE), "VERSION": 1,
                                  "STATUS": "L",
                                  "INSTALLED": True, "PAYMENT_EXPIRED": "N", "DAYS": None}
        if self.name_member:
            result["install"] = {"member_id": member}
        if not self.in_parts:
            return web.json_response({"result": result, "time": {"start": 0}})
        body = orjson.dumps({"result": result, "time": {"start": 0}})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:20])
        await asyncio.sleep(0.3)  # the slow link's pause between the two parts
        await response.write(body[20:])
        await response.write_eof()
        return response

    async def profile(self, request: web.Request) -> web.StreamResponse:
        token = str((await request.post()).get("auth", ""))
        self.profiles.append(token)
        if token not in self.issued:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"result": {"ID": "1", "ADMIN": token not in self.not_admin,
                                             "NAME": "Admin", "LAST_NAME": ""}})


@pytest.fixture
async def bitrix24(aiohttp_server: Any) -> FakeBitrix24:
    fake = FakeBitrix24(issued={ACCESS_TOKEN: MEMBER_ID})
    app = web.Application()
    app.router.add_post("/{domain}/rest/app.info", fake.app_info)
    app.router.add_post("/{domain}/rest/profile", fake.profile)
    server = await aiohttp_server(app, host="127.0.0.1")
    fake.url = f"http://127.0.0.1:{server.port}/{{domain}}/rest/"
    return fake


@pytest.fixture
async def portal_client(
    make_client: ClientFactory, settings_factory: Any, bitrix24: FakeBitrix24
) -> Client:
    settings: Settings = settings_factory(bitrix24_rest_url=bitrix24.url,
                                          confirm_timeout_seconds=2.0,
                                          bitrix24_app_code=APP_CODE)
    client = await make_client(settings)
    assert client.app is not None
    await change_trust(client.app[STORE], TrustChange.ALLOWED, domain=DOMAIN, actor="test")
    return client


async def trust_of(admin: Admin, member_id: str = MEMBER_ID) -> str | None:
    state: str | None = await admin.fetchval(
        "SELECT state FROM ledger.portal_trust WHERE member_id = $1", member_id)
    return state


async def test_a_domain_allowance_admits_the_install_its_portal_confirms(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin
) -> None:
    status, answer = await post(portal_client, sample("onappinstall-1"))
    assert (status, answer["status"]) == (200, "stored")
    assert bitrix24.calls == [(DOMAIN, ACCESS_TOKEN)]  # the allowed domain, the delivered token
    assert await trust_of(admin) == "trusted"
    assert (await post(portal_client, sample("onimbotdelete-1")))[0] == 200
    for table in ("events", "rejections", "portal_trust"):
        rows = await admin.fetch(f"SELECT * FROM ledger.{table}")
        assert ACCESS_TOKEN not in "\n".join(str(tuple(r)) for r in rows)


async def test_a_confirmation_answered_in_parts_is_read_whole(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin
) -> None:
    """Found in the lead's review: the answer was read as far as it had arrived, so a
    portal's `app.info` answer in two chunks was judged "without JSON" and the genuine install
    refused (403 install_not_confirmed)."""
    bitrix24.in_parts = True
    status, answer = await post(portal_client, sample("onappinstall-1"))
    assert (status, answer.get("status")) == (200, "stored"), answer
    assert await trust_of(admin) == "trusted"


async def test_another_spelling_of_the_domain_matches_that_portal_only(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin
) -> None:
    status, _ = await post(portal_client, forge("onappinstall-1",
                                                domain="SOME-DOMAIN.Bitrix24.com."))
    assert status == 200
    assert bitrix24.calls == [(DOMAIN, ACCESS_TOKEN)]
    assert [r["member_id"] for r in await admin.fetch("SELECT * FROM ledger.portal_trust")] == [
        MEMBER_ID]


async def test_a_made_up_member_id_under_the_allowed_domain_is_refused_and_logged(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin
) -> None:
    forged = forge("onappinstall-1", member_id="f" * 32, access_token="attacker-token",
                   application_token="a" * 32)
    status, answer = await post(portal_client, forged)
    assert (status, answer["error"]) == (403, "install_not_confirmed")
    assert await trust_of(admin, "f" * 32) is None
    assert await admin.fetchval(
        "SELECT reason FROM ledger.rejections ORDER BY position DESC LIMIT 1"
    ) == "install_not_confirmed"
    # the allowance is still there for the genuine install
    assert (await post(portal_client, sample("onappinstall-1")))[0] == 200


async def test_a_portal_answering_for_another_member_id_refuses_the_install(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin
) -> None:
    bitrix24.name_member = True
    bitrix24.issued[ACCESS_TOKEN] = "0" * 32  # the token belongs to another installation
    status, answer = await post(portal_client, sample("onappinstall-1"))
    assert (status, answer["error"]) == (403, "install_not_confirmed")
    assert "another portal" in answer["message"]
    assert await trust_of(admin) is None


@pytest.mark.parametrize("whose", ["another application's", "an ordinary user's"])
async def test_a_live_token_of_the_domain_that_is_not_an_admins_of_this_app_is_refused(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin, whose: str
) -> None:
    """The portal's `app.info` never names a member_id, so any live token of the allowed
    domain passed: with it a made-up member_id was bound to the domain (its events then
    stored under that portal) and the allowance spent. Now the token must be this
    application's (`app.info` CODE) and an administrator's (`profile` ADMIN)."""
    stolen = "live-token-of-the-domain"
    bitrix24.issued[stolen] = MEMBER_ID
    if whose == "another application's":
        bitrix24.apps[stolen] = "local.some-other-app.42"
    else:
        bitrix24.not_admin.add(stolen)
    forged = forge("onappinstall-1", member_id="e" * 32, access_token=stolen,
                   application_token="b" * 32)
    status, answer = await post(portal_client, forged)
    assert (status, answer["error"]) == (403, "install_not_confirmed"), answer
    assert await trust_of(admin, "e" * 32) is None
    # the allowance is still there for the genuine install, confirmed both ways
    assert (await post(portal_client, sample("onappinstall-1")))[0] == 200
    assert await trust_of(admin) == "trusted"
    assert bitrix24.profiles[-1] == ACCESS_TOKEN


async def test_an_unreachable_portal_confirms_nothing(
    make_client: ClientFactory, settings_factory: Any, admin: Admin
) -> None:
    client = await make_client(settings_factory(
        bitrix24_rest_url="http://127.0.0.1:9/{domain}/rest/", confirm_timeout_seconds=1.0))
    assert client.app is not None
    await change_trust(client.app[STORE], TrustChange.ALLOWED, domain=DOMAIN, actor="test")
    status, answer = await post(client, sample("onappinstall-1"))
    assert (status, answer["error"]) == (403, "install_not_confirmed")
    assert await trust_of(admin) is None


async def test_an_allowance_for_one_domain_never_admits_another(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin
) -> None:
    for domain in ("other.bitrix24.com", "some-domain.bitrix24.com.evil.example",
                   "xsome-domain.bitrix24.com"):
        status, answer = await post(portal_client, forge("onappinstall-1", domain=domain))
        assert (status, answer["error"]) == (403, "portal_not_allowed")
    assert bitrix24.calls == []
    assert await trust_of(admin) is None


async def test_the_allowance_is_used_up_by_the_install_it_admits(
    portal_client: Client, bitrix24: FakeBitrix24, admin: Admin
) -> None:
    assert (await post(portal_client, sample("onappinstall-1")))[0] == 200
    assert (await post(portal_client, sample("onappuninstall-1")))[0] == 200
    reinstall = forge("onappinstall-1", application_token="b" * 32, ts="1796526400")
    status, answer = await post(portal_client, reinstall)
    assert (status, answer["error"]) == (403, "portal_not_allowed")
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.portal_allowances WHERE consumed_position IS NULL") == 0


async def test_a_member_id_allowance_needs_no_call_back(
    make_client: ClientFactory, settings_factory: Any, bitrix24: FakeBitrix24
) -> None:
    client = await make_client(settings_factory(bitrix24_rest_url=bitrix24.url))
    assert client.app is not None
    await change_trust(client.app[STORE], TrustChange.ALLOWED, member_id=MEMBER_ID, actor="t")
    assert (await post(client, sample("onappinstall-1")))[0] == 200
    assert bitrix24.calls == []


@pytest.mark.parametrize("statement", [
    "UPDATE ledger.portal_trust SET state = 'trusted', token_sha256 = decode(repeat('00', 32), "
    "'hex')",
    "INSERT INTO ledger.portal_trust VALUES ('x', NULL, 'ended', NULL, now(), 1)",
    "DELETE FROM ledger.portal_trust",
    "UPDATE ledger.portal_allowances SET consumed_position = NULL",
    "INSERT INTO ledger.portal_allowances (member_id, allowed_at, position) VALUES ('x', now(), 1)",
    "DELETE FROM ledger.portal_allowances",
    "TRUNCATE ledger.portal_trust",
])
async def test_the_service_role_cannot_write_trust_state(
    client: Client, service_connection: Admin, statement: str
) -> None:
    from tests.helpers import install_sample_portal

    await install_sample_portal(client)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await service_connection.execute(statement)


async def test_the_trust_fold_of_the_store_is_what_the_trust_tables_hold(
    client: Client, admin: Admin
) -> None:
    from tests.helpers import allow_sample_portal, install_sample_portal

    await install_sample_portal(client)
    assert (await post(client, sample("onappuninstall-1")))[0] == 200
    await allow_sample_portal(client)
    await post(client, forge("onappinstall-1", application_token="c" * 32, ts="1796526400"))
    assert client.app is not None
    await change_trust(client.app[STORE], TrustChange.ALLOWED, member_id="other", actor="t")
    rows = await admin.fetch("SELECT * FROM ledger.events ORDER BY position")
    folded = fold_trust(
        StoredEvent(r["position"], r["member_id"], r["event_type"], r["origin"],
                    tuple(r["bot_ids"]), r["occurred_at"], r["received_at"],
                    orjson.loads(r["payload"]), bytes(r["hash"]))
        for r in rows
    )
    table = {r["member_id"]: (r["domain"], r["state"], bytes(r["token_sha256"] or b""))
             for r in await admin.fetch("SELECT * FROM ledger.portal_trust")}
    assert {m: (t.domain, t.state.value, t.token_sha256 or b"")
            for m, t in folded.portals.items()} == table
    assert folded.portals[MEMBER_ID].state is TrustState.TRUSTED
    open_rows = await admin.fetch(
        "SELECT position FROM ledger.portal_allowances WHERE consumed_position IS NULL")
    assert sorted(folded.allowances) == [r["position"] for r in open_rows]


@pytest.mark.parametrize("event", ["LEDGER.TRUST_CHANGED", "ledger.trust_changed",
                                   "LEDGER.ROUTE_CHANGED", "ONAPP.INSTALL"])
async def test_a_trusted_portal_cannot_name_an_event_into_the_ledgers_own_namespace(
    portal_client: Client, admin: Admin, event: str
) -> None:
    """A sender with a valid token that posts a trust-changing payload under the ledger's own
    event names gets a 400, and neither trust nor allowances move."""
    assert (await post(portal_client, sample("onappinstall-1")))[0] == 200
    before = await admin.fetch("SELECT * FROM ledger.portal_allowances ORDER BY position")
    body = (
        f"event={event}&change=allowed&member_id=&domain=victim.bitrix24.com"
        f"&token_sha256={'ab' * 32}&auth[member_id]={MEMBER_ID}&auth[domain]={DOMAIN}"
        "&auth[application_token]=831c76b092f9f135d9b6b36c3a720757"
    ).encode()
    status, answer = await post(portal_client, body)
    assert (status, answer["error"]) == (400, "invalid_event")
    assert await admin.fetch("SELECT * FROM ledger.portal_allowances ORDER BY position") == before
    assert await trust_of(admin) == "trusted"
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE origin = 'bitrix24' AND event_type LIKE '%.%'"
    ) == 0


async def test_a_flood_of_bogus_installs_from_one_address_cannot_crowd_out_the_genuine_one(
    bitrix24: FakeBitrix24,
) -> None:
    """Found by a break test: 16 slow call-backs from anyone made the genuine install fail at
    once (and Bitrix24 never sends it again). Now one address holds a few slots; the genuine
    delivery waits for a slot within the confirmation timeout."""
    bitrix24.hold = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        confirmer = RestConfirmer(session, base_url=bitrix24.url, timeout=5.0)
        flood = [asyncio.ensure_future(confirmer.confirm(DOMAIN, MEMBER_ID, f"bogus{n}",
                                                         sender="203.0.113.9"))
                 for n in range(40)]
        genuine = asyncio.ensure_future(confirmer.confirm(DOMAIN, MEMBER_ID, ACCESS_TOKEN,
                                                          sender="198.51.100.1"))
        async with asyncio.timeout(5), bitrix24.arrived:
            # 8 from the flooding address, then the genuine one
            await bitrix24.arrived.wait_for(lambda: len(bitrix24.calls) >= 9)
        assert bitrix24.calls[-1] == (DOMAIN, ACCESS_TOKEN)
        bitrix24.hold.set()
        assert await genuine is None
        refused = [r for r in await asyncio.gather(*flood) if r and "this address" in r]
        assert len(refused) == 32
