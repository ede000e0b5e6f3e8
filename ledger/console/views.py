"""The console's pages and downloads. Thin: parse strictly, ask the `Reader`, render."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import tempfile
from collections.abc import Callable
from typing import IO, Any, cast
from urllib.parse import urlencode

import orjson
from aiohttp import web
from multidict import MultiMapping

from ledger import asof, exports
from ledger.api import reads_done
from ledger.console import params, tables
from ledger.console.app import (
    CONSOLE_SETTINGS,
    CSRF,
    SECURITY_HEADERS,
    end_session,
    read_form,
    reader,
    redirect,
    render,
    same_origin,
    set_session,
    token_is_live,
)
from ledger.console.reader import PageOf, Reader
from ledger.errors import BadQuery, DownloadTooLarge, NotFound
from ledger.gateway.handoff import HANDOFF
from ledger.storage.audit_store import EventFilter

log = logging.getLogger(__name__)

PAGE = 50
HISTORY_PAGE = 20
EVENT_PAGES = ("25", "50", "100", "200")
DOWNLOAD_CAP = 100_000  # rows of a rejections or portals download
TABLES = ("portals", "bots", "deletions", "events", "rejections")
FORMATS = {"csv": "text/csv", "jsonl": "application/x-ndjson"}
DOWNLOAD_CHUNK = 256 * 1024
# a download whose client takes no chunk for this long is ended: a client that connects and
# reads nothing would otherwise keep its spooled file (up to 4 MiB of memory) for ever
DOWNLOAD_STALL_SECONDS = 60.0
_MEMBER = re.compile(r"^[A-Za-z0-9._:\-]{1,200}\Z")


def _link(path: str, **query: Any) -> str:
    kept = {k: v for k, v in query.items() if v not in (None, "")}
    return path + ("?" + urlencode(kept) if kept else "")


def _downloads(table: str, **query: Any) -> dict[str, str]:
    return {
        "CSV": _link(f"/console/download/{table}.csv", **query),
        "JSON Lines": _link(f"/console/download/{table}.jsonl", **query),
        "manifest (CSV)": _link(f"/console/download/{table}.csv", manifest=1, **query),
        "manifest (JSON Lines)": _link(f"/console/download/{table}.jsonl", manifest=1, **query),
    }


async def _pin(r: Reader, as_of: asof.AsOf | None) -> asof.AsOf:
    """What an answer is as of, fixed for its downloads: the moment asked for, or (live) the
    position the projections have reached."""
    if as_of is not None:
        return as_of
    return asof.Position(await r.store.projection_checkpoint())


def _member_cursor(query: MultiMapping[str]) -> str | None:
    value = params.single(query, "cursor")
    if value is not None and not _MEMBER.match(value):
        raise BadQuery("`cursor` is not a cursor this page gave out")
    return value


# ---- session ---------------------------------------------------------------------------------

async def sign_in_page(request: web.Request) -> web.Response:
    query = request.query
    ended = params.single(query, "ended") is not None
    return render(request, "sign_in.html", next=params.next_path(query.get("next")),
                  ended=ended, error=None)


async def sign_in(request: web.Request) -> web.Response:
    if not same_origin(request):
        raise web.HTTPForbidden(reason="sign in from the console's own page")
    form = await read_form(request)
    after = params.next_path(form.get("next"))
    try:
        token = params.token(form)
    except BadQuery as exc:
        return render(request, "sign_in.html", 400, next=after, ended=False, error=exc.message)
    if not await token_is_live(request, token):
        return render(request, "sign_in.html", 401, next=after, ended=False,
                      error="That token is not valid, or it has been revoked.")
    response = redirect(after)
    set_session(request, response, token)
    return response


async def sign_out(request: web.Request) -> web.Response:
    form = await read_form(request)
    expected = request[CSRF]
    if not same_origin(request) or not hmac.compare_digest(form.get("csrf", ""), expected):
        raise web.HTTPForbidden(reason="sign out from the console's own page")
    response = redirect("/console/sign-in")
    end_session(request, response)
    return response


# ---- pages -----------------------------------------------------------------------------------

async def overview(request: web.Request) -> web.Response:
    r = reader(request)
    cursor = _member_cursor(request.query)
    chain = await r.chain()
    portals = await r.portals(cursor, PAGE)
    handoff = request.config_dict.get(HANDOFF)
    # gateway mode: each route's health as the forwarder process last published it
    forwarding = [h.as_json() for h in handoff.health()] if handoff is not None else []
    return render(
        request, "overview.html", chain=chain, portals=portals, forwarding=forwarding,
        rejections_last_day=await r.rejections_last_day(),
        next_link=_link("/console/", cursor=portals.next_cursor) if portals.next_cursor else None,
        downloads=_downloads("portals"),
    )


async def bots(request: web.Request) -> web.Response:
    r, query = reader(request), request.query
    portal = params.portal(query)
    status = params.choice(query, "status", ("active", "deleted"))
    as_of_text = params.single(query, "as_of")
    as_of = params.parse_as_of(as_of_text)
    cursor = params.pair_cursor(query)
    members = await r.resolve_portal(portal)
    page = await r.bots(members=members, status=status, as_of=as_of, cursor=cursor, limit=PAGE)
    pinned = await _pin(r, as_of)
    filters = {"portal": portal, "status": status, "as_of": as_of_text}
    return render(
        request, "bots.html", page=page, filters=filters, as_of=as_of,
        pinned=params.as_of_words(pinned),
        portals=await r.portal_choices(), unknown_portal=members == [],
        next_link=_link("/console/bots", **filters, cursor=page.next_cursor)
        if page.next_cursor else None,
        downloads=_downloads("bots", portal=portal, status=status,
                             as_of=params.as_of_text(pinned)),
    )


async def deletions(request: web.Request) -> web.Response:
    r, query = reader(request), request.query
    portal = params.portal(query)
    as_of_text = params.single(query, "as_of")
    as_of = params.parse_as_of(as_of_text)
    cursor = params.position_pair(query)
    members = await r.resolve_portal(portal)
    page = await r.deletions(members=members, as_of=as_of, cursor=cursor, limit=PAGE)
    pinned = await _pin(r, as_of)
    filters = {"portal": portal, "as_of": as_of_text}
    return render(
        request, "deletions.html", page=page, filters=filters, as_of=as_of,
        pinned=params.as_of_words(pinned),
        portals=await r.portal_choices(), unknown_portal=members == [],
        next_link=_link("/console/deletions", **filters, cursor=page.next_cursor)
        if page.next_cursor else None,
        downloads=_downloads("deletions", portal=portal, as_of=params.as_of_text(pinned)),
    )


async def bot(request: web.Request) -> web.Response:
    r, query = reader(request), request.query
    member_id, bot_id = _bot_key(request)
    order = params.choice(query, "order", ("newest", "oldest")) or "newest"
    cursor = params.integer(query, "cursor")
    record, page = await r.bot(member_id, bot_id, newest_first=order == "newest", cursor=cursor,
                               limit=HISTORY_PAGE)
    base = f"/console/portals/{member_id}/bots/{bot_id}"
    head, _ = await r.store.head()
    return render(
        request, "bot.html", bot=record, page=page, order=order, base=base,
        next_link=_link(base, order=order, cursor=page.next_cursor) if page.next_cursor else None,
        downloads=_downloads("events", portal=member_id, bot=bot_id, up_to=head),
    )


def _bot_key(request: web.Request) -> tuple[str, int]:
    member_id, bot_id = request.match_info["member_id"], request.match_info["bot_id"]
    if not _MEMBER.match(member_id) or not bot_id.isascii() or not bot_id.isdigit() \
            or len(bot_id) > 18:
        raise NotFound("no such bot")
    return member_id, int(bot_id)


def _event_filter(query: MultiMapping[str], members: list[str] | None) -> EventFilter:
    return EventFilter(
        member_id=members[0] if members else None,
        event_type=params.event_type(query),
        bot_id=params.integer(query, "bot"),
        received_from=params.moment(query, "from"),
        received_to=params.moment(query, "to"),
        after=params.integer(query, "cursor") or 0,
        up_to=params.integer(query, "up_to"),
    )


async def events(request: web.Request) -> web.Response:
    r, query = reader(request), request.query
    portal = params.portal(query)
    members = await r.resolve_portal(portal)
    where = _event_filter(query, members)
    limit = int(params.choice(query, "limit", EVENT_PAGES) or "50")
    page = await r.events(where, limit) if members != [] else PageOf([], None)
    head, _ = await r.store.head()
    filters = {
        "portal": portal, "type": where.event_type, "bot": where.bot_id,
        "from": params.single(query, "from"), "to": params.single(query, "to"),
    }
    return render(
        request, "events.html", page=page, filters=filters, limit=limit,
        portals=await r.portal_choices(), unknown_portal=members == [],
        next_link=_link("/console/events", **filters, limit=limit, cursor=page.next_cursor)
        if page.next_cursor else None,
        downloads=_downloads("events", portal=portal, type=where.event_type, bot=where.bot_id,
                             **{"from": filters["from"], "to": filters["to"]}, up_to=head),
    )


async def event(request: web.Request) -> web.Response:
    value = request.match_info["position"]
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise NotFound("no such event")
    row = await reader(request).event(int(value))
    return render(request, "event.html", event=row)


async def rejections(request: web.Request) -> web.Response:
    r = reader(request)
    cursor = params.integer(request.query, "cursor")
    page = await r.rejections(cursor, PAGE)
    head, _ = await r.store.head("rejections")
    return render(
        request, "rejections.html", page=page,
        next_link=_link("/console/rejections", cursor=page.next_cursor)
        if page.next_cursor else None,
        downloads=_downloads("rejections", up_to=head),
    )


# ---- downloads -------------------------------------------------------------------------------

class _Hasher:
    """A text sink that keeps only the SHA-256 of the UTF-8 bytes written to it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def write(self, text: str) -> int:
        self.digest.update(text.encode())
        return len(text)


class _Capped:
    """A text sink that passes writes on to `out` until more than `limit` UTF-8 bytes would
    have been written, then refuses the download (`DownloadTooLarge`): a download is spooled
    to a temporary file before it is sent, and the file must not grow without bound."""

    def __init__(self, out: IO[str], limit: int, table: str) -> None:
        self.out, self.limit, self.table, self.size = out, limit, table, 0

    def write(self, text: str) -> int:
        self.size += len(text.encode())
        if self.size > self.limit:
            command = (f"`ledger export {self.table}` (any size)"
                       if self.table in ("events", "bots", "deletions") else "the CLI")
            raise DownloadTooLarge(
                f"this {self.table} download is larger than the console's limit of "
                f"{self.limit} bytes (LEDGER_CONSOLE_DOWNLOAD_MAX_BYTES): narrow it (portal, "
                f"type, bot, from/to) or use {command}")
        return self.out.write(text)


async def write_table(
    r: Reader, table: str, query: MultiMapping[str], out: IO[str], fmt: str
) -> tuple[str, exports.Manifest]:
    """One table, as the page's download link pinned it, into `out`; its file name and
    manifest (the manifest of `ledger.exports`)."""
    if table == "events":
        portal = params.portal(query)
        members = await r.resolve_portal(portal)
        if members == []:
            raise NotFound(f"no portal {portal}")
        where = _event_filter(query, members)
        if where.up_to is None:
            raise BadQuery("`up_to` pins an events download; use the page's link")
        manifest = await exports.export_events(r.audit, where, out, fmt)
        return f"events-upto-{where.up_to}.{fmt}", manifest
    if table in ("bots", "deletions"):
        position = params.parse_as_of(params.single(query, "as_of"))
        if position is None:
            raise BadQuery("`as_of` pins a download; use the page's link")
        pinned = re.sub(r"[^A-Za-z0-9]+", "-", params.as_of_text(position))
        members = await r.resolve_portal(params.portal(query))
        rows: list[Any]
        if table == "bots":
            status = params.choice(query, "status", ("active", "deleted"))
            found = await r.all_bots(members=members, status=status, as_of=position)
            rows = [tables.bot_row(b) for b in found]
        else:
            found = await r.all_deletions(members=members, as_of=position)
            rows = [tables.deletion_row(d) for d in found]
        filters = {k: v for k, v in query.items() if k != "manifest"}
        manifest = await exports.export_rows(table, rows, out, fmt, filters, r.audit)
        return f"{table}-asof-{pinned}.{fmt}", manifest
    if table == "rejections":
        up_to = params.integer(query, "up_to")
        if up_to is None:
            raise BadQuery("`up_to` pins a download; use the page's link")
        collected: list[Any] = []
        cursor: int | None = min(up_to + 1, params.MAX_POSITION)  # rows before the cursor
        while len(collected) < DOWNLOAD_CAP:
            page = await r.rejections(cursor, 1000)
            collected += [tables.rejection_row(x) for x in page.rows]
            if page.next_cursor is None:
                break
            cursor = int(page.next_cursor)
        manifest = await exports.export_rows("rejections", collected[:DOWNLOAD_CAP], out, fmt,
                                             {"up_to": up_to}, r.audit)
        return f"rejections-upto-{up_to}.{fmt}", manifest
    everything: list[Any] = []
    member_cursor: str | None = None
    while len(everything) < DOWNLOAD_CAP:
        portals = await r.portals(member_cursor, 1000)
        everything += [tables.portal_row(p) for p in portals.rows]
        if portals.next_cursor is None:
            break
        member_cursor = portals.next_cursor
    manifest = await exports.export_rows("portals", everything, out, fmt, {}, r.audit)
    return f"portals.{fmt}", manifest


async def download(request: web.Request) -> web.StreamResponse:
    table, fmt = request.match_info["table"], request.match_info["format"]
    if table not in TABLES or fmt not in FORMATS:
        raise NotFound("no such download")
    r, query = reader(request), request.query
    limit = request.config_dict[CONSOLE_SETTINGS].console_download_max_bytes
    if params.single(query, "manifest") is not None:  # only for a file that can be downloaded
        sink = _Hasher()
        capped = cast(IO[str], _Capped(cast(IO[str], sink), limit, table))
        name, manifest = await write_table(r, table, query, capped, fmt)
        body = {**manifest.__dict__, "file": name, "file_sha256": sink.digest.hexdigest(),
                "file_sha256_of": "the UTF-8 bytes of the file named above, as downloaded"}
        return web.Response(
            body=orjson.dumps(body, option=orjson.OPT_INDENT_2), content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}.manifest.json"'},
        )
    with tempfile.SpooledTemporaryFile(max_size=4 * 1024 * 1024, mode="w+", encoding="utf-8",
                                       newline="") as spool:
        name, _ = await write_table(r, table, query,
                                    cast(IO[str], _Capped(spool, limit, table)), fmt)
        reads_done(request)  # a slow client holds its spooled file, not a place at the database
        spool.seek(0)
        response = web.StreamResponse(headers={
            **SECURITY_HEADERS, "Content-Type": f"{FORMATS[fmt]}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}"',
        })
        await response.prepare(request)
        while chunk := spool.read(DOWNLOAD_CHUNK):
            try:
                async with asyncio.timeout(DOWNLOAD_STALL_SECONDS):
                    await response.write(chunk.encode())
            except TimeoutError:
                log.warning("download %s ended: its client took nothing for %.0f s", name,
                            DOWNLOAD_STALL_SECONDS)
                if request.transport is not None:
                    request.transport.abort()
                return response
        await response.write_eof()
    return response


def add_routes(router: web.UrlDispatcher) -> None:
    routes: list[tuple[str, str, Callable[..., Any]]] = [
        ("GET", "/sign-in", sign_in_page),
        ("POST", "/sign-in", sign_in),
        ("POST", "/sign-out", sign_out),
        ("GET", "/", overview),
        ("GET", "/bots", bots),
        ("GET", "/deletions", deletions),
        ("GET", "/portals/{member_id}/bots/{bot_id}", bot),
        ("GET", "/events", events),
        ("GET", "/events/{position}", event),
        ("GET", "/rejections", rejections),
        ("GET", "/download/{table:[a-z]+}.{format:[a-z]+}", download),
    ]
    for method, path, handler in routes:
        router.add_route(method, path, handler)

