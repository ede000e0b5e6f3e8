"""The read side at scale: the registry and the deletion timeline a page at a time (keyset
cursors, `Link: rel=next`), a bound on concurrent "as of" folds per process, and bidi
isolation of sender text in the console's tables."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
from yarl import URL

from ledger.api import _SCHEMAS, openapi_document
from ledger.projections import readers
from ledger.settings import Settings
from tests.conftest import ClientFactory, Database
from tests.helpers import Client
from tests.test_api import bearer, get, history  # noqa: F401  (the fixture)
from tests.test_derived_state import cli


async def pages(client: Client, path: str, headers: dict[str, str],
                **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of `path`, following the `Link: rel=next` headers to the end."""
    found = []
    url = str(URL(f"/api/v1{path}").with_query(params))
    for _ in range(1000):
        response = await client.get(url, headers=headers)
        assert response.status == 200, await response.text()
        found.append(await response.json())
        link = response.headers.get("Link")
        if link is None:
            return found
        target, _, rel = link.partition(">; ")
        assert rel == 'rel="next"'
        assert target.startswith("</api/v1/")
        url = target[1:]
    raise AssertionError("the pages never ended")


async def test_the_registry_comes_a_page_at_a_time(history: Client) -> None:  # noqa: F811
    headers = await bearer(history)
    whole = await pages(history, "/bots", headers)
    assert len(whole) == 1  # the default page holds it all: clients before paging see no change
    everything = whole[0]
    keys = [(b["portal_member_id"], b["bot_id"]) for b in everything]
    assert len(keys) > 10
    assert keys == sorted(set(keys))
    head = (await get(history, "/projection", headers))["position"]  # as of it: the same
    for as_of in ({}, {"as_of": f"position:{head}"}):
        paged = await pages(history, "/bots", headers, limit=7, **as_of)
        assert [len(p) for p in paged[:-1]] == [7] * (len(paged) - 1)
        assert 1 <= len(paged[-1]) <= 7
        assert [b for p in paged for b in p] == everything, as_of
    deleted = await pages(history, "/bots", headers, status="deleted", limit=2)
    assert [b for p in deleted for b in p] == [b for b in everything
                                               if b["status"] == "deleted"]


async def test_the_deletion_timeline_comes_a_page_at_a_time(history: Client) -> None:  # noqa: F811
    headers = await bearer(history)
    everything = (await pages(history, "/deletions", headers))[0]
    keys = [(d["position"], d["bot_id"]) for d in everything]
    assert len(keys) >= 3
    assert keys == sorted(set(keys))
    head = (await get(history, "/projection", headers))["position"]  # as of it: the same
    for as_of in ({}, {"as_of": f"position:{head}"}):
        paged = await pages(history, "/deletions", headers, limit=2, **as_of)
        assert len(paged) >= 2
        assert all(len(p) == 2 for p in paged[:-1])
        assert [d for p in paged for d in p] == everything, as_of
        flagged = await pages(history, "/deletions", headers, anomalies="true", limit=1,
                              **as_of)
        assert [d for p in flagged for d in p] == [d for d in everything if d["anomalies"]]
    assert [d for d in everything if d["anomalies"]]


@pytest.mark.parametrize(("path", "after"), [
    ("/bots", "nocolon"), ("/bots", "m:x"), ("/bots", "m:-1"), ("/bots", "\x00:1"),
    ("/deletions", "1"), ("/deletions", "1:x"), ("/deletions", "x:1"),
])
async def test_a_bad_cursor_is_a_400(history: Client, path: str, after: str) -> None:  # noqa: F811
    headers = await bearer(history)
    response = await history.get(f"/api/v1{path}", headers=headers, params={"after": after})
    assert response.status == 400
    assert (await response.json())["error"] == "bad_query"


async def _until(condition: Callable[[], Any], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_as_of_folds_are_bounded_per_process(
    make_client: ClientFactory, settings_factory: Callable[..., Settings],
    admin: asyncpg.Connection[Any],
) -> None:
    """One fold running (held on a lock on the snapshots it starts from) and a limit of one:
    the next as-of question waits `fold_wait_seconds`, then is refused 503 with Retry-After;
    live questions are not held up; once the fold ends, as-of questions are answered again."""
    client = await make_client(settings_factory(max_concurrent_folds=1, fold_wait_seconds=0.05))
    headers = await bearer(client)
    params = {"as_of": "position:0"}  # the empty store: as of its head
    async with admin.transaction():
        await admin.execute("LOCK TABLE projections.snapshots IN ACCESS EXCLUSIVE MODE")
        held = asyncio.ensure_future(client.get("/api/v1/bots", headers=headers, params=params))

        async def waiting() -> bool:
            return bool(await admin.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = 'snapshots' AND NOT l.granted"))

        await _until(waiting, "the first fold to wait on the lock")
        refused = await client.get("/api/v1/deletions", headers=headers, params=params)
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"
        assert (await refused.json())["error"] == "as_of_busy"
        assert (await client.get("/api/v1/bots", headers=headers)).status == 200
        assert not held.done()
    assert (await held).status == 200
    assert (await client.get("/api/v1/deletions", headers=headers, params=params)).status == 200


def test_the_openapi_document_says_how_pages_go() -> None:
    for path, cursor in (("/bots", "bot-cursor"), ("/deletions", "deletion-cursor")):
        get = openapi_document()["paths"][path]["get"]
        assert "Link" in get["responses"]["200"]["headers"]
        parameters = {p["name"]: p["schema"] for p in get["parameters"]}
        assert parameters["limit"] == {"type": "integer", "minimum": 1, "maximum": 1000}
        assert parameters["after"] == _SCHEMAS[cursor]
        assert get["responses"]["503"]


async def test_the_cli_and_exports_go_page_by_page(
    history: Client, database: Database, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    """Pages of 3 rows: what `ledger bots`, `ledger deletions` and `ledger export` print is
    every row, once, in key order — as the read API's one big page has them."""
    headers = await bearer(history)
    bots = (await pages(history, "/bots", headers))[0]
    deletions = (await pages(history, "/deletions", headers))[0]
    monkeypatch.setattr(readers, "PAGE", 3)
    listed = await cli(database, "bots", "--json")
    assert listed.exit_code == 0, listed.output
    assert [orjson.loads(line) for line in listed.output.splitlines()] == bots
    table = await cli(database, "deletions")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].startswith("BOT_ID")
    assert len(lines) == 1 + len(deletions)
    exported = await cli(database, "export", "bots", "--format", "jsonl")
    assert exported.exit_code == 0
    rows = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert [(r["portal_member_id"], r["bot_id"]) for r in rows] == [
        (b["portal_member_id"], b["bot_id"]) for b in bots]
    exported = await cli(database, "export", "deletions", "--format", "csv")
    assert exported.exit_code == 0
    assert len(exported.stdout.splitlines()) == 1 + len(deletions)


async def test_a_listing_read_page_by_page_is_one_moment(
    history: Client, database: Database,  # noqa: F811
) -> None:
    """`ledger export bots|deletions` of a large registry is many pages: read each in its own
    statement, a projector commit between two pages made one export file mix two moments
    (rows gone or changed half-way). All pages of one listing are read in one snapshot."""
    from ledger.storage.projection_store import ProjectionStore
    from ledger.storage.store import close_pool, create_pool

    pool = await create_pool(database.service_dsn, size=2)
    admin = await asyncpg.connect(database.admin_dsn)
    try:
        store = ProjectionStore(pool)
        everything = [b async for page in readers.bot_pages(store, None) for b in page]
        assert len(everything) >= 2
        deletions = [d async for page in readers.deletion_pages(
            store, None, readers.DeletionFilter()) for d in page]
        assert deletions
        listing = readers.bot_pages(store, None, limit=1)
        timeline = readers.deletion_pages(store, None, readers.DeletionFilter(), limit=1)
        first, first_deletion = await anext(listing), await anext(timeline)
        # the projector's next commit, as far as a reader can tell: rows gone and changed
        await admin.execute("DELETE FROM projections.bots")
        await admin.execute("DELETE FROM projections.deletions")
        rest = [b async for page in listing for b in page]
        rest_deletions = [d async for page in timeline for d in page]
        assert first + rest == everything
        assert first_deletion + rest_deletions == deletions
    finally:
        await admin.close()
        await close_pool(pool)


async def test_slow_reads_leave_the_intake_and_readiness_their_connections(
    make_client: ClientFactory, settings_factory: Callable[..., Settings],
    admin: asyncpg.Connection[Any],
) -> None:
    """Reads held up in PostgreSQL (here on a lock; in life a large download or a badly
    planned query) may take at most pool_size - 2 connections: /readyz still answers, and a
    delivery is still stored (200, not spooled); the reads beyond the bound are refused 503
    `reads_busy` with Retry-After, and once the slow ones end, reads are answered again."""
    from ledger.api import READS
    from tests.conftest import sample
    from tests.helpers import install_sample_portal, post

    client = await make_client(settings_factory(pool_size=4))
    assert client.app is not None
    client.app[READS].wait = 0.2
    await install_sample_portal(client)
    headers = await bearer(client)
    async with admin.transaction():
        await admin.execute("LOCK TABLE projections.portals IN ACCESS EXCLUSIVE MODE")
        held = [asyncio.ensure_future(client.get("/api/v1/portals", headers=headers))
                for _ in range(4)]
        held.append(asyncio.ensure_future(client.get("/console/", allow_redirects=False)))

        async def waiting() -> bool:
            return bool(await admin.fetchval(
                "SELECT count(*) >= 2 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = 'portals' AND NOT l.granted"))

        await _until(waiting, "two reads to wait on the lock")
        async with asyncio.timeout(10):  # on main: the held reads take the whole pool
            ready = await client.get("/readyz")
            status, answer = await post(client, sample("onimbotjoinchat-1"))
        assert ready.status == 200, await ready.text()
        assert (status, answer["status"]) == (200, "stored")
        refused = await client.get("/api/v1/portals", headers=headers)
        assert refused.status == 503
        assert (await refused.json())["error"] == "reads_busy"
        assert refused.headers["Retry-After"] == "1"
    answers = [await h for h in held]
    assert sorted(a.status for a in answers).count(200) == 2  # the two let in, now answered
    assert (await client.get("/api/v1/portals", headers=headers)).status == 200
