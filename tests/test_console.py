"""The auditor's console over HTTP: sessions, pages, hostile input, downloads and manifests."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from typing import Any

import orjson
import pytest

from ledger.audit import new_token
from ledger.console.app import COOKIE, CSP, SESSIONS
from ledger.storage.audit_store import AuditStore
from ledger.web import STORE
from tests.conftest import DOMAIN, MEMBER_ID, sample
from tests.helpers import PROJECTOR, Client, install_sample_portal, post

DELETED_AT = "2026-02-26T07:19:23Z"  # ts 1772090363 of the sample ONIMBOTDELETE
PAGES = ["/console/", "/console/bots", "/console/deletions", "/console/events",
         "/console/rejections", "/console/events/1",
         f"/console/portals/{MEMBER_ID}/bots/567", "/console/download/bots.csv?as_of=1"]


async def make_token(client: Client, name: str = "auditor") -> str:
    assert client.app is not None
    token, digest = new_token()
    await AuditStore(client.app[STORE].pool).create_token(name, digest, "test")
    return token


async def sign_in(client: Client, token: str) -> Any:
    return await client.post("/console/sign-in", data={"token": token, "next": "/console/"},
                             allow_redirects=False)


async def page(client: Client, path: str, status: int = 200) -> str:
    response = await client.get(path, allow_redirects=False)
    text = await response.text()
    assert response.status == status, text
    return text


@pytest.fixture
async def history(client: Client) -> Client:
    """The sample portal: bot 567 talks with user 27 (named Svetlana Ivanova), then user 27
    deletes it; a message whose text is markup, to check escaping."""
    await install_sample_portal(client)
    hostile = sample("onimbotmessageadd-2").replace(
        b"MESSAGE%5D=", b"MESSAGE%5D=%3Cscript%3Ealert(1)%3C%2Fscript%3E", 1)
    for body in [sample("onimbotjoinchat-1"), sample("onimbotmessageadd-1"), hostile,
                 sample("onimbotdelete-1")]:
        assert (await post(client, body))[0] == 200
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    return client


@pytest.fixture
async def signed_in(history: Client) -> Client:
    response = await sign_in(history, await make_token(history))
    assert response.status == 303
    assert response.headers["Location"] == "/console/"
    return history


@pytest.mark.parametrize("path", PAGES)
async def test_without_a_session_every_page_redirects_to_sign_in(
    history: Client, path: str
) -> None:
    response = await history.get(path, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"].startswith("/console/sign-in?next=")


async def test_a_wrong_token_is_refused(history: Client) -> None:
    response = await sign_in(history, "lgr_" + "x" * 43)
    assert response.status == 401
    assert "not valid" in await response.text()
    assert COOKIE not in response.cookies
    assert (await sign_in(history, "<script>")).status == 400


async def test_the_session_cookie_is_httponly_and_samesite_strict(history: Client) -> None:
    response = await sign_in(history, await make_token(history))
    morsel = response.cookies[COOKIE]
    assert morsel["httponly"]
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/console/"


async def test_a_revoked_token_ends_the_session(signed_in: Client) -> None:
    assert signed_in.app is not None
    await page(signed_in, "/console/")
    await AuditStore(signed_in.app[STORE].pool).revoke_token("auditor", "test")
    sessions = next(a for a in signed_in.app._subapps if SESSIONS in a)[SESSIONS]
    for digest in sessions:  # the cache window (the API's TOKEN_CACHE_SECONDS) has passed
        sessions[digest] = 0.0
    response = await signed_in.get("/console/bots", allow_redirects=False)
    assert response.status == 303
    assert "ended=1" in response.headers["Location"]
    assert response.cookies[COOKIE].value == ""


async def test_sign_out_needs_the_pages_csrf_value(signed_in: Client) -> None:
    overview = await page(signed_in, "/console/")
    refused = await signed_in.post("/console/sign-out", data={"csrf": "forged"},
                                   allow_redirects=False)
    assert refused.status == 403
    foreign = await signed_in.post("/console/sign-out", data={"csrf": "x"},
                                   headers={"Origin": "https://evil.example"},
                                   allow_redirects=False)
    assert foreign.status == 403
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', overview)
    assert found
    response = await signed_in.post("/console/sign-out", data={"csrf": found.group(1)},
                                    allow_redirects=False)
    assert response.status == 303
    assert response.cookies[COOKIE].value == ""


async def test_every_page_sends_a_strict_content_security_policy(signed_in: Client) -> None:
    for path in [*PAGES[:-1], "/console/sign-in"]:
        response = await signed_in.get(path, allow_redirects=False)
        assert response.headers["Content-Security-Policy"] == CSP, path
        assert "unsafe-inline" not in CSP
        assert "script-src" not in CSP
        assert response.headers["X-Frame-Options"] == "DENY"


async def test_the_deletion_timeline_names_the_deleting_user(signed_in: Client) -> None:
    text = await page(signed_in, "/console/deletions")
    # sender text, each piece in its own bidi isolate (test_console_browser: an override)
    assert "user <bdi>27</bdi> — <strong><bdi>Svetlana Ivanova</bdi></strong>" in text
    assert DELETED_AT in text
    assert DOMAIN in text
    assert "bot deleted" in text


async def test_the_registry_shows_the_bot_deleted_now_and_active_as_of_earlier(
    signed_in: Client,
) -> None:
    now = await page(signed_in, f"/console/bots?portal={DOMAIN}&status=deleted")
    assert ">567 (<bdi>BOT</bdi>)</a>" in now or ">567</a>" in now
    assert "state-deleted" in now
    assert DELETED_AT in now
    deleted_at = int(re.findall(r'/console/events/(\d+)">#', now.split("/bots/567")[1])[-1])
    earlier = await page(signed_in, f"/console/bots?portal={DOMAIN}&as_of={deleted_at - 1}")
    row = earlier.split("/bots/567")[1].split("</tr>")[0]
    assert "state-active" in row


async def test_a_bots_page_lists_its_events_with_positions_and_fingerprints(
    signed_in: Client,
) -> None:
    text = await page(signed_in, f"/console/portals/{MEMBER_ID}/bots/567?order=oldest")
    positions = [int(p) for p in re.findall(r'href="/console/events/(\d+)">#', text)]
    assert len(positions) >= 4  # message, message, delete (and links to them)
    assert "[secret removed; fingerprint " in text
    assert "831c76b092f9f135d9b6b36c3a720757" not in text
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(1)" in text


@pytest.mark.parametrize("path", [
    "/console/bots?status=gone", "/console/bots?as_of=yesterday", "/console/bots?cursor=x",
    "/console/bots?portal=%3Cb%3E", "/console/bots?as_of=1&as_of=2",
    "/console/bots?as_of=99999999999999999999999", "/console/events?bot=-1",
    "/console/events?limit=100000", "/console/events?from=soon", "/console/events?type=%00",
    "/console/deletions?cursor=1:x", "/console/rejections?cursor=%F0%9F%92%A9",
    "/console/events?portal=" + "a" * 500, "/console/download/bots.csv",
    "/console/download/events.csv?up_to=x",
])
async def test_hostile_input_is_a_4xx_never_a_500(signed_in: Client, path: str) -> None:
    response = await signed_in.get(path, allow_redirects=False)
    assert 400 <= response.status < 500, (path, response.status)
    assert "text/html" in response.headers["Content-Type"]


@pytest.mark.parametrize("path", [
    "/console/events/999999", "/console/events/abc", "/console/portals/x/bots/1",
    "/console/portals/x/bots/abc", "/console/download/secrets.csv",
])
async def test_what_does_not_exist_is_a_404_page(signed_in: Client, path: str) -> None:
    await page(signed_in, path, 404)


async def test_a_table_downloads_as_csv_whose_manifest_hash_recomputes(
    signed_in: Client,
) -> None:
    text = await page(signed_in, "/console/deletions")
    link = re.search(r'href="(/console/download/deletions\.csv\?[^"]+)"', text)
    assert link
    href = link.group(1).replace("&amp;", "&")
    response = await signed_in.get(href)
    assert response.status == 200
    body = await response.read()
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert rows[0]["bot_id"] == "567"
    assert rows[0]["deleted_by_name"] == "Svetlana Ivanova"
    assert rows[0]["deleted_at"] == DELETED_AT
    manifest = await (await signed_in.get(href + "&manifest=1")).json()
    assert manifest["file_sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["rows"] == len(rows)


async def test_events_download_is_pinned_to_the_head_the_page_saw(signed_in: Client) -> None:
    text = await page(signed_in, "/console/events")
    href = re.search(r'href="(/console/download/events\.jsonl\?[^"]+)"', text)
    assert href
    link = href.group(1).replace("&amp;", "&")
    before = await (await signed_in.get(link)).read()
    assert (await post(signed_in, sample("onimbotjoinchat-2")))[0] == 200
    after = await (await signed_in.get(link)).read()
    assert before == after
    assert before.count(b"\n") == 7
    first = orjson.loads(before.splitlines()[0])
    assert first["received_at"].endswith("Z")  # one time format: ISO 8601 UTC with a Z


async def test_the_console_is_found_without_its_trailing_slash(history: Client) -> None:
    response = await history.get("/console", allow_redirects=False)
    assert response.status in (301, 302, 303, 307, 308)
    assert response.headers["Location"].startswith("/console/")


async def test_as_of_a_bitrix24_time_before_the_deletion_shows_the_bot_active(
    signed_in: Client,
) -> None:
    text = await page(signed_in, f"/console/bots?portal={DOMAIN}&as_of=ts:2026-02-26T07:00:00Z")
    assert "everything that happened (Bitrix24 time) by 2026-02-26T07:00:00Z" in text
    row = text.split("/bots/567")[1].split("</tr>")[0]
    assert "state-active" in row
    link = re.search(r'href="(/console/download/bots\.csv\?[^"]+)"', text)
    assert link
    assert "as_of=ts%3A2026-02-26T07%3A00%3A00Z" in link.group(1)


@pytest.mark.parametrize("next_path", ["/console/events\n", "/console/\r\nX-Evil: 1",
                                       "/console/bots%0A", "https://evil.example/console/"])
async def test_sign_in_with_a_hostile_next_lands_on_the_overview(
    client: Client, next_path: str
) -> None:
    """Found by a break test: a trailing newline passed the check and the answer was lost."""
    token = await make_token(client)
    response = await client.post("/console/sign-in", data={"token": token, "next": next_path},
                                 allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/console/"


async def test_a_deletion_whose_payload_the_registry_could_not_use_says_so(
    client: Client,
) -> None:
    """The API flags such a deletion `unexpected_payload`; the console's timeline (live and
    as of a moment) and its download say so in words too, never "none"."""
    await install_sample_portal(client)
    poisoned = sample("onimbotdelete-1") + b"&data%5BBOT%5D%5B%C2%B2%5D%5BBOT_CODE%5D=x"
    assert (await post(client, sample("onimbotmessageadd-1")))[0] == 200
    status, stored = await post(client, poisoned)
    assert status == 200, stored
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    assert (await sign_in(client, await make_token(client))).status == 303
    pinned = f"as_of=position:{stored['position']}"
    for path in ["/console/deletions", f"/console/deletions?{pinned}"]:
        text = await page(client, path)
        assert "could not use" in text, path
        assert "not a bot id" in text, path
    text = await (await client.get(f"/console/download/deletions.csv?{pinned}")).text()
    (row,) = csv.DictReader(io.StringIO(text))
    assert "could not use" in row["anomalies"]


async def test_a_download_past_its_byte_limit_is_refused_naming_ledger_export(
    make_client: Any, settings_factory: Any,
) -> None:
    """A console download is spooled to a temporary file before it is sent: past
    `console_download_max_bytes` it is refused (400, saying to use `ledger export events`), its
    manifest too, rather than filling /tmp; a download within the limit is served."""
    client = await make_client(settings_factory(console_download_max_bytes=1000))
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
    assert (await sign_in(client, await make_token(client))).status == 303
    text = await page(client, "/console/events")
    href = re.search(r'href="(/console/download/events\.jsonl\?[^"]+)"', text)
    assert href
    link = href.group(1).replace("&amp;", "&")
    for asked in (link, link + "&manifest=1"):
        refused = await client.get(asked)
        assert refused.status == 400, asked
        body = await refused.text()
        assert "larger than the console&#39;s limit of 1000 bytes" in body \
            or "larger than the console's limit of 1000 bytes" in body, body
        assert "ledger export events" in body
    served = await client.get(link + "&type=ONIMBOTNOTHING")
    assert served.status == 200
    assert await served.read() == b""
