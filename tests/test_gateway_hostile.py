"""A real `ledger serve` forwarding to a destination of raw sockets that misbehaves on each
event's first two attempts (garbage, a status line then the end, a reset, a 1 byte/s answer, a
second answer behind the first): every event still reaches it in order, and the record of
attempts calls delivered only attempts the destination really answered with a 2xx."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.conftest import Database
from tests.gateway_helpers import eventually
from tests.test_gateway_durability import Admin, routed_ledger, send_samples
from tests.test_gateway_durability import started as started  # the fixture, by name

MISBEHAVIOURS = ["garbage", "status_line_then_end", "reset", "slow", "folded_2xx", "http2"]


class Hostile:
    """Each position's first two attempts (X-Ledger-Attempt) misbehave, each way in turn over
    the positions; the third is answered 200. What was answered 200 is kept as (position,
    attempt)."""

    def __init__(self) -> None:
        self.ok: list[tuple[int, int]] = []
        self.seen: list[tuple[int, int]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(re.findall(rb"\r\n([^:\r\n]+): ([^\r\n]*)", head))
                await reader.readexactly(int(fields[b"Content-Length"]))
                key = (int(fields[b"X-Ledger-Position"]), int(fields[b"X-Ledger-Attempt"]))
                self.seen.append(key)
                way = MISBEHAVIOURS[sum(key) % len(MISBEHAVIOURS)] if key[1] <= 2 else "ok"
                if way == "ok":
                    self.ok.append(key)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if way == "garbage":
                    writer.write(b"\x00\xffHTTP/1.1 200 OK\r\n\r\n")
                elif way == "status_line_then_end":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                elif way == "reset":
                    writer.transport.abort()
                    return
                elif way == "slow":  # past the attempt timeout, a byte at a time
                    for byte in b"HTTP/1.1 200 OK\r\n\r\n":
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(0.3)  # the misbehaviour itself: slowloris
                elif way == "folded_2xx":
                    writer.write(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n")
                elif way == "http2":
                    writer.write(b"HTTP/2 200\r\n\r\n")
                await writer.drain()
                writer.close()
                return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def test_misbehaving_answers_are_never_deliveries_and_nothing_is_lost_or_reordered(
    database: Database, admin: Admin, tmp_path: Path,
    started: list[asyncio.subprocess.Process], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEDGER_FORWARD_TIMEOUT_SECONDS", "0.6")
    destination = Hostile()
    await destination.start()
    try:
        _, port, _ = await routed_ledger(database, tmp_path, started, destination)  # type: ignore[arg-type]
        acknowledged = await send_samples(port)
        await eventually(lambda: {p for p, _ in destination.ok} >= set(acknowledged), within=90)
        first_ok = [p for p, _ in sorted(destination.ok, key=destination.seen.index)]
        assert first_ok == sorted(acknowledged)  # in order across retries and reconnects

        async def recorded() -> bool:
            rows = await admin.fetch("SELECT count(*) AS n FROM audit.forwards "
                                     "WHERE outcome = 'delivered'")
            return bool(rows[0]["n"] >= len(acknowledged))
        await eventually(recorded, within=30)
    finally:
        await destination.stop()
    rows = await admin.fetch("SELECT position, attempt, outcome, status FROM audit.forwards")
    delivered = sorted((r["position"], r["attempt"]) for r in rows if r["outcome"] == "delivered")
    assert delivered == sorted(destination.ok)
    assert all(r["status"] == 200 for r in rows if r["outcome"] == "delivered")
    assert not [r for r in rows if r["outcome"] == "given_up"]
    failed = {(r["position"], r["attempt"]) for r in rows if r["outcome"] == "failed"}
    assert failed == {key for key in destination.seen if key not in destination.ok}
