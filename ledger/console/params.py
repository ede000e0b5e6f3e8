"""Strict parsing of what a browser sends the console: query parameters and form fields.

All of it is hostile. A value is accepted only in its expected shape and length; anything else
is a `BadQuery` (400), never a 500. The "as of" parsing is one function (`parse_as_of`) so that
it can follow the read API's parser wherever that goes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

from multidict import MultiMapping

from ledger import asof
from ledger.errors import BadQuery

MAX_TEXT = 200
MAX_POSITION = 2**63 - 1
_PORTAL = re.compile(r"^[A-Za-z0-9._:\-]{1,200}\Z")
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.]{1,100}\Z")
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{8,128}\Z")
_NEXT = re.compile(r"/console/[A-Za-z0-9/_\-.]{0,300}")  # fullmatch: `$` passes a "\n"


def single(query: MultiMapping[str], name: str) -> str | None:
    """The one value of a parameter (None when absent or empty); repeating it is refused."""
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadQuery(f"`{name}` is given more than once")
    if not values or values[0] == "":
        return None
    value = values[0]
    if len(value) > MAX_TEXT or "\x00" in value:
        raise BadQuery(f"`{name}` is too long or holds forbidden characters")
    return value


def portal(query: MultiMapping[str]) -> str | None:
    """A portal, by domain (e.g. some-domain.bitrix24.com) or member_id."""
    value = single(query, "portal")
    if value is None:
        return None
    if not _PORTAL.match(value):
        raise BadQuery("`portal` is a portal domain or member_id (letters, digits, . - _ :)")
    return value.lower()


def choice(query: MultiMapping[str], name: str, allowed: tuple[str, ...]) -> str | None:
    value = single(query, name)
    if value is not None and value not in allowed:
        raise BadQuery(f"`{name}` is one of: {', '.join(allowed)}")
    return value


def integer(query: MultiMapping[str], name: str, *, low: int = 0, high: int = MAX_POSITION
            ) -> int | None:
    value = single(query, name)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise BadQuery(f"`{name}` must be a whole number")
    number = int(value)
    if not low <= number <= high:
        raise BadQuery(f"`{name}` must be between {low} and {high}")
    return number


def moment(query: MultiMapping[str], name: str) -> datetime | None:
    value = single(query, name)
    return None if value is None else parse_time(value, name)


def parse_time(value: str, name: str) -> datetime:
    """The read API's and the CLI's parser (`asof.parse_time`), on the form's trimmed text."""
    return asof.parse_time(value.strip(), name)


def parse_as_of(value: str | None) -> asof.AsOf | None:
    """"As of": the read API's own parser (`ledger.asof`): position:N, received:TIME or
    ts:TIME (Bitrix24 time); a plain number is a position, a plain time a received time."""
    return asof.parse_as_of(value.strip() if value else None, "as_of")


def as_of_text(moment: asof.AsOf) -> str:
    """The canonical spelling of an "as of", as links and file names carry it."""
    if isinstance(moment, asof.Position):
        return f"position:{moment.position}"
    kind = "received" if isinstance(moment, asof.Received) else "ts"
    return f"{kind}:{moment.at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def as_of_words(moment: asof.AsOf) -> str:
    if isinstance(moment, asof.Position):
        return f"position {moment.position}"
    if isinstance(moment, asof.Received):
        return f"everything received by {moment.at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    at = moment.at.astimezone(UTC)
    return f"everything that happened (Bitrix24 time) by {at:%Y-%m-%dT%H:%M:%SZ}"


def event_type(query: MultiMapping[str]) -> str | None:
    value = single(query, "type")
    if value is not None and not _EVENT_TYPE.match(value):
        raise BadQuery("`type` is an event type such as ONIMBOTDELETE")
    return value.upper() if value else None  # ASCII only (`_EVENT_TYPE`)


def pair_cursor(query: MultiMapping[str], name: str = "cursor") -> tuple[str, int] | None:
    """A keyset cursor `<text>:<number>` (a portal and a bot, or a position and a bot)."""
    value = single(query, name)
    if value is None:
        return None
    head, sep, tail = value.rpartition(":")
    if not sep or not tail.isascii() or not tail.isdigit() or int(tail) > MAX_POSITION:
        raise BadQuery(f"`{name}` is not a cursor this page gave out")
    if not _PORTAL.match(head):
        raise BadQuery(f"`{name}` is not a cursor this page gave out")
    return head, int(tail)


def position_pair(query: MultiMapping[str], name: str = "cursor") -> tuple[int, int] | None:
    pair = pair_cursor(query, name)
    if pair is None:
        return None
    if not pair[0].isascii() or not pair[0].isdigit() or int(pair[0]) > MAX_POSITION:
        raise BadQuery(f"`{name}` is not a cursor this page gave out")
    return int(pair[0]), pair[1]


def token(form: Mapping[str, object]) -> str:
    value = form.get("token")
    if not isinstance(value, str) or not _TOKEN.match(value.strip()):
        raise BadQuery("paste the whole token `ledger tokens create` printed (lgr_…)")
    return value.strip()


def next_path(value: object) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if (isinstance(value, str) and _NEXT.fullmatch(value)
            and "//" not in value and ".." not in value):
        return value
    return "/console/"
