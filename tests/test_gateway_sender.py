"""The forwarder's HTTP client against hostile destinations of our own (raw sockets on
127.0.0.1): a forward counts as delivered only on a complete 2xx status line; everything else is
an error that fails the attempt (and the forwarder retries), never an exception out of `post`,
never unbounded memory, never a hang past the timeout."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ledger.gateway.sender import BODY_MAX, HEAD_MAX, Answer, Sender, Target
from tests.gateway_helpers import eventually

Handler = Callable[["Raw", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEADERS = [("Content-Type", "application/x-www-form-urlencoded"), ("X-Ledger-Position", "7")]


class Raw:
    """A destination speaking raw bytes: `handler(self, reader, writer, connection number)`; what
    each request looked like (head, body) is kept."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        self.requests.append((head, await reader.readexactly(length)))
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.handler(self, reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def target(self, scheme: str = "http") -> Target:
        return Target.of(f"{scheme}://127.0.0.1:{self.port}/bot/handler")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[Raw]]]:
    made: list[Raw] = []

    async def make(handler: Handler) -> Raw:
        server = Raw(handler)
        await server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        await server.stop()


def answering(answer: bytes, *, close: bool = False) -> Handler:
    async def handler(
        server: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, _: int
    ) -> None:
        while await server.read_request(r):
            w.write(answer)
            await w.drain()
            if close:
                return
    return handler


async def keep_alive_server(make: Callable[[Handler], Awaitable[Raw]], answer: bytes) -> Raw:
    return await make(answering(answer))


async def test_a_forward_is_sent_as_given_and_the_connection_kept_for_the_next(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    server = await keep_alive_server(raw, OK)
    sender = Sender(timeout=5)
    first = await sender.post(server.target(), "?a=b%20c", HEADERS, b"x=1")
    second = await sender.post(server.target(), "", HEADERS, b"x=2")
    assert (first, second) == (Answer(200, None), Answer(200, None))
    assert server.connections == 1
    head, _ = server.requests[0]
    assert head.startswith(b"POST /bot/handler?a=b%20c HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in head
    assert b"\r\nContent-Type: application/x-www-form-urlencoded\r\n" in head
    assert b"\r\nX-Ledger-Position: 7\r\n" in head
    assert [b for _, b in server.requests] == [b"x=1", b"x=2"]
    await sender.close()


async def test_chunked_answers_and_interim_ones_are_read_to_their_end(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    answer = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    server = await keep_alive_server(raw, answer)
    sender = Sender(timeout=5)
    answers = [await sender.post(server.target(), "", HEADERS, b"x") for _ in range(3)]
    assert answers == [Answer(202, None)] * 3
    assert server.connections == 1  # each answer read to its end: the connection went on
    await sender.close()


@pytest.mark.parametrize(("answer", "error"), [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (HEAD_MAX + 10), "head exceeds"),
    (b"SMTP ready\r\n\r\n", "not HTTP/1.x"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
    (b"HTTP/1.1 20", "closed"),  # then the connection ends mid-status line
])
async def test_a_malformed_answer_fails_the_attempt(
    raw: Callable[[Handler], Awaitable[Raw]], answer: bytes, error: str,
) -> None:
    server = await raw(answering(answer, close=True))
    sender = Sender(timeout=5)
    result = await sender.post(server.target(), "", HEADERS, b"x")
    assert result.status is None
    assert result.error is not None
    assert error in result.error
    await sender.close()


async def test_a_huge_answer_body_is_not_read_but_the_status_counts(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"z" * (4 * BODY_MAX)
    server = await keep_alive_server(raw, huge)
    sender = Sender(timeout=5)
    assert await sender.post(server.target(), "", HEADERS, b"x") == Answer(200, None)
    assert await sender.post(server.target(), "", HEADERS, b"y") == Answer(200, None)
    assert server.connections == 2  # the first was closed, not drained
    await sender.close()


async def test_a_destination_that_never_answers_times_out(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    async def silent(
        _: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, __: int
    ) -> None:
        w.write(b"HTTP/1.1 200 OK\r\n")  # slow headers: the rest never comes
        await w.drain()
        await asyncio.Event().wait()

    server = await raw(silent)
    sender = Sender(timeout=0.3)
    async with asyncio.timeout(5):
        answer = await sender.post(server.target(), "", HEADERS, b"x")
    assert answer.status is None
    assert answer.error is not None
    assert answer.error.startswith("TimeoutError")
    await sender.close()


async def test_a_reset_before_any_answer_is_an_error_never_a_delivery(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    async def reset(
        server: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, _: int
    ) -> None:
        await server.read_request(r)
        w.transport.abort()

    server = await raw(reset)
    sender = Sender(timeout=5)
    answer = await sender.post(server.target(), "", HEADERS, b"x")
    assert answer.status is None
    assert answer.error is not None
    assert server.connections == 1  # a new connection failing is not sent again here
    await sender.close()


async def test_a_kept_alive_connection_closed_by_the_destination_is_not_a_lost_forward(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    """The destination answers, keeps the connection — then closes it: idle (noticed when the
    connection is taken), or just as the next request crosses it (nothing of an answer came:
    sent again on a new connection)."""
    async def closes(
        server: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        await server.read_request(r)
        w.write(OK)
        await w.drain()
        if n == 1:
            return  # closed while idle
        if n == 2 and await server.read_request(r):
            return  # closed as the next request arrived, unanswered
        while await server.read_request(r):
            w.write(OK)
            await w.drain()

    server = await raw(closes)
    sender = Sender(timeout=5)
    assert await sender.post(server.target(), "", HEADERS, b"1") == Answer(200, None)
    await eventually(lambda: all(c.ended for p in sender._pools.values() for c in p.idle))
    assert await sender.post(server.target(), "", HEADERS, b"2") == Answer(200, None)
    assert await sender.post(server.target(), "", HEADERS, b"3") == Answer(200, None)
    assert [b for _, b in server.requests] == [b"1", b"2", b"3", b"3"]  # at least once
    assert server.connections == 3
    await sender.close()


async def test_a_header_that_would_split_the_request_is_refused_before_sending(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    server = await keep_alive_server(raw, OK)
    sender = Sender(timeout=5)
    answer = await sender.post(server.target(), "", [("Content-Type", "a\r\nX-Evil: 1")], b"x")
    assert answer.status is None
    assert answer.error is not None
    assert "forbids" in answer.error
    assert server.requests == []
    await sender.close()


async def test_tls_certificates_are_verified(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(1)
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = Raw(answering(OK))
    await server.start(tls=context)
    sender = Sender(timeout=5)
    try:
        answer = await sender.post(server.target("https"), "", HEADERS, b"x")
        assert answer.status is None
        assert answer.error is not None
        assert "CERTIFICATE_VERIFY_FAILED" in answer.error  # self-signed: refused
        assert server.requests == []
    finally:
        await sender.close()
        await server.stop()


def test_targets() -> None:
    assert Target.of("https://bot.example/h") == Target(True, "bot.example", 443,
                                                        "bot.example", "/h")
    assert Target.of("http://[::1]:8080") == Target(False, "::1", 8080, "[::1]:8080", "/")
    assert Target.of("https://bücher.example/ä b").path == "/%C3%A4%20b"
    assert Target.of("https://bücher.example/").host == "xn--bcher-kva.example"


async def test_an_answer_whose_body_never_ends_still_counts_by_its_status(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    """The head said 202 and then the body stalled: delivered (the destination answered), the
    connection closed rather than reused."""
    async def stalls(
        server: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, _: int
    ) -> None:
        while await server.read_request(r):
            w.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 10\r\n\r\nabc")
            await w.drain()

    server = await raw(stalls)
    sender = Sender(timeout=0.3)
    assert await sender.post(server.target(), "", HEADERS, b"x") == Answer(202, None)
    assert await sender.post(server.target(), "", HEADERS, b"y") == Answer(202, None)
    assert server.connections == 2
    await sender.close()


async def test_bytes_beyond_an_answer_end_the_connection(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    """A destination that sends a second, unasked answer behind the first cannot have it
    taken for the next forward's."""
    server = await keep_alive_server(raw, OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    sender = Sender(timeout=5)
    assert await sender.post(server.target(), "", HEADERS, b"x") == Answer(200, None)
    assert await sender.post(server.target(), "", HEADERS, b"y") == Answer(200, None)
    assert server.connections == 2
    await sender.close()


async def test_a_chunk_size_int_would_take_but_http_does_not_ends_the_connection(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    """`0x2` (or `-0`, `1_0`) is no chunk size (RFC 9112 7.1: hex digits only), though Python's
    `int(…, 16)` reads it: the status counts, the connection is not trusted for another."""
    server = await keep_alive_server(raw, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"0x2\r\nok\r\n0\r\n\r\n")
    sender = Sender(timeout=5)
    assert await sender.post(server.target(), "", HEADERS, b"x") == Answer(200, None)
    assert await sender.post(server.target(), "", HEADERS, b"y") == Answer(200, None)
    assert server.connections == 2
    await sender.close()


async def test_what_a_delivery_carried_never_raises_out_of_post(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    """A query string byte that was not UTF-8 (a surrogate escape) goes as that byte,
    percent-encoded; a lone surrogate fails the attempt (an error, nothing sent) instead of
    raising into the forwarder's lane."""
    server = await keep_alive_server(raw, OK)
    sender = Sender(timeout=5)
    assert await sender.post(server.target(), "?a=\udcff", HEADERS, b"x") == Answer(200, None)
    assert server.requests[0][0].startswith(b"POST /bot/handler?a=%FF HTTP/1.1\r\n")
    for suffix, headers in [("?a=\ud800", HEADERS), ("", [("Content-Type", "a\ud800")])]:
        answer = await sender.post(server.target(), suffix, headers, b"y")
        assert answer.status is None
        assert (answer.error or "").startswith("UnicodeEncodeError")
    assert len(server.requests) == 1
    await sender.close()


async def test_connections_idle_too_long_are_closed_even_if_never_used_again(
    raw: Callable[[Handler], Awaitable[Raw]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A destination no longer posted to (its route removed) would otherwise keep its
    kept-alive connection open for as long as the forwarder runs."""
    ended = asyncio.Event()

    async def keeps_alive(
        server: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, _: int
    ) -> None:
        await answering(OK)(server, r, w, _)
        ended.set()  # read_request saw the end: the sender closed the connection

    server = await raw(keeps_alive)
    sender = Sender(timeout=5)
    assert await sender.post(server.target(), "", HEADERS, b"x") == Answer(200, None)
    sender.sweep()  # not idle long enough yet: kept
    assert await sender.post(server.target(), "", HEADERS, b"y") == Answer(200, None)
    assert server.connections == 1
    assert not ended.is_set()
    monkeypatch.setattr("ledger.gateway.sender.IDLE_SECONDS", 0.0)
    sender.sweep()
    async with asyncio.timeout(5):
        await ended.wait()
    assert await sender.post(server.target(), "", HEADERS, b"z") == Answer(200, None)
    assert server.connections == 2
    await sender.close()
