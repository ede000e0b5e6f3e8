"""Hostile input: whatever arrives, the answer is a clear 4xx — never a 5xx, never a crash."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import wire
from ledger.errors import DeliveryRejected
from tests.conftest import FORM, sample
from tests.helpers import Client, install_sample_portal, post

LIMITS = {"max_fields": 1000, "max_nesting": 32}
form_keys = st.text(alphabet="ab[]. _%+=&\x00é", max_size=20)
form_bodies = st.lists(
    st.tuples(form_keys, st.text(max_size=20)), max_size=30
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass"))


@given(st.binary(max_size=2000) | form_bodies)
@settings(max_examples=2000, deadline=None)
def test_the_decoder_either_decodes_or_refuses_with_a_reason(body: bytes) -> None:
    result = _decode(body)
    if isinstance(result, DeliveryRejected):
        assert 400 <= result.status < 500
        assert result.code
    else:
        assert isinstance(result, dict)


def _decode(body: bytes) -> dict[str, Any] | DeliveryRejected:
    try:
        return wire.parse_php_form(body, **LIMITS)
    except DeliveryRejected as rejected:
        return rejected


@given(st.integers(min_value=33, max_value=200))
@settings(max_examples=20, deadline=None)
def test_deep_nesting_is_refused(depth: int) -> None:
    with pytest.raises(DeliveryRejected) as caught:
        wire.parse_php_form(b"a" + b"[x]" * depth + b"=1", **LIMITS)
    assert caught.value.code == "too_deep"


async def test_arbitrary_bodies_never_get_a_5xx(client: Client) -> None:
    await install_sample_portal(client)
    strategy = st.tuples(
        st.binary(max_size=3000) | form_bodies | st.just(sample("onimbotdelete-1")),
        st.sampled_from([FORM, "application/json", "text/plain", "", "multipart/form-data"]),
    )
    examples: list[tuple[bytes, str]] = []

    @given(strategy)
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    def collect(example: tuple[bytes, str]) -> None:
        examples.append(example)

    collect()
    for body, content_type in examples:
        response = await client.post("/bitrix24/events", data=body,
                                     headers={"Content-Type": content_type})
        assert response.status < 500, (body[:200], response.status)
        if response.status >= 400:
            assert (await response.json())["error"]
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200  # still serving


async def test_a_chunked_body_over_the_limit_is_refused(client: Client) -> None:
    async def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    response = await client.post("/bitrix24/events", data=chunks(),
                                 headers={"Content-Type": FORM})
    assert response.status == 413


async def test_a_slow_client_gets_408(make_client: Any, settings_factory: Any) -> None:
    client = await make_client(settings_factory(body_timeout_seconds=0.3))
    stalled = asyncio.Event()

    async def trickle() -> Any:
        yield b"event=ONIMBOTDELETE&"
        await stalled.wait()  # never sends the rest (released at teardown)

    task = asyncio.create_task(client.post("/bitrix24/events", data=trickle(),
                                           headers={"Content-Type": FORM}))
    async with asyncio.timeout(10):
        response = await asyncio.shield(task)
    assert response.status == 408
    stalled.set()


async def test_a_body_shorter_than_its_content_length_gets_408(
    make_client: Any, settings_factory: Any
) -> None:
    """The headers came with part of the body: the rest is waited for within the time limit
    (a body that arrived whole with its headers is read without a timer)."""
    client = await make_client(settings_factory(body_timeout_seconds=0.3))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /bitrix24/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                 b"Content-Type: " + FORM.encode() + b"\r\n\r\nevent=ONIM")
    await writer.drain()
    async with asyncio.timeout(10):
        status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert status_line.split(b" ", 2)[1] == b"408", status_line


async def raw_post(client: Client, target: bytes, headers: list[bytes], body: bytes) -> int:
    """One request written byte for byte (clients refuse to send such headers); its status."""
    status, _ = await raw_request(client, b"POST", target, headers, body)
    return status


async def raw_get(client: Client, target: bytes, headers: list[bytes]) -> tuple[int, bytes]:
    return await raw_request(client, b"GET", target, headers, b"")


async def raw_request(
    client: Client, method: bytes, target: bytes, headers: list[bytes], body: bytes
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = [method + b" " + target + b" HTTP/1.1", b"Host: x", b"Connection: close",
            b"Content-Length: " + str(len(body)).encode(), *headers]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    status = int(answer.split(b" ", 2)[1])
    top, _, content = answer.partition(b"\r\n\r\n")
    # aiohttp's own HTTP parser refuses malformed requests (too long, bytes not allowed in a
    # URL) in text before the application sees them: nothing is recorded then
    if status >= 400 and not top.startswith(b"HTTP/1.0 400"):
        assert content.startswith(b"{"), answer[:300]
    return status, content


async def genuine_is_stored_within_a_second(client: Client, message_id: int) -> None:
    document = wire.parse_php_form(sample("onimbotmessageadd-1"), max_fields=999, max_nesting=9)
    document["data"]["PARAMS"]["MESSAGE_ID"] = str(message_id)
    async with asyncio.timeout(1):
        status, answer = await post(client, wire.http_build_query(document))
    assert (status, answer["status"]) == (200, "stored"), answer


HEADER_SHAPES = [
    [b"Content-Type: application/x-www-form-urlencoded\xff"],
    [b"Content-Type: application/x-www-form-urlencoded" + bytes(range(0x80, 0x100))],
    [b"Content-Type: application/json\x80"],
    [b"Content-Type: " + b"\xe9" * 8000],
    [b"Content-Type: application/x-www-form-urlencoded", b"X-Anything: \xff\xfe"],
    [b"Content-Type: application/x-www-form-urlencoded; charset=\xed\xa0\x80"],
    [b"Content-Type: application/x-www-form-urlencoded", b"X-Long: " + b"a" * 100_000],
    [b"Content-Type: application/x-www-form-urlencoded\x00"],
    [b"Content-Type: application/x-www-form-urlencoded", b"X-Nul: a\x00b"],
]


async def test_undecodable_headers_are_refused_or_escaped_and_intake_goes_on(
    client: Client,
) -> None:
    await install_sample_portal(client)
    for n, headers in enumerate(HEADER_SHAPES):
        status = await raw_post(client, b"/bitrix24/events", headers, sample("onimbotdelete-1"))
        assert status < 500, headers  # 415 for a content type not ours; other headers: ignored
        await genuine_is_stored_within_a_second(client, 100 + n)


QUERY_SHAPES = [
    b"/bitrix24/events?CLIENT_ID=\xff\xfe", b"/bitrix24/events?a=%ED%A0%80",
    b"/bitrix24/events?x=%00", b"/bitrix24/events?\xed\xa0\x80=1", b"/bitrix24/events?a=%FF",
]


async def test_undecodable_query_strings_get_a_4xx_and_intake_goes_on(client: Client) -> None:
    await install_sample_portal(client)
    for n, target in enumerate(QUERY_SHAPES):
        status = await raw_post(client, target, [b"Content-Type: " + FORM.encode()],
                                sample("onimbotdelete-1"))
        assert 400 <= status < 500, target
        await genuine_is_stored_within_a_second(client, 200 + n)


async def test_an_escaped_content_type_is_recorded_as_text(client: Client, admin: Any) -> None:
    status = await raw_post(client, b"/bitrix24/events",
                            [b"Content-Type: application/x-www-form-urlencoded\xff\xfe"], b"x=1")
    assert status == 415
    recorded = await admin.fetchval("SELECT content_type FROM ledger.rejections")
    assert recorded == "application/x-www-form-urlencoded\\xff\\xfe"


WORST_BODIES = {
    "json 330 deep": (b'{"a":' + b"[" * 330 + b"]" * 330 + b"}", "application/json"),
    "json 100k deep": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    "json 100k keys": (b"{" + b",".join(b'"k%d":1' % i for i in range(100_000)) + b"}",
                       "application/json"),
    "unique deep keys": ("&".join(
        f"k{i}" + "".join(f"[s{j}]" for j in range(30)) + "=1" for i in range(5000)
    ).encode(), FORM),
    "appends": ("&".join("a" + "[]" * 31 + "=1" for _ in range(9000)).encode(), FORM),
    "one long key": (b"k" * 900_000 + b"=1", FORM),
    "bracket key": (b"a" + b"[]" * 400_000 + b"=1", FORM),
}


async def test_worst_case_bodies_are_refused_and_intake_goes_on(client: Client) -> None:
    await install_sample_portal(client)
    for n, (name, (body, content_type)) in enumerate(WORST_BODIES.items()):
        response = await client.post("/bitrix24/events", data=io.BytesIO(body),
                                     headers={"Content-Type": content_type})
        assert 400 <= response.status < 500, name
        assert (await response.json())["error"], name
        await genuine_is_stored_within_a_second(client, 300 + n)


def test_json_depth_is_measured_without_recursion() -> None:
    for depth in (330, 1000, 100_000):
        body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(DeliveryRejected) as caught:
            wire.parse_json(body, max_nesting=32)
        assert (caught.value.status, caught.value.code) == (400, "too_deep")


def test_the_bracket_budget_refuses_before_the_work_is_done() -> None:
    body = "&".join("a" + "[]" * 31 + "=1" for _ in range(9000)).encode()
    started = time.perf_counter()
    with pytest.raises(DeliveryRejected) as caught:
        wire.parse_php_form(body, max_fields=10_000, max_nesting=32)
    assert (caught.value.status, caught.value.code) == (413, "too_complex")
    assert time.perf_counter() - started < 1.0  # bounded: ~10k levels, not 280k


def test_distinct_long_keys_do_not_stay_in_memory() -> None:
    """600 bodies with distinct 1 MB keys (the RSS attack): the caches keep short keys only."""
    before = wire.cached_key_bytes()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for i in range(600):
            key = (b"%d" % i).ljust(1_000_000, b"k")
            wire.parse_php_form(key + b"=1", max_fields=10, max_nesting=4)
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained - baseline < 10_000_000  # without the bound: 600 MB
    assert wire.cached_key_bytes() - before <= 2 * 8192 * wire.CACHED_KEY_BYTES


async def test_a_refused_body_is_let_go_as_soon_as_it_is_answered(client: Client) -> None:
    """A refusal's traceback holds the frames it passed through, with the body and the fields
    decoded so far, and one of them holds the exception: a cycle only the cycle collector
    frees, and the service lets it wait for 10,000 new objects (~200 such bodies: 1.2 GiB
    peak against 133 MiB, bench/RESULTS.md). The collector is off here: what answering does
    not free stays."""
    body = b"&".join(b"k%d=v" % i for i in range(60_000))  # ~600 KB, too many fields

    async def refused(times: int) -> None:
        for _ in range(times):
            response = await client.post("/bitrix24/events", data=body,
                                         headers={"Content-Type": FORM})
            assert (response.status, (await response.json())["error"]) == (
                413, "too_many_fields")

    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        await refused(2)  # the decoder's key caches, the connection's buffers
        baseline, _ = tracemalloc.get_traced_memory()
        await refused(10)
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert retained - baseline < 2_000_000  # ~4.5 MB a body otherwise


@pytest.mark.parametrize(("encoding", "body"), [
    ("gzip", b"{}"), ("deflate", b"xx"), ("gzip", b"\x1f\x8b\x08garbage"),
])
async def test_a_body_the_http_layer_cannot_decompress_is_a_4xx_and_recorded(
    client: Client, admin: Any, encoding: str, body: bytes
) -> None:
    """Found by a break test: this was a 500 with a traceback, and never recorded."""
    await install_sample_portal(client)
    response = await client.post("/bitrix24/events", data=body, headers={
        "Content-Type": "application/json", "Content-Encoding": encoding})
    assert response.status == 400
    assert (await response.json())["error"] in ("malformed_body", "unsupported_media_type")
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.rejections WHERE reason = 'malformed_body'") >= 1
    await genuine_is_stored_within_a_second(client, 300)


@pytest.mark.parametrize(("encoding", "body"), [
    ("gzip", b"\x1f\x8b\x08garbage-and-more-garbage"), ("deflate", b"not deflate at all"),
    ("br", b"\xff\xfe not brotli"),
])
async def test_a_broken_compressed_body_is_answered_once_and_leaves_no_traceback(
    client: Client, caplog: pytest.LogCaptureFixture, encoding: str, body: bytes
) -> None:
    """Found in the last session: after the 400, aiohttp's keep-alive drain read the rest of the
    broken stream and logged an `Unhandled exception` traceback per request — log noise (and
    log volume) any sender could cause. The sender gets one answer, then the connection is
    closed, and no traceback is logged. (`br` without the Brotli package is refused by aiohttp's
    parser before the ledger sees it: a plain 400, logged as one line.)"""
    await install_sample_portal(client)
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            b"POST /bitrix24/events HTTP/1.1\r\nHost: ledger\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Encoding: " + encoding.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()  # to the server's close: the drain, if any, is over
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1:2] == [b"400"], answer[:200]
    assert answer.count(b"HTTP/1.") == 1
    if encoding != "br":
        assert b'"malformed_body"' in payload
        assert b"\r\nconnection: close" in head.lower()  # no drain of the broken stream
    noisy = [r for r in caplog.records
             if r.name == "aiohttp.server" and (r.levelno >= logging.WARNING or r.exc_info)]
    assert noisy == [], [r.getMessage() for r in noisy]
    await genuine_is_stored_within_a_second(client, 301)
