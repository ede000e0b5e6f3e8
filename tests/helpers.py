"""Small helpers the HTTP tests share."""

from __future__ import annotations

from typing import Any, TypeAlias

from aiohttp.test_utils import TestClient

from ledger.operations import change_trust
from ledger.trust import TrustChange
from ledger.web import STORE
from tests.conftest import DOMAIN, FORM, sample

Client: TypeAlias = "TestClient[Any, Any]"


async def post(
    client: Client, body: bytes, *, content_type: str = FORM, query: str = ""
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        "/bitrix24/events" + (f"?{query}" if query else ""),
        data=body,
        headers={"Content-Type": content_type},
    )
    return response.status, await response.json()


async def allow_sample_portal(client: Client) -> None:
    assert client.app is not None
    await change_trust(client.app[STORE], TrustChange.ALLOWED, domain=DOMAIN, actor="test")


async def install_sample_portal(client: Client) -> None:
    await allow_sample_portal(client)
    status, answer = await post(client, sample("onappinstall-1"))
    assert status == 200, answer
