"""A destination of our own for gateway-mode tests: an aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy


@dataclass(frozen=True)
class Received:
    body: bytes
    content_type: str | None
    raw_query: str
    headers: CIMultiDictProxy[str]
    answered: int
    stored_when_received: bool | None

    @property
    def position(self) -> int | None:
        value = self.headers.get("X-Ledger-Position")
        return int(value) if value is not None else None


class Destination:
    """Records every request; answers `status` (or waits for `gate` first)."""

    def __init__(self, stored: Callable[[int], Awaitable[bool]] | None = None) -> None:
        self.requests: list[Received] = []
        self.status = 200
        self.gate: asyncio.Event | None = None
        self._stored = stored
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot/handler"

    @property
    def delivered(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.answered < 300]

    async def _handle(self, request: web.Request) -> web.Response:
        if self.gate is not None:
            await self.gate.wait()
        body = await request.read()
        position = request.headers.get("X-Ledger-Position")
        stored = (
            await self._stored(int(position))
            if self._stored is not None and position is not None else None
        )
        status = self.status
        self.requests.append(Received(
            body, request.headers.get("Content-Type"), request.rel_url.raw_query_string,
            request.headers, status, stored,
        ))
        async with self._changed:
            self._changed.notify_all()
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": "http://127.0.0.1:9/x"})
        return web.Response(status=status, text="ok")

    async def wait_until(
        self, condition: Callable[[Destination], bool], within: float = 30
    ) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: condition(self))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/bot/handler", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def eventually(condition: Callable[[], Any], within: float = 30) -> None:
    """Poll a condition the code under test offers no signal for, until a deadline."""
    deadline = time.monotonic() + within
    while not await _value(condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        await asyncio.sleep(0.02)


async def _value(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


class Forwarders:
    """Forwarder processes' work, run in the test's own event loop beside a test client's app
    (`ledger serve` runs it as a child process; tests/test_gateway_durability.py does that)."""

    def __init__(self) -> None:
        self.running: list[Any] = []

    async def start(self, client: Any) -> Any:
        from ledger.gateway.forwarder import Forwarder, outbox_key
        from ledger.storage.gateway_store import GatewayStore
        from ledger.web import POOL, SETTINGS

        app = client.app
        settings = app[SETTINGS]
        forwarder = Forwarder(settings, GatewayStore(app[POOL]), outbox_key(settings))
        await forwarder.start()
        self.running.append(forwarder)
        return forwarder

    async def close(self) -> None:
        while self.running:
            await self.running.pop().close()
