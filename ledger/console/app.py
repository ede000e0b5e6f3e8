"""The console's sub-application: sessions, security headers, HTML errors, routes.

A session is the read-API token itself, in a cookie the page's scripts cannot read
(HttpOnly), that no other site's request carries (SameSite=Strict), sent only over https when
the request came that way or `LEDGER_CONSOLE_SECURE_COOKIE` says a TLS proxy is in front. Every
request checks the token the way the read API does (its SHA-256 looked up through
`AuditService`, cached for the API's `TOKEN_CACHE_SECONDS`), so revoking a token ends its console
sessions within that window.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson
from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ledger.api import AUDIT, plausible_token, read_permit
from ledger.api import token_is_live as api_token_is_live
from ledger.audit import AuditService
from ledger.console import present
from ledger.console.reader import NameCache, Reader
from ledger.errors import BadQuery, LedgerError
from ledger.settings import Settings
from ledger.storage.console_store import ConsoleStore

log = logging.getLogger(__name__)

COOKIE = "ledger_console"
COOKIE_PATH = "/console/"
SESSION_SECONDS = 12 * 3600
MAX_FORM_BYTES = 4096
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
PUBLIC = frozenset({"/console/sign-in", "/console/static/console.css"})

CONSOLE_SETTINGS = web.AppKey("console_settings", Settings)
TEMPLATES = web.AppKey("console_templates", Environment)
SESSIONS = web.AppKey("console_sessions", dict)  # token sha256 -> monotonic expiry
NAMES = web.AppKey("console_names", NameCache)
# set by the app factory once the pool exists (the console holds no pool of its own)
CONSOLE_STORE = web.AppKey("console_store", ConsoleStore)
STYLESHEET = web.AppKey("console_stylesheet", bytes)
SESSION_TOKEN = web.RequestKey("console_token", str)
CSRF = web.RequestKey("console_csrf", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def isolated(value: object) -> Markup:
    """Sender text (bot codes, domains, user ids and names, event types) escaped and in its
    own `<bdi>`: a right-to-left override or embedding in it cannot run past it and reorder
    the rest of the table row as a reader sees it (Unicode bidi isolation)."""
    return Markup("<bdi>{}</bdi>").format(value)


def templates() -> Environment:
    """Autoescaped templates shipped in the package; an undefined name is an error, not ''."""
    env = Environment(
        loader=PackageLoader("ledger.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["iso"] = present.iso
    env.filters["pretty"] = lambda v: orjson.dumps(v, option=orjson.OPT_INDENT_2).decode()
    env.filters["bdi"] = isolated
    return env


def render(
    request: web.Request, name: str, http_status: int = 200, **context: Any
) -> web.Response:
    env = request.config_dict[TEMPLATES]
    body = env.get_template(name).render(
        signed_in=SESSION_TOKEN in request, csrf=request.get(CSRF, ""),
        path=request.path, **context,
    )
    return web.Response(text=body, status=http_status, content_type="text/html",
                        charset="utf-8")


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def csrf_token(token: str) -> str:
    """The sign-out form's CSRF value: bound to the session's token, useless without it."""
    return hmac.new(token.encode(), b"ledger-console-sign-out", hashlib.sha256).hexdigest()


def reader(request: web.Request) -> Reader:
    audit: AuditService = request.config_dict[AUDIT]
    return Reader(audit, request.config_dict[CONSOLE_STORE],
                  request.config_dict[CONSOLE_SETTINGS], request.config_dict[NAMES])


async def token_is_live(request: web.Request, token: str) -> bool:
    """The read API's own decision (`ledger.api.token_is_live`), with the console's sessions
    as its cache."""
    return await api_token_is_live(request.config_dict[SESSIONS], token,
                                   request.config_dict[AUDIT].token_is_live)


def same_origin(request: web.Request) -> bool:
    """A state-changing POST must come from this site's own pages (SameSite=Strict already
    keeps the cookie off cross-site requests; this refuses them outright)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


def set_session(request: web.Request, response: web.StreamResponse, token: str) -> None:
    secure = request.secure or request.config_dict[CONSOLE_SETTINGS].console_secure_cookie
    response.set_cookie(COOKIE, token, path=COOKIE_PATH, httponly=True, samesite="Strict",
                        secure=secure, max_age=SESSION_SECONDS)


def end_session(request: web.Request, response: web.StreamResponse) -> None:
    secure = request.secure or request.config_dict[CONSOLE_SETTINGS].console_secure_cookie
    response.set_cookie(COOKIE, "", path=COOKIE_PATH, httponly=True, samesite="Strict",
                        secure=secure, max_age=0)


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sessions for every page but sign-in; HTML for the errors a reader can cause; the
    security headers on every answer."""
    try:
        async with read_permit(request):  # the read API's bound, shared
            response = await _authenticated(request, handler)
    except LedgerError as exc:
        if exc.status >= 500:
            raise  # the root middleware logs it and answers without details
        response = render(request, "error.html", exc.status, status=exc.status,
                          message=exc.message)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.status >= 500:
            raise
        response = render(request, "error.html", exc.status, status=exc.status,
                          message=exc.reason)
    if not response.prepared:  # a streamed download set its own before its first byte
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC:
        return await handler(request)
    token = request.cookies.get(COOKIE, "")
    if plausible_token(token, 128) and await token_is_live(request, token):
        request[SESSION_TOKEN] = token
        request[CSRF] = csrf_token(token)
        return await handler(request)
    after = quote(request.path, safe="/")
    response = redirect(
        f"/console/sign-in?next={after}" + ("&ended=1" if token else "")
    )
    if token:
        end_session(request, response)
    return response


async def read_form(request: web.Request) -> dict[str, str]:
    """A small urlencoded form, bounded before it is read, decoded strictly: a browser sends
    it as percent-encoded UTF-8 in ASCII, and anything else (raw bytes that are not UTF-8, a
    charset Python does not know — which aiohttp's own parser raised on) is a 400."""
    if request.content_length is None or request.content_length > MAX_FORM_BYTES:
        raise BadQuery(f"a console form is at most {MAX_FORM_BYTES} bytes")
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadQuery("send the form as application/x-www-form-urlencoded")
    # all of it, however it arrives (`content.read(n)` gives what has arrived so far: a form
    # in two TCP segments was cut short); at most the Content-Length checked above
    body = await request.read()
    try:
        fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="strict",
                           max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadQuery("the form is not percent-encoded UTF-8 (send it from the console)") \
            from exc
    return dict(fields)


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(body=request.config_dict[STYLESHEET], content_type="text/css",
                        headers={"Cache-Control": "max-age=3600"})


def create_console(settings: Settings) -> web.Application:
    """Mounted at /console/ by `ledger.web.create_app` (the API's AuditService is shared)."""
    from ledger.console import views

    console = web.Application(middlewares=[console_middleware])
    console[CONSOLE_SETTINGS] = settings
    console[TEMPLATES] = templates()
    console[SESSIONS] = {}
    console[NAMES] = NameCache()
    console[STYLESHEET] = (
        resources.files("ledger.console").joinpath("static/console.css").read_bytes()
    )
    console.router.add_get("/static/console.css", stylesheet)
    views.add_routes(console.router)
    return console
