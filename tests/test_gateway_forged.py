"""breakgw2's attacks on the write-ahead seal. A delivery was sealed into the outbox *before* its
commit, so before its sender's token was checked, and the forwarder knows a record ahead only by
its identity (portal, dedup key), which leaves every token and the whole `auth` block out. Now
only a delivery whose token the portal's trust, as the worker last read it, accepts is sealed
ahead; any other is sealed once stored (`IntakeService`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ledger.gateway import admin as routes_admin
from ledger.gateway.handoff import HANDOFF
from ledger.settings import Settings
from ledger.web import STORE
from tests.conftest import TOKEN, ClientFactory
from tests.gateway_helpers import Destination, Forwarders
from tests.helpers import Client, install_sample_portal, post
from tests.test_gateway import destination, forwarders, gateway_settings, messages  # noqa: F401

GENUINE_BOT_TOKEN = b"a98b9d690000071b0000084400000237f0f107589d1e"  # data[BOT][567][access_token]


def forged(body: bytes) -> bytes:
    """`body` with a wrong `auth[application_token]` (its last field) — refused 401 — and the
    bot's access_token swapped for the attacker's; its identity is the genuine one's."""
    head, _, _ = body.replace(GENUINE_BOT_TOKEN, b"f0" * 22, 1).rpartition(TOKEN.encode())
    return head + b"0" * 32


async def routed(make_client: ClientFactory, settings: Settings, url: str) -> Client:
    """An app with a route to every portal, the sample portal installed, no forwarder yet."""
    client = await make_client(settings)
    assert client.app is not None
    await routes_admin.add_route(client.app[STORE], settings, member_id=None, url=url,
                                 actor="test")
    await client.app[HANDOFF].reload()
    await install_sample_portal(client)
    return client


async def test_a_forged_copy_of_an_event_refused_401_is_never_what_is_forwarded(
    make_client: ClientFactory, forwarders: Forwarders,  # noqa: F811
    gateway_settings: Callable[..., Settings], destination: Destination,  # noqa: F811
) -> None:
    """The forged copy (wrong application_token, the attacker's bot token) is answered 401;
    the genuine delivery is stored. A forwarder that reads both records before its look-up
    (behind, restarted, or the two arriving within a poll) finds the identity stored and
    sends the first record naming it: the forged body — attacker's tokens — to the bot."""
    client = await routed(make_client, gateway_settings(), destination.url)
    genuine = messages(1)[0]
    assert (await post(client, forged(genuine)))[0] == 401  # invalid_application_token
    status, answer = await post(client, genuine)
    assert status == 200, answer
    await forwarders.start(client)
    await destination.wait_until(
        lambda d: any(r.position == answer["position"] for r in d.delivered), within=10)
    (sent,) = [r.body for r in destination.delivered if r.position == answer["position"]]
    assert b"f0f0f0f0" not in sent, "the refused delivery's body was forwarded"


async def test_a_flood_of_refused_deliveries_never_gets_a_stored_events_forward_given_up(
    make_client: ClientFactory, forwarders: Forwarders,  # noqa: F811
    gateway_settings: Callable[..., Settings], destination: Destination,  # noqa: F811
    admin: Any,
) -> None:
    """Records ahead wait for their look-up in one list bounded by LEDGER_FORWARD_MAX_PENDING
    (over every portal and route); past it the oldest is given up (`backlog_full`), and a
    look-up takes at most 5000 per poll. Deliveries refused 401 each put a record there: a
    flood of them pushes a stored event's record out — given up, never forwarded."""
    client = await routed(make_client, gateway_settings(forward_max_pending=20),
                          destination.url)
    status, answer = await post(client, messages(1, start=50)[0])
    assert status == 200, answer
    for body in messages(40, start=100):
        assert (await post(client, forged(body)))[0] == 401
    await forwarders.start(client)  # a forwarder a moment behind (or restarted)
    await destination.wait_until(
        lambda d: any(r.position == answer["position"] for r in d.delivered), within=10)
