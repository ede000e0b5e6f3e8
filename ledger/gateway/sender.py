"""The forwarder's HTTP client: one POST per forward over kept-alive HTTP/1.1 connections.

Why not aiohttp's client (which the forwarder used first): per forward it cost ~120 µs of CPU
on asyncio's loop (~75 on uvloop), about five times this sender's, and the forwarder shares two
cores with the intake (bench.forwarder, bench/RESULTS.md); httpcore measured worse still. A
forward needs little of a general client: a POST with a `Content-Length` body, the answer's
status, and the answer read to its end only so that the connection can carry the next forward.

Rules it keeps (issue #16, "safe by default"): no proxy from the environment, no redirect
followed (a 3xx is an answer like any non-2xx), TLS verified against the system's CA store with
the host name checked, one timeout for the whole attempt (connect, send, answer). The answer is
hostile input: its head is bounded (`HEAD_MAX`), its body read up to `BODY_MAX` (a longer one
ends the connection instead), anything malformed ends the connection and fails the attempt.

A forward is delivered only when a complete status line with a 2xx arrived for it. A kept-alive
connection the destination closed meanwhile (it may close an idle one at any time) is noticed
when it is taken, or — if the close crosses the request — by the answer ending before its first
byte: then the request is sent again once on a new connection (at least once: the destination
dedups by `X-Ledger-Position`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import quote, urlsplit

from ledger.errors import DestinationAnswerInvalid as AnswerError

log = logging.getLogger(__name__)

HEAD_MAX = 64 * 1024  # bytes of an answer's status line and headers
BODY_MAX = 64 * 1024  # of an answer's body read (to reuse the connection); longer: closed
CONNECTIONS_MAX = 32  # per destination (host, port, scheme)
IDLE_SECONDS = 10.0  # a kept-alive connection unused longer is closed, not reused
_PAUSE_AT = HEAD_MAX + BODY_MAX  # buffered bytes at which reading from the socket pauses
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?")
_FIELD_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")  # no CR, LF, NUL, other controls
_HEX = b"0123456789abcdefABCDEF"
_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))  # left as they are in a target


@dataclass(frozen=True, slots=True)
class Answer:
    """An attempt's result: the destination's status, or why there is none."""

    status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Target:
    """A route's URL, parsed once."""

    tls: bool
    host: str  # to connect to (IDNA-encoded; an IPv6 address without brackets)
    port: int
    authority: str  # the Host header
    path: str

    @classmethod
    def of(cls, url: str) -> Target:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = (parts.hostname or "").encode("idna").decode("ascii")
        port = parts.port or (443 if tls else 80)
        shown = f"[{host}]" if ":" in host else host
        default = port == (443 if tls else 80)
        return cls(tls, host, port, shown if default else f"{shown}:{port}",
                   _printable(parts.path or "/"))


def _printable(text: str) -> str:
    """`text` with spaces, control characters and non-ASCII percent-encoded (UTF-8; a byte
    that was not UTF-8, kept as a surrogate escape, as that byte): what cannot go on a request
    line as it is; everything else stays as it was sent."""
    return text if text.isascii() and text.isprintable() and " " not in text else quote(
        text, safe=_PRINTABLE, errors="surrogateescape")


def _request(
    target: Target, suffix: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    """The request's bytes; the framing (request line, Host, Content-Length) is always ours.
    ValueError or UnicodeError (never a partial request) for what HTTP cannot carry."""
    return request_head(target, suffix, headers, len(body)) + b"\r\n" + body


def request_head(
    target: Target, suffix: str, headers: list[tuple[str, str]], length: int
) -> bytes:
    """A request's head up to (without) the empty line that ends it, for a body of `length`
    bytes: more header lines may follow (the forwarder adds the attempt's number to a head
    made once per forward). ValueError or UnicodeError for what HTTP cannot carry."""
    lines = [f"POST {target.path}{_printable(suffix)} HTTP/1.1\r\nHost: {target.authority}"
             f"\r\nContent-Length: {length}\r\n"]
    for name, value in headers:
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"header {name} has a character HTTP forbids")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection's bytes, for the coroutine that reads them."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()  # made by it: asked once, not per answer
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False  # closed, reset or half-closed by the destination
        self.error: BaseException | None = None
        self.busy = False  # an exchange is under way (bytes now are an answer)
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: a destination talking out of turn
            self.ended = True
            self.close()
            return
        self.buffer += data
        if len(self.buffer) > _PAUSE_AT and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def more(self) -> None:
        """Wait for more bytes (or the end)."""
        if self.ended:
            raise ConnectionResetError("the destination closed the connection") \
                from self.error
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.ended = True
        if self.transport is not None:
            self.transport.close()


@dataclass(slots=True)
class _Pool:
    idle: list[_Connection] = field(default_factory=list)
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONNECTIONS_MAX))
    users: int = 0  # posts under way (a pool in use is not forgotten)


class Sender:
    """Kept-alive connections per destination; `post` never raises for what a destination
    does (only for cancellation)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._pools: dict[tuple[bool, str, int], _Pool] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(
        self, target: Target, suffix: str, headers: list[tuple[str, str]], body: bytes
    ) -> Answer:
        """POST `body` to `target`'s path + `suffix` (a query string with its `?`, or "")
        with further `headers`: the answer's status, or the error that left none."""
        try:
            request = _request(target, suffix, headers, body)
        except (ValueError, UnicodeError) as exc:  # what a delivery carried cannot be sent
            return Answer(None, f"{type(exc).__name__}: {exc}")
        return await self.send(target, request)

    async def send(self, target: Target, request: bytes) -> Answer:
        """Send a whole request made by `request_head` (+ header lines, an empty line and the
        body) to `target`: the answer's status, or the error that left none."""
        key = (target.tls, target.host, target.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        seen: list[int] = []  # the status, as soon as the answer's head is in
        pool.users += 1
        # the attempt's one timeout: asyncio.timeout's logic, without its context manager
        # object (~3 µs a forward): cancel this task at the deadline, and tell that apart from
        # a cancellation from outside by the count `uncancel` leaves
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        cancelling = task.cancelling()
        expired: list[bool] = []
        timer = loop.call_later(self._timeout, _expire, task, expired)
        try:
            try:
                async with pool.slots:
                    status = await self._exchange(target, pool, request, seen)
            finally:
                timer.cancel()
                timed_out = bool(expired) and task.uncancel() <= cancelling
        except asyncio.CancelledError:
            if timed_out:
                return self._timed_out(seen)
            raise
        except TimeoutError:
            return self._timed_out(seen)
        except (OSError, AnswerError, ssl.SSLError, UnicodeError, ValueError) as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a defect here must fail the attempt, not end the lane
            log.exception("forward to %s:%d failed unexpectedly", target.host, target.port)
            return Answer(None, f"{type(exc).__name__}: {exc}")
        finally:
            pool.users -= 1
        return Answer(status, None)

    def _timed_out(self, seen: list[int]) -> Answer:
        if seen:  # answered; only its body was too slow (the connection is closed)
            return Answer(seen[-1], None)
        return Answer(None, f"TimeoutError: no answer within {self._timeout:g} s")

    async def _exchange(
        self, target: Target, pool: _Pool, request: bytes, seen: list[int]
    ) -> int:
        reused = self._idle(pool)
        connection = reused or await self._connect(target)
        try:
            try:
                return await self._round_trip(connection, pool, request, seen)
            except (ConnectionError, AnswerError) as exc:
                # a kept-alive connection closed by the destination as the request crossed it:
                # nothing of an answer arrived, so send it again on a new one (at least once)
                if reused is None or connection.buffer or not connection.ended \
                        or isinstance(exc, AnswerError):
                    raise
            connection.close()
            connection = await self._connect(target)
            return await self._round_trip(connection, pool, request, seen)
        except BaseException:
            connection.close()
            raise

    def _idle(self, pool: _Pool) -> _Connection | None:
        """The most recently used open connection; older or closed ones are dropped."""
        now = time.monotonic()
        while pool.idle:
            connection = pool.idle.pop()
            if not connection.ended and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        if target.tls and self._tls is None:
            self._tls = await asyncio.to_thread(_tls_context)  # reads the CA store
        _, connection = await loop.create_connection(
            _Connection, target.host, target.port,
            ssl=self._tls if target.tls else None,
            server_hostname=target.host if target.tls else None,
        )
        return connection

    async def _round_trip(
        self, connection: _Connection, pool: _Pool, request: bytes, seen: list[int]
    ) -> int:
        assert connection.transport is not None
        connection.busy = True
        connection.transport.write(request)
        status, reusable = await _answer(connection, seen)
        connection.busy = False
        # bytes beyond the answer are nothing we asked for: the connection is not trusted on
        if reusable and not connection.ended and not connection.buffer:
            connection.idle_since = time.monotonic()
            pool.idle.append(connection)
        else:
            connection.close()
        return status

    def sweep(self) -> None:
        """Close kept-alive connections unused for `IDLE_SECONDS`, and forget destinations with
        none left: otherwise one no longer posted to (its route removed or changed) keeps its
        sockets open for as long as the process runs. Call it now and then (the forwarder's
        status loop)."""
        now = time.monotonic()
        for key, pool in list(self._pools.items()):
            keep: list[_Connection] = []
            for connection in pool.idle:
                if not connection.ended and now - connection.idle_since < IDLE_SECONDS:
                    keep.append(connection)
                else:
                    connection.close()
            pool.idle[:] = keep
            if not keep and not pool.users:
                del self._pools[key]

    async def close(self) -> None:
        for pool in self._pools.values():
            for connection in pool.idle:
                connection.close()
            pool.idle.clear()


def _expire(task: asyncio.Task[object], expired: list[bool]) -> None:
    """The attempt's deadline passed: cancel it (`Sender.send` turns that into a timeout)."""
    if not task.done():
        expired.append(True)
        task.cancel()


def _tls_context() -> ssl.SSLContext:
    """Certificates verified against the system's store, host names checked (aiohttp's
    default, which the forwarder had before)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


async def _answer(connection: _Connection, seen: list[int]) -> tuple[int, bool]:
    """Read one answer: (status, whether the connection may carry another request). 1xx
    interim answers are skipped; the status counts once its head is complete, even if the body
    then cannot be read (the connection is then not reused)."""
    buffer = connection.buffer
    while True:
        end = buffer.find(b"\r\n\r\n")  # mostly there at once: no coroutine to wait in
        if end < 0:
            end = await _head_end(connection)
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        lines = head.split(b"\r\n")
        matched = _STATUS.fullmatch(lines[0])
        if matched is None:
            raise AnswerError("the destination's answer is not HTTP/1.x")
        status = int(matched[2])
        if status == 101:
            raise AnswerError("the destination switched protocols unasked")
        if status >= 200:
            break
    seen.append(status)
    length, chunked, keep_alive = _framing(lines[1:], http11=matched[1] == b"1")
    if status in (204, 304):
        return status, keep_alive
    try:
        if chunked:
            complete = await _chunks(connection)
        elif length is not None and length <= BODY_MAX and len(buffer) >= length:  # all in
            del buffer[:length]
            complete = True
        elif length is not None:
            complete = length <= BODY_MAX and await _exactly(connection, length)
        else:  # delimited by the end of the connection: read a little, never reuse
            complete = False
        return status, keep_alive and complete
    except (ConnectionError, AnswerError):
        return status, False


async def _head_end(connection: _Connection) -> int:
    buffer, start = connection.buffer, 0
    while True:
        end = buffer.find(b"\r\n\r\n", start)
        if end >= 0:
            return end
        if len(buffer) > HEAD_MAX:
            raise AnswerError(f"the destination's answer head exceeds {HEAD_MAX} bytes")
        start = max(0, len(buffer) - 3)
        await connection.more()


def _framing(lines: list[bytes], *, http11: bool) -> tuple[int | None, bool, bool]:
    """(Content-Length, chunked, keep-alive) from the answer's header lines."""
    length: int | None = None
    chunked = False
    keep_alive = http11
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise AnswerError("the destination's answer has a malformed header line")
        name, value = name.lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise AnswerError("the destination's answer has an invalid Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            if not chunked:  # delimited by the end of the connection
                keep_alive = False
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            keep_alive = (keep_alive or b"keep-alive" in tokens) and b"close" not in tokens
    if chunked:
        length = None  # Transfer-Encoding wins over Content-Length (RFC 9112 6.3)
    return length, chunked, keep_alive


async def _exactly(connection: _Connection, length: int) -> bool:
    """Consume `length` body bytes; True once they are all there."""
    while len(connection.buffer) < length:
        await connection.more()
    del connection.buffer[:length]
    return True


async def _chunks(connection: _Connection) -> bool:
    """Consume a chunked body of at most BODY_MAX bytes (with trailers); False if longer."""
    buffer, total = connection.buffer, 0
    while True:
        while (line_end := buffer.find(b"\r\n")) < 0:
            if len(buffer) > 1024:
                raise AnswerError("the destination's answer has a malformed chunk")
            await connection.more()
        size_text = bytes(buffer[:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise AnswerError("the destination's answer has a malformed chunk") from None
        if not size_text or size_text.strip(_HEX):  # int() also takes "0x1f", "-1", "1_0"
            raise AnswerError("the destination's answer has a malformed chunk")
        total += size
        if total > BODY_MAX:
            return False
        del buffer[: line_end + 2]
        if size == 0:  # trailers, up to an empty line
            while True:
                while (line_end := buffer.find(b"\r\n")) < 0:
                    if len(buffer) > HEAD_MAX:
                        raise AnswerError("the destination's answer has too many trailers")
                    await connection.more()
                del buffer[: line_end + 2]
                if line_end == 0:
                    return True
        await _exactly(connection, size)
        while len(buffer) < 2:
            await connection.more()
        if buffer[:2] != b"\r\n":
            raise AnswerError("the destination's answer has a malformed chunk")
        del buffer[:2]


__all__ = ["BODY_MAX", "HEAD_MAX", "Answer", "Sender", "Target", "request_head"]
