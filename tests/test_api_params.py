"""Every read-API refusal is JSON and every overflow a 4xx: parameters, path ids, bearer tokens
of any bytes — and schemathesis, against the live API, finds nothing."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import MEMBER_ID, sample
from tests.helpers import PROJECTOR, Client, install_sample_portal, post
from tests.test_api import bearer
from tests.test_hostile import raw_get

BAD_PARAMETERS = [
    ("/events", "after", "9223372036854775808"),
    ("/events", "after", "-1"),
    ("/events", "after", "²"),
    ("/events", "after", "1e3"),
    ("/events", "after", " 1"),
    ("/events", "bot", "1e20"),
    ("/events", "bot", "²"),
    ("/events", "bot", "٣"),
    ("/events", "bot", "99999999999999999999999"),
    ("/events", "limit", "0"),
    ("/events", "limit", "-5"),
    ("/events", "portal", "a\x00b"),
    ("/events", "portal", "x" * 1000),
    ("/events", "type", "\x00"),
    ("/events", "from", "9999-12-31T23:59:59-23:59"),
    ("/events", "to", "0001-01-01T00:00:00+23:59"),
    ("/events", "from", "\uff12\uff10\uff12\uff16-01-01"),  # full-width digits
    ("/deletions", "actor", "\x00"),
    ("/deletions", "from", "yesterday"),
    ("/bots", "as_of", "²"),
    ("/bots", "as_of", "9223372036854775808"),
    ("/bots", "status", "both"),
]


async def test_a_bad_parameter_is_a_json_400(client: Client) -> None:
    headers = await bearer(client)
    for path, name, value in BAD_PARAMETERS:
        response = await client.get(f"/api/v1{path}", headers=headers, params={name: value})
        assert response.status == 400, (path, name, value, await response.text())
        assert (await response.json())["error"] == "bad_query"
    assert (await client.get("/api/v1/events", headers=headers,
                             params={"after": "9223372036854775807"})).status == 200


async def test_a_bad_bot_id_in_the_path_is_a_json_400(client: Client) -> None:
    headers = await bearer(client)
    for bot_id in ["9223372036854775808", "²", "-1", "1e3", "0x10", "%00"]:
        response = await client.get(f"/api/v1/portals/{MEMBER_ID}/bots/{bot_id}",
                                    headers=headers)
        assert response.status == 400, bot_id
        assert (await response.json())["error"] == "bad_query"


async def test_bearer_tokens_of_any_bytes_get_a_json_401(client: Client) -> None:
    for token in [b"\xe9", b"lgr_\xe9\xff", "tökén".encode(), b"x" * 6000, b"\xed\xa0\x80"]:
        status, content = await raw_get(client, b"/api/v1/portals",
                                        [b"Authorization: Bearer " + token])
        assert status == 401, token
        assert content.startswith(b'{"error":"unauthorized"')


async def test_schemathesis_finds_nothing_against_the_live_api(
    client: Client, tmp_path: Path
) -> None:
    await install_sample_portal(client)  # answers with content, so their schemas are checked
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    headers = await bearer(client)
    schema = f"http://{client.host}:{client.port}/api/v1/openapi.json"
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("schemathesis")), "run", schema,
        "--header", f"Authorization:{headers['Authorization']}",
        "--checks", "all", "--max-examples", "20", "--seed", "1", "--workers", "1",
        "--no-shrink", "--request-timeout", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()[-6000:]


@pytest.mark.parametrize("position", ["%D9%A1%D9%A0", "5_0", "+5", "%205", "1e3", "-1",
                                      "9223372036854775808"])
async def test_a_proof_path_position_is_as_strict_as_any_parameter(
    client: Client, position: str
) -> None:
    """Found by a break test: the path used bare int(), so `5_0` meant 50 (and other
    scripts' digits were numbers)."""
    headers = await bearer(client)
    response = await client.get(f"/api/v1/events/{position}/proof", headers=headers)
    assert response.status == 400
    assert (await response.json())["error"] == "bad_query"
