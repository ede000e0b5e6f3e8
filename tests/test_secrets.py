"""No token survives anywhere: every refused (and accepted) shape, then a full `pg_dump`, the
spool directory, the log and every answer are searched for the token values.

The token values and the shapes come from this file's own literal lists — not from the
production `SECRET_KEYS` — so a narrowed definition there makes this test fail.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from ledger.settings import Settings
from tests.conftest import MEMBER_ID, TOKEN, ClientFactory, Database, sample
from tests.helpers import PROJECTOR, Client, drained, install_sample_portal
from tests.test_api import bearer
from tests.test_intake import _pg_dump, forge

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
# one distinct made-up token per shape, so a finding names the shape that leaked
T = [f"5ec7e7{i:02d}a9b8c7d6e5f4a3b2c1d0e9f8a7" for i in range(50)]
M = MEMBER_ID


def shapes() -> list[tuple[str, bytes, str, str]]:
    """(name, body, content type, query) of every way a token has been seen to slip through."""
    pad = "&".join(f"p{i}=1" for i in range(300))
    return [
        ("json body as form", (
            '{"event":"ONIMBOTDELETE","auth":{"application_token":"' + T[0]
            + '","access_token":"' + T[1] + '","member_id":"' + M + '"}}').encode(), FORM, ""),
        ("auth scalar", f"event=ONIMBOTDELETE&auth={T[2]}".encode(), FORM, ""),
        ("auth list", f"event=ONIMBOTDELETE&auth[]={T[3]}".encode(), FORM, ""),
        ("json auth list", ('{"event":"ONIMBOTDELETE","auth":["' + T[4] + '"]}').encode(),
         JSON, ""),
        ("encoded brackets", (f"event=ONIMBOTDELETE&auth%5Bapplication%5Ftoken%5D={T[5]}"
                              f"&auth%5Bmember_id%5D={M}").encode(), FORM, ""),
        ("encoded brackets undecodable", (f"auth%5Bapplication%5Ftoken%5D={T[6]}"
                                          "&x=%FF").encode(), FORM, ""),
        ("encoded letter undecodable", f"%61ccess_token={T[7]}&x=%FE".encode(), FORM, ""),
        ("json unicode escape broken", ('{"event":"X","application\\u005ftoken":"' + T[8]
                                        + '",').encode(), JSON, ""),
        ("json unicode escape", ('{"event":"X","auth":{"application\\u005ftoken":"' + T[9]
                                 + '"}}').encode(), JSON, ""),
        ("query tokens", b"event=ONIMBOTDELETE", FORM,
         f"access_token={T[10]}&auth[application_token]={T[11]}&auth={T[12]}"),
        ("too large", (f"auth[application_token]={T[13]}&pad=" + "a" * 4000).encode(),
         FORM, ""),
        ("too many fields", (f"auth[refresh_token]={T[14]}&" + pad).encode(), FORM, ""),
        ("invalid utf8", f"auth[refresh_token]={T[15]}&x=".encode() + b"\xff", FORM, ""),
        ("bad json", ('{"auth": {"refresh_token": "' + T[16] + '"').encode(), JSON, ""),
        ("php dot mangling", f"event=ONIMBOTDELETE&auth.application_token={T[17]}".encode(),
         FORM, ""),
        ("php space mangling", f"event=X&auth+application_token={T[18]}".encode(), FORM, ""),
        ("content type parameter", b"event=X", f"{FORM}; access_token={T[19]}", ""),
        ("upper case", f"event=X&AUTH[APPLICATION_TOKEN]={T[20]}&x=%C3".encode(), FORM, ""),
        ("double encoded", f"event=X&auth%255Bsessid%255D={T[21]}&x=%FF".encode(), FORM, ""),
        ("client secret in data", (f"event=X&data[client_secret]={T[22]}&data[sessid]={T[23]}"
                                   ).encode(), FORM, ""),
        ("nul in body", f"event=X&auth[access_token]={T[24]}&x=%00".encode(), FORM, ""),
        # found by a break test (odd spellings against the fast form decoder)
        ("append past the largest index in auth", (
            f"event=X&auth[9223372036854775807]=1&auth[][access_token]={T[47]}&x=%FF").encode(),
         FORM, ""),
        ("late invalid utf8 after many keys", (
            f"event=X&auth[application_token]={T[48]}&"
            + "&".join(f"k{i}x[q]=v" for i in range(150)) + "&z=%FF").encode(), FORM, ""),
        ("lower-case escapes in a mixed-case key", (
            f"event=X&auth%5bAccess%5FToken%5d={T[49]}&x=%c3").encode(), FORM, ""),
        ("deep json", ('{"auth":{"access_token":"' + T[25] + '"},"d":' + "[" * 400
                       + "]" * 400 + "}").encode(), JSON, ""),
    ]


def accepted_shapes() -> list[tuple[str, bytes]]:
    """Genuine deliveries carrying tokens where no known secret name is (stored minus them)."""
    return [
        ("unknown auth field", forge("onimbotdelete-1", x_token=T[30])),
        ("auth list inside data", sample("onimbotmessageadd-1")
         + f"&data[BOT][567][AUTH][weird][]={T[31]}&data[bot][auth]={T[32]}".encode()),
        ("mangled secret name", sample("onimbotjoinchat-1")
         + f"&data[PARAMS][bot.refresh_token]={T[33]}".encode()),
        # found by a break test: camelCase names, and a key that carries the value itself
        ("camelCase secret names", sample("onimbotmessageupdate-1")
         + f"&data[PARAMS][accessToken]={T[38]}&data[PARAMS][ApplicationToken]={T[35]}"
           f"&data[PARAMS][Refresh-Token]={T[36]}".encode()),
        ("odd spellings", sample("onimbotdelete-1")
         + (f"&data[BOT][567][AUTH][+]={T[40]}&data[PARAMS][%EF%BD%81ccess_token]={T[41]}"
            f"&data[PARAMS][acce%C5%BFs_token]={T[42]}&data[COMMAND][7][refresh_token2]={T[43]}"
            f"&data[PARAMS][application_token][x]={T[44]}&data[PARAMS][sess%69d]={T[45]}"
            f"&data[PARAMS][client%5Fsecret]=%5Cx41{T[46]}%5C&data[PARAMS][NOTE]=odd").encode()),
        ("secret inside a key", sample("onimbotmessagedelete-1")
         + f"&data[PARAMS][access_token {T[37]}]=1".encode()),
    ]


async def send(client: Client, body: bytes, content_type: str, query: str) -> str:
    response = await client.post("/bitrix24/events" + (f"?{query}" if query else ""),
                                 data=body, headers={"Content-Type": content_type})
    text = await response.text()
    assert response.status < 500, text
    return text


async def test_no_token_of_any_shape_reaches_the_database_the_spool_the_log_or_an_answer(
    make_client: ClientFactory,
    outage: Any,
    database: Database,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    relay, settings_for = outage
    settings: Settings = settings_for(max_body_bytes=8192, max_form_fields=200)
    client: Client = await make_client(settings)
    await install_sample_portal(client)
    answers: list[str] = []
    for _, body, content_type, query in shapes():
        answers.append(await send(client, body, content_type, query))
    for name, body in accepted_shapes():
        answers.append(await send(client, body, FORM, ""))
        assert '"stored"' in answers[-1], (name, answers[-1])

    await relay.cut()  # the same, during an outage: rejections and deliveries are spooled
    for _, body, content_type, query in shapes():
        answers.append(await send(client, body, content_type, query))
    for _, body in accepted_shapes():
        answers.append(await send(client, body, FORM, f"sessid={T[34]}"))
    spool_files = [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    spooled = b"".join(p.read_bytes() for p in spool_files)
    assert {p.stat().st_mode & 0o777 for p in spool_files if p.name == "spool.log"} == {0o600}
    assert b"ONIMBOTDELETE" in spooled  # the spool was written: the search below means something
    await relay.start()
    await drained(client)

    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    headers = await bearer(client)
    for path in ["/portals", "/bots", "/deletions", "/verification",
                 f"/portals/{MEMBER_ID}/bots/567", "/events?payload=true&limit=1000"]:
        response = await client.get(f"/api/v1{path}", headers=headers)
        assert response.status == 200
        answers.append(await response.text())

    process = await asyncio.create_subprocess_exec(
        _pg_dump(), "--no-owner", database.admin_dsn, stdout=asyncio.subprocess.PIPE
    )
    dump, _ = await process.communicate()
    assert process.returncode == 0
    assert b"ONIMBOTMESSAGEADD" in dump
    logged = "\n".join(
        r.getMessage() for r in caplog.records if r.name != "aiohttp.access"  # serve: off
    )
    places = {"pg_dump": dump.decode(), "spool": spooled.decode("utf-8", "replace"),
              "log": logged, "answers": "\n".join(answers)}
    leaks = {(place, token) for place, text in places.items() for token in [*T, TOKEN]
             if token in text}
    assert leaks == set()
