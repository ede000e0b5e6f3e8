"""The read API under /api/v1/: JSON, bearer tokens, generated OpenAPI description.

One table (`ROUTES`) declares each resource, its parameters and its response model; the router,
the OpenAPI document and the tests all read it, so they cannot drift apart.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from ledger import __version__, asof, proving
from ledger.audit import (
    MAX_PAGE,
    AuditService,
    DeletionFilter,
    ReadGate,
    ReadPermit,
    event_type_asked,
    token_digest,
)
from ledger.errors import BadQuery, Unauthorized
from ledger.gateway.handoff import HANDOFF
from ledger.gateway.routes import RouteOut
from ledger.readmodels import (
    BotHistory,
    BotOut,
    DeletionOut,
    ErrorOut,
    EventOut,
    Page,
    PortalOut,
    ProjectionOut,
    ProofOut,
    RejectionOut,
    VerificationOut,
)
from ledger.storage.audit_store import EventFilter, RejectionFilter
from ledger.storage.tree_store import EVENTS_LOG, TreeStore

AUDIT = web.AppKey("audit", AuditService)
TREES = web.AppKey("trees", TreeStore)
TOKEN_CACHE = web.AppKey("token_cache", dict)  # sha256 -> monotonic expiry
# set by the app factory: one bound for the read API's and the console's requests together
READS = web.AppKey("reads", ReadGate)
READ_PERMIT = web.RequestKey("read_permit", ReadPermit)
TOKEN_CACHE_SECONDS = 10.0  # a revoked token stops working within this long
MAX_TOKEN = 512

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# on every read-API answer and every error answer (`ledger.web`): JSON that no browser may
# sniff into a page, run anything from, frame, or keep in a cache (the console's pages send
# their own, stricter set)
PLAIN_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


INT64_MAX = asof.INT64_MAX  # positions, bot ids: PostgreSQL bigint
MAX_TEXT = 256  # member ids, event types, actors: far longer than any real one
_UNSAFE_TEXT = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # a key of _SCHEMAS
    description: str
    where: str = "query"


# what each kind of parameter accepts — exactly what the handlers accept, so that a client
# generated from the document (or schemathesis) never sends a "valid" value that gets a 400
_SCHEMAS: dict[str, dict[str, Any]] = {
    "string": {"type": "string", "maxLength": MAX_TEXT, "pattern": "^[^\\u0000]*$"},
    "integer": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
    "boolean": {"type": "boolean"},
    "date-time": {"type": "string", "format": "date-time"},
    "status": {"type": "string", "enum": ["active", "deleted"]},
    # keyset cursors (`ledger.api._paged`): the key of the last row of the page before
    "bot-cursor": {"type": "string", "maxLength": MAX_TEXT + 20,
                   "pattern": "^[^\\u0000]{0,256}:[0-9]{1,18}$"},
    "deletion-cursor": {"type": "string", "pattern": "^[0-9]{1,18}:[0-9]{1,18}$"},
    # the prefixed forms with a time are accepted too; the document lists what a generator
    # can produce without inventing invalid dates
    "as-of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": INT64_MAX},
                        {"type": "string", "format": "date-time"},
                        {"type": "string", "pattern": "^position:[0-9]{1,18}$"},
                        {"type": "string", "maxLength": 0}]},
}


@dataclass(frozen=True)
class Route:
    path: str
    summary: str
    response: Any  # a model type or list[model]
    params: tuple[Param, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()  # statuses beyond 400/401/404/503, documented
    paged: bool = False  # a JSON array a page at a time, the next page in a `Link` header


def json_response(body: Any, status: int = 200) -> web.Response:
    """The one way a JSON answer is made (the API's, the intake's, the health checks')."""
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_UTC_Z), status=status,
                        content_type="application/json")


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _text_value(name: str, value: str) -> str:
    """A text parameter PostgreSQL can take: no U+0000, no lone surrogate, not absurdly long."""
    if len(value) > MAX_TEXT or _UNSAFE_TEXT.search(value):
        raise BadQuery(f"`{name}` must be text of at most {MAX_TEXT} characters, without U+0000")
    return value


def _text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return _text_value(name, value) if value else None


def _integer(name: str, value: str) -> int:
    """A non-negative int64 written in ASCII digits (`asof.strict_int64`); else a 400."""
    number = asof.strict_int64(value)
    if number is None:
        raise BadQuery(f"`{name}` must be a whole number from 0 to {INT64_MAX}")
    return number


def _int(request: web.Request, name: str, default: int | None = None) -> int | None:
    value = request.query.get(name)
    if value is None:
        return default
    return _integer(name, value)


def _time(request: web.Request, name: str) -> datetime | None:
    value = request.query.get(name)
    if value is None:
        return None
    problem = f"`{name}` must be an ISO 8601 time, e.g. 2026-03-01T00:00:00Z"
    if not value.isascii():
        raise BadQuery(problem)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        moment.astimezone(UTC)  # an offset can push year 1 or 9999 out of range
    except (ValueError, OverflowError) as exc:
        raise BadQuery(problem) from exc
    return moment


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _bool(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None:
        return False
    if value.lower() not in _TRUE + _FALSE:
        raise BadQuery(f"`{name}` must be true or false")
    return value.lower() in _TRUE


def _as_of(request: web.Request) -> asof.AsOf | None:
    return asof.parse_as_of(request.query.get("as_of"))


def _service(request: web.Request) -> AuditService:
    return request.config_dict[AUDIT]


async def portals(request: web.Request) -> web.Response:
    return json_response(_dump(await _service(request).portals()))


async def bots(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status not in (None, "active", "deleted"):
        raise BadQuery("`status` is active or deleted")
    found, more = await _service(request).bot_page(
        member_id=_text(request, "portal"), status=status, as_of=_as_of(request),
        after=_bot_cursor(request), limit=_limit(request),
    )
    return _paged(request, _dump(found), more)


def _limit(request: web.Request) -> int:
    return _int(request, "limit", MAX_PAGE) or 0


def _bot_cursor(request: web.Request) -> tuple[str, int] | None:
    """`after=MEMBER_ID:BOT_ID`: the key of the last bot of the page before."""
    parts = _cursor(request, "MEMBER_ID:BOT_ID")
    return None if parts is None else (_text_value("after", parts[0]),
                                       _integer("after", parts[1]))


def _deletion_cursor(request: web.Request) -> tuple[int, int] | None:
    """`after=POSITION:BOT_ID`: the key of the last deletion of the page before."""
    parts = _cursor(request, "POSITION:BOT_ID")
    return None if parts is None else (_integer("after", parts[0]),
                                       _integer("after", parts[1]))


def _cursor(request: web.Request, shape: str) -> tuple[str, str] | None:
    """The `after` cursor's two parts, split at its last colon (a bot id has none)."""
    value = request.query.get("after")
    if value is None:
        return None
    first, sep, bot_id = value.rpartition(":")
    if not sep:
        raise BadQuery(f"`after` is the `next` link's cursor: {shape}")
    return first, bot_id


def _paged(request: web.Request, body: Any, more: tuple[str | int, int] | None) -> web.Response:
    """A page of a keyed list: the JSON array as before paging, and — when there is more — a
    `Link: <…>; rel="next"` header (RFC 8288) with the same question after this page's key."""
    response = json_response(body)
    if more is not None:
        cursor = f"{more[0]}:{more[1]}"
        response.headers["Link"] = f'<{request.rel_url.update_query(after=cursor)}>; rel="next"'
    return response


async def bot_history(request: web.Request) -> web.Response:
    bot_id = _integer("bot id", request.match_info["bot_id"])
    history = await _service(request).bot_history(
        _text_value("member id", request.match_info["member_id"]), bot_id,
        after=_int(request, "after", 0) or 0, limit=_int(request, "limit", MAX_PAGE) or 0,
    )
    return json_response(_dump(history))


async def deletions(request: web.Request) -> web.Response:
    where = DeletionFilter(
        member_id=_text(request, "portal"),
        occurred_from=_time(request, "from"),
        occurred_to=_time(request, "to"),
        actor_user_id=_text(request, "actor"),
        cause=_text(request, "cause"),
        anomalies_only=_bool(request, "anomalies"),
    )
    found, more = await _service(request).deletion_page(
        where, as_of=_as_of(request), after=_deletion_cursor(request), limit=_limit(request),
    )
    return _paged(request, _dump(found), more)


async def events(request: web.Request) -> web.Response:
    where = EventFilter(
        member_id=_text(request, "portal"),
        event_type=event_type_asked(_text(request, "type") or "") or None,
        bot_id=_int(request, "bot"),
        received_from=_time(request, "from"),
        received_to=_time(request, "to"),
        after=_int(request, "after", 0) or 0,
    )
    page = await _service(request).event_page(
        where, limit=_int(request, "limit", 100) or 0, with_payload=_bool(request, "payload")
    )
    names = [(name, field.alias or name) for name, field in EventOut.model_fields.items()]
    page["items"] = [_public_event(row, names) for row in page["items"]]
    return json_response(page)


def _public_event(row: dict[str, Any], names: list[tuple[str, str]]) -> dict[str, Any]:
    """An event row under the audit view's names (EventOut's aliases), in EventOut's order."""
    public = {alias: row[name] for name, alias in names if name in row}
    if "payload" in public:  # the stored JSON text, spliced in without a parse
        public["payload"] = orjson.Fragment(public["payload"])
    return public


async def event_proof(request: web.Request) -> web.Response:
    """The offline-checkable proof bundle of one event (docs/spec/proofs.md)."""
    position = _integer("position", request.match_info["position"])
    bundle = await proving.inclusion_bundle(
        request.config_dict[TREES], position, None, log_id=EVENTS_LOG
    )
    return json_response(bundle)


async def rejections(request: web.Request) -> web.Response:
    service = _service(request)
    where = RejectionFilter(
        member_id=await service.resolve_portal(_text(request, "portal")),
        reason=_text(request, "reason"),
        received_from=_time(request, "from"),
        received_to=_time(request, "to"),
        after=_int(request, "after", 0) or 0,
    )
    page = await service.rejections(where, limit=_int(request, "limit", 100) or 0)
    return json_response(_dump(page))


async def verification(request: web.Request) -> web.Response:
    return json_response(_dump(await _service(request).verification()))


async def projection(request: web.Request) -> web.Response:
    return json_response(_dump(await _service(request).projection()))


async def routes(request: web.Request) -> web.Response:
    """Gateway mode: the routes, with their health as the forwarder process last published it
    (state `forwarder_down` while it does not run)."""
    return json_response([h.as_json() for h in request.config_dict[HANDOFF].health()])


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


_PORTAL = Param("portal", "string", "portal member_id")
_AS_OF = Param(
    "as_of", "as-of",
    "the answer as of then, folded from the store: `position:N`, `received:TIME` (when the "
    "ledger received it) or `ts:TIME` (Bitrix24's time; also Unix seconds); TIME is ISO 8601, "
    "e.g. 2026-03-01T00:00:00Z. A plain N is a position, a plain TIME a received time.",
)
_AFTER = Param("after", "integer", "return events after this position (cursor)")
_LIMIT = Param("limit", "limit", f"page size, 1..{MAX_PAGE}")
_LIST_LIMIT = Param("limit", "limit", f"page size, 1..{MAX_PAGE} (default {MAX_PAGE})")
_PAST_THE_HEAD = ((409, "`as_of` names a position past the chain's head (`past_the_head`: "
                   "nothing is stored there yet; the message names the head)"),)

ROUTES: dict[str, tuple[Route, Handler]] = {
    r.path: (r, h)
    for r, h in [
        (Route("/portals", "Portals: trust, installation, last activity", list[PortalOut]),
         portals),
        (Route("/bots", "The bot registry, in (portal, bot id) order, a page at a time",
               list[BotOut],
               (_PORTAL, Param("status", "status", "active or deleted"), _AS_OF,
                Param("after", "bot-cursor", "the cursor of the `Link: rel=next` header: the "
                      "page after this portal member_id and bot id"),
                _LIST_LIMIT), _PAST_THE_HEAD, paged=True), bots),
        (Route("/portals/{member_id}/bots/{bot_id}", "One bot and its whole history",
               BotHistory, (Param("member_id", "string", "portal", "path"),
                            Param("bot_id", "integer", "bot id", "path"), _AFTER, _LIMIT)),
         bot_history),
        (Route("/deletions", "The deletion timeline, in (position, bot id) order, a page at a "
               "time", list[DeletionOut],
               (_PORTAL, Param("from", "date-time", "deleted at or after"),
                Param("to", "date-time", "deleted before"),
                Param("actor", "string", "auth.user_id of the deleting event"),
                Param("cause", "string", "bot deleted / application uninstalled"),
                Param("anomalies", "boolean", "only rows with an anomaly"), _AS_OF,
                Param("after", "deletion-cursor", "the cursor of the `Link: rel=next` header: "
                      "the page after this position and bot id"), _LIST_LIMIT),
               _PAST_THE_HEAD, paged=True),
         deletions),
        (Route("/events", "Stored events, in ledger order", Page[EventOut],
               (_PORTAL, Param("type", "string", "event type, e.g. ONIMBOTDELETE"),
                Param("bot", "integer", "events naming this bot id"),
                Param("from", "date-time", "received at or after"),
                Param("to", "date-time", "received before"), _AFTER, _LIMIT,
                Param("payload", "boolean", "include the stored payloads"))), events),
        (Route("/events/{position}/proof",
               "Proof that the event is in the signed log: the event as stored, its Merkle "
               "audit path and the newest signed checkpoint covering it (check it offline "
               "with `ledger verify-proof`)", ProofOut,
               (Param("position", "integer", "the event's position", "path"),),
               ((409, "no signed checkpoint covers that position yet"),)), event_proof),
        (Route("/rejections", "Refused deliveries: reason, time, portal, sizes, hashes "
               "(never the excerpt)", Page[RejectionOut],
               (Param("portal", "string", "portal member_id or domain"),
                Param("reason", "string", "reason code, e.g. invalid_application_token"),
                Param("from", "date-time", "received at or after"),
                Param("to", "date-time", "received before"), _AFTER, _LIMIT)), rejections),
        (Route("/verification", "Last `ledger verify` result per chain, and the heads now",
               list[VerificationOut]), verification),
        (Route("/projection", "The store position and chain hash the registry is folded up to",
               ProjectionOut), projection),
        (Route("/routes", "Gateway mode: routes, each with its health in this process",
               list[RouteOut]), routes),
    ]
}


def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        PortalOut, BotOut, BotHistory, DeletionOut, EventOut, Page[EventOut], RejectionOut,
        Page[RejectionOut], VerificationOut, ProjectionOut, ErrorOut, RouteOut, ProofOut,
    ]
    _, schemas = models_json_schema(
        [(m, "serialization") for m in models], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, Any] = {}
    for path, (route, _) in ROUTES.items():
        response_schema = TypeAdapter(route.response).json_schema(
            mode="serialization", ref_template="#/components/schemas/{model}"
        )
        response_schema.pop("$defs", None)
        paths[path] = {"get": {
            "summary": route.summary,
            "security": [{"bearer": []}],
            "parameters": [_parameter(p) for p in route.params],
            "responses": {
                "200": {"description": "OK",
                        "content": {"application/json": {"schema": response_schema}},
                        **({"headers": {"Link": _NEXT_LINK}} if route.paged else {})},
                "400": _error("the request cannot be answered as asked"),
                "401": _error("no or bad bearer token"),
                "404": _error("no such portal or bot"),
                "503": _error("PostgreSQL is unavailable; try again — or this process "
                              "serves as many reads (`reads_busy`) or, asked `as_of`, folds as "
                              "many answers (`as_of_busy`) as it may at once: try again after "
                              "the `Retry-After` seconds"),
                **{str(status): _error(why) for status, why in route.errors},
            },
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ledger read API", "version": __version__,
                 "description": "Audit ledger of Bitrix24 chatbot events (read-only)."},
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


_NEXT_LINK = {
    "description": "present when there is a next page: `<URL>; rel=\"next\"` (RFC 8288), the "
    "same question with `after` set to this page's last key; absent on the last page",
    "schema": {"type": "string"},
}


def _parameter(param: Param) -> dict[str, Any]:
    schema = _SCHEMAS[param.kind]
    return {"name": param.name, "in": param.where, "required": param.where == "path",
            "description": param.description, "schema": schema}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer tokens for everything but the OpenAPI document (errors: the root middleware);
    each request that reads the database holds a `read_permit` while it does."""
    if request.path == "/api/v1/openapi.json":
        response = await handler(request)
    else:
        async with read_permit(request):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not plausible_token(token) \
                    or not await _live(request, token):
                raise Unauthorized("send Authorization: Bearer <token> (ledger tokens create)")
            response = await handler(request)
    plain_headers(response)
    return response


@asynccontextmanager
async def read_permit(request: web.Request) -> AsyncIterator[None]:
    """A place at the database for one read request (`ReadGate`: the read API and the console
    share one bound, so reads leave connections for the intake); none when the app has no
    gate."""
    gate = request.config_dict.get(READS)
    if gate is None:
        yield
        return
    async with gate.permit() as permit:
        request[READ_PERMIT] = permit
        yield


def reads_done(request: web.Request) -> None:
    """The request will not touch the database again (a download streaming its spooled rows to
    a client that may be slow): let the next read have its place now."""
    permit = request.get(READ_PERMIT)
    if permit is not None:
        permit.release()


def plain_headers(response: web.StreamResponse) -> None:
    """`PLAIN_HEADERS`, where the answer does not say otherwise."""
    for name, value in PLAIN_HEADERS.items():
        response.headers.setdefault(name, value)


def plausible_token(token: str, limit: int = MAX_TOKEN) -> bool:
    """Ours are short printable ASCII; any other text (undecodable bytes arrive as
    surrogates, which cannot even be hashed) is no token, and is never hashed or looked up."""
    return 0 < len(token) <= limit and token.isascii() and token.isprintable()


async def _live(request: web.Request, token: str) -> bool:
    return await token_is_live(request.config_dict[TOKEN_CACHE], token,
                               _service(request).token_is_live)


async def token_is_live(
    cache: dict[bytes, float], token: str, check: Callable[[bytes], Awaitable[bool]]
) -> bool:
    """Whether a read-API token is live, asking `check` (the database) at most every
    TOKEN_CACHE_SECONDS per token: a revoked token stops working within that window. Only live
    tokens are kept, and expired ones are pruned, so nothing a sender sends grows the cache.
    The API and the console (each with its own cache) both decide through this."""
    digest = token_digest(token)
    now = time.monotonic()
    if cache.get(digest, 0.0) > now:
        return True
    if len(cache) > 10_000:
        for key in [k for k, expiry in cache.items() if expiry <= now]:
            del cache[key]
    if await check(digest):
        cache[digest] = now + TOKEN_CACHE_SECONDS
        return True
    cache.pop(digest, None)
    return False


def create_api() -> web.Application:
    api = web.Application(middlewares=[api_middleware])
    api[TOKEN_CACHE] = {}
    for path, (_, handler) in ROUTES.items():
        api.router.add_get(path, handler)
    api.router.add_get("/openapi.json", openapi)
    return api
