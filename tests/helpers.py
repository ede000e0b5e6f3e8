"""Small helpers the HTTP tests share."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeAlias

from aiohttp import web
from aiohttp.test_utils import TestClient

from ledger import drafts
from ledger.models import EventDraft
from ledger.operations import change_trust
from ledger.projections.projector import Projector
from ledger.simulation import SimDelivery
from ledger.spool import FileOps
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, close_pool, create_pool
from ledger.trust import TrustChange
from ledger.web import COMMITTER, SETTINGS, SPOOL, STORE, TARGET
from tests.conftest import FORM, MEMBER_ID, sample

PROJECTOR = web.AppKey("test_projector", Projector)


def with_projector(app: web.Application) -> web.Application:
    """Give a test's app what `ledger project --follow` is in production, to be drained on
    call (`app[PROJECTOR].catch_up()`): the app itself runs no projector."""

    async def ctx(app: web.Application) -> Any:
        settings = app[SETTINGS]
        pool = await create_pool(app[TARGET].projector_dsn, size=2, connect=False)
        app[PROJECTOR] = Projector(EventStore(pool, policy=settings.trust_policy),
                                   ProjectionStore(pool),
                                   snapshot_every=settings.projector_snapshot_every)
        yield
        await close_pool(pool)

    app.cleanup_ctx.append(ctx)
    return app

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
    """By member_id: such an install needs no call-back to the portal (see test_trust.py)."""
    assert client.app is not None
    await change_trust(client.app[STORE], TrustChange.ALLOWED, member_id=MEMBER_ID, actor="test")


async def allow_installs(client: Client, deliveries: Iterable[SimDelivery]) -> None:
    """One allowance per ONAPPINSTALL in `deliveries`: an allowance admits one install, so a
    simulated portal that reinstalls needs another (as a real one would)."""
    assert client.app is not None
    for delivery in deliveries:
        if delivery.document["event"] == "ONAPPINSTALL":
            await change_trust(client.app[STORE], TrustChange.ALLOWED,
                               member_id=delivery.portal.member_id, actor="test")


async def install_sample_portal(client: Client) -> None:
    await allow_sample_portal(client)
    status, answer = await post(client, sample("onappinstall-1"))
    assert status == 200, answer


async def drained(client: Client) -> None:
    """Until the app's spool is empty — woken by each committed batch, bounded in time."""
    assert client.app is not None
    spool, committer = client.app[SPOOL], client.app[COMMITTER]
    async with asyncio.timeout(20):
        while spool.has_pending():
            committer.progressed.clear()
            await committer.progressed.wait()


class SocketProxy:
    """A Unix-socket relay in front of PostgreSQL that a test can cut and restore: a real
    outage as the service sees it (connections die, new ones are refused)."""

    def __init__(self, target: str, directory: str, port: int) -> None:
        self._target = target
        self.path = f"{directory}/.s.PGSQL.{port}"
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._open: list[list[bool]] = []  # per connection relayed now: [severed]
        self._upstreams: set[asyncio.StreamWriter] = set()

    def stall(self) -> None:
        """PostgreSQL answers nothing (connections stay open): 'too slow' rather than 'down'."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def sever(self) -> None:
        """Every open connection's PostgreSQL side goes (its backend ends, its transaction rolls
        back), but its client learns that only when it next sends something: a connection that
        died unnoticed, as after a backend was terminated. New connections are relayed."""
        for state in self._open:
            state[0] = True
        for upstream in list(self._upstreams):
            upstream.transport.abort()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._relay, path=self.path)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(self._target)
        self._writers |= {writer, upstream_writer}
        self._upstreams.add(upstream_writer)
        severed = [False]
        self._open.append(severed)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    await self._flowing.wait()
                    if severed[0]:  # the client sent something: now it learns
                        writer.transport.abort()
                        return
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                if not (severed[0] and sink is writer):  # severed: the client learns later
                    sink.transport.abort()
                self._writers.discard(sink)

        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            self._open.remove(severed)
            self._upstreams.discard(upstream_writer)


class Disk:
    """File calls that fail on demand: `fail_at` bytes into the next write (ENOSPC, or a short
    write returning 0), or every fsync / truncate while `fsync_fails` / `truncate_fails`."""

    def __init__(self) -> None:
        self.fail_at: int | None = None
        self.short = False
        self.fsync_fails = False
        self.truncate_fails = False

    def files(self) -> FileOps:
        return FileOps(pwrite=self.pwrite, fsync=self.fsync, ftruncate=self.ftruncate)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if self.fail_at is None:
            return os.pwrite(fd, data, offset)
        if self.fail_at > 0:
            written = os.pwrite(fd, data[: self.fail_at], offset)
            self.fail_at -= written
            return written
        if self.short:
            return 0
        raise OSError(errno.ENOSPC, "No space left on device")

    def fsync(self, fd: int) -> None:
        if self.fsync_fails:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        if self.truncate_fails:
            raise OSError(errno.EIO, "Input/output error")
        os.ftruncate(fd, length)


def distinct_messages(count: int, *, first: int = 700000) -> list[bytes]:
    """`count` message deliveries of the sample portal, told apart by MESSAGE_ID from `first`."""
    from ledger import wire

    document = wire.parse_php_form(sample("onimbotmessageadd-1"), max_fields=999, max_nesting=9)
    made = []
    for message_id in range(first, first + count):
        document["data"]["PARAMS"]["MESSAGE_ID"] = str(message_id)
        made.append(wire.http_build_query(document))
    return made


def allowance_drafts(count: int, first: int = 0) -> list[EventDraft]:
    """Operator allowances for made-up portals m<first>, m<first+1>, …: drafts that need no
    trust to be stored, for tests of the append path itself."""
    now = datetime.now(UTC)
    return [
        drafts.operator_action(TrustChange.ALLOWED, member_id=f"m{i}", domain=None, token=None,
                               actor="test", received_at=now)
        for i in range(first, first + count)
    ]
