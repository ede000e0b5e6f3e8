"""The one parser of "as of" moments and of strict integers, for the read API and the CLI.

An answer "as of" a moment is the fold of the events up to then. Which "then" must be said:
a **position** in the store, a **received** time (when the ledger received the delivery) or a
Bitrix24 time (**ts**, when the portal says it happened). The three differ: spooled deliveries
keep their original received time but get later positions, and Bitrix24 time runs on the
portal's clock (and is taken as no later than the received time). Pure code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from ledger.errors import BadQuery

INT64_MAX = 2**63 - 1
_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")
_SECONDS_MAX = 253402300799  # 9999-12-31T23:59:59Z

FORMS = (
    "position:N (or plain N), received:TIME (or plain TIME) or ts:TIME, where TIME is ISO 8601 "
    "like 2026-03-01T00:00:00Z (ts: also Unix seconds)"
)


def strict_int64(value: object) -> int | None:
    """A non-negative int64 from an int or from ASCII digits only — never `"²"`, other
    scripts' digits, `" 7"`, `"7\\n"`, `"+7"` or `"1_0"`, which `int()`/`isdigit()` let
    through."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= INT64_MAX else None
    if not isinstance(value, str) or not _ASCII_DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if number <= INT64_MAX else None


@dataclass(frozen=True, slots=True)
class Position:
    """Everything stored at or before this position."""

    position: int


@dataclass(frozen=True, slots=True)
class Received:
    """Everything the ledger had received by this time (whatever position it got)."""

    at: datetime


@dataclass(frozen=True, slots=True)
class Occurred:
    """Everything that happened by this Bitrix24 time: an event's `ts`, but never later than
    its received time (`ts` is the sender's to write; it cannot have happened after the ledger
    received it); events without one count by their received time."""

    at: datetime


AsOf = Position | Received | Occurred


def parse_time(text: str, name: str = "time") -> datetime:
    """An ISO 8601 time; without a zone it is UTC. Its UTC moment must exist too: an offset
    can push year 1 or 9999 out of range (`0001-01-01T00:00:00+01:00`), which PostgreSQL would
    refuse as a server error."""
    problem = f"`{name}` must be an ISO 8601 time, e.g. 2026-03-01T00:00:00Z"
    if not text.isascii():
        raise BadQuery(problem)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise BadQuery(problem) from exc
    return moment


def parse_as_of(text: str | None, name: str = "as_of") -> AsOf | None:
    """`position:412`, `received:2026-03-01T00:00:00Z`, `ts:2026-03-01T00:00:00Z` or
    `ts:1772323200`; a plain number is a position and a plain time a received time (the
    forms before kinds were named). None or empty: now."""
    if not text:
        return None
    kind, sep, value = text.partition(":")
    if sep and kind in ("position", "received", "ts"):
        if kind == "position":
            return Position(_position(value, name))
        if kind == "received":
            return Received(_time(value, name))
        seconds = strict_int64(value)
        if seconds is not None:
            if seconds > _SECONDS_MAX:
                raise BadQuery(f"`{name}`: {seconds} seconds is past the year 9999")
            return Occurred(datetime.fromtimestamp(seconds, UTC))
        return Occurred(_time(value, name))
    if strict_int64(text) is not None:
        return Position(_position(text, name))
    if text[:1].isdigit() and "-" in text:
        return Received(_time(text, name))
    raise BadQuery(f"`{name}` must be one of: {FORMS}")


def _position(text: str, name: str) -> int:
    position = strict_int64(text)
    if position is None:
        raise BadQuery(f"`{name}`: a position is ASCII digits from 0 to {INT64_MAX}")
    return position


def _time(text: str, name: str) -> datetime:
    try:
        return parse_time(text, name)
    except BadQuery:
        raise BadQuery(f"`{name}` must be one of: {FORMS}") from None
