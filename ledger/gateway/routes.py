"""Routes: which deliveries go to which destination. Pure: no I/O.

A route is not a row anyone can edit: it is the fold of the `LEDGER.ROUTE_CHANGED` operator
events in the store, in position order (add, then perhaps remove), so who pointed a portal's
traffic where, and when, is part of the tamper-evident record.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from ledger.errors import RouteRefused
from ledger.hashing import document_json, sha256
from ledger.models import ORIGIN_OPERATOR, EventDraft

ROUTE_EVENT = "LEDGER.ROUTE_CHANGED"
# what an outbox record says of its delivery (`Accepted.stage`, the record's "stage"):
# AHEAD: written before the commit, forwarded once the forwarder finds its event stored;
# SPOOLED: spooled (fsync'd) while PostgreSQL is away, forwarded at once with its spool id;
# VOID: the delivery an AHEAD record names was refused, never stored (no body);
# STORED: stored at `position` (records of earlier revisions, written after the commit)
AHEAD, SPOOLED, VOID, STORED = "ahead", "spooled", "void", "stored"
ALL_PORTALS = "*"
ADDED, REMOVED = "added", "removed"


@dataclass(frozen=True, slots=True)
class Route:
    route_id: str
    member_id: str  # a portal's member_id, or ALL_PORTALS
    event_pattern: str  # shell-style pattern over the event type, e.g. ONIMBOT*
    url: str
    allow_http: bool
    added_at: datetime
    added_by: str
    position: int  # of the event that added it

    def matches(self, member_id: str, event_type: str) -> bool:
        return (self.member_id in (ALL_PORTALS, member_id)) and fnmatchcase(
            event_type.upper(), self.event_pattern.upper()
        )


@dataclass(frozen=True, slots=True)
class Accepted:
    """A delivery as received, at one stage (`AHEAD` of its commit, `SPOOLED`, `VOID`ed:
    refused; `STORED` at `position`).

    `body`, `content_type` and `raw_query` are the original bytes and text, secrets included:
    they go only to memory, the encrypted outbox and the destination.
    """

    body: bytes
    content_type: str | None
    raw_query: str
    member_id: str
    event_type: str
    position: int | None  # None while spooled
    event_hash: bytes | None  # None while spooled
    dedup_key: bytes  # the event's identity: what a spooled delivery is known by
    received_at: datetime
    stage: str = STORED


def new_route_id() -> str:
    return "rt_" + os.urandom(5).hex()


def plain_http_hosts(setting: str) -> frozenset[str]:
    """`LEDGER_FORWARD_PLAIN_HTTP_HOSTS`: comma-separated hosts that may be reached over http."""
    return frozenset(h.strip().lower() for h in setting.split(",") if h.strip())


def _local_names(host: str) -> set[str]:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - compared, not bound
        return {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", host}  # noqa: S104
    return {host.lower()} | ({"localhost", "::1"} if host.startswith("127.") else set())


def check_destination(
    url: str,
    *,
    allow_http: bool,
    http_hosts: frozenset[str],
    listen_host: str,
    listen_port: int,
) -> str:
    """The URL if a route may point there, else `RouteRefused` saying what to change.

    https only unless the operator allowed plain http (for the route or the host); no query
    string (the delivery's own is appended verbatim); never the ledger's own listen address.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RouteRefused(f"{url!r} is not a URL: {exc}") from exc
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        raise RouteRefused(f"{url!r}: a destination is an https:// URL with a host")
    if parts.scheme == "http" and not (allow_http or host in http_hosts):
        raise RouteRefused(
            f"{url!r} is plain http: use https, or allow it with --allow-http "
            "(or LEDGER_FORWARD_PLAIN_HTTP_HOSTS)"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise RouteRefused(
            f"{url!r}: no query string, fragment or credentials (the delivery's own query "
            "string is appended as Bitrix24 sent it)"
        )
    port = port or (443 if parts.scheme == "https" else 80)
    address = _address(host)
    if address is None and _legacy_ipv4(host):
        raise RouteRefused(f"{url!r}: write an IPv4 address as four decimal numbers")
    if port == listen_port and (
        host.rstrip(".") in _local_names(listen_host.lower())
        or (address is not None and _is_local(address, listen_host))
    ):
        raise RouteRefused(f"{url!r} is the ledger's own listen address: it would loop")
    return url


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(host: str) -> Address | None:
    """The IP address a URL's host names literally (IPv4-mapped IPv6 unwrapped), if it does."""
    try:
        address = ipaddress.ip_address(host.rstrip("."))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _legacy_ipv4(host: str) -> bool:
    """`127.1`, `0x7f000001`, `2130706433`: forms C resolvers read as IPv4 addresses."""
    try:
        socket.inet_aton(host.rstrip("."))
    except OSError:
        return False
    return True


def _is_local(address: Address, listen_host: str) -> bool:
    """Whether the ledger, listening on `listen_host`, would answer at `address`."""
    if address.is_loopback or address.is_unspecified:
        return True
    return _address(listen_host) == address


def check_pattern(pattern: str) -> str:
    if not pattern or len(pattern) > 200 or any(c.isspace() for c in pattern):
        raise RouteRefused(f"{pattern!r}: an event pattern is like ONIMBOT* or ONAPPINSTALL")
    return pattern.upper()


def route_event(
    *,
    action: str,
    route_id: str,
    actor: str,
    received_at: datetime,
    member_id: str | None = None,
    event_pattern: str | None = None,
    url: str | None = None,
    allow_http: bool = False,
) -> EventDraft:
    """The `LEDGER.ROUTE_CHANGED` event recording one route change (what, who, when).

    Its `member_id` column is empty (like an allowance by domain): a route is the operator's
    act, not the portal's, and must not appear as portal activity in the projections.
    """
    document: dict[str, Any] = {"action": action, "route_id": route_id, "actor": actor}
    if action == ADDED:
        document |= {"member_id": member_id, "event_pattern": event_pattern, "url": url,
                     "allow_http": allow_http}
    payload = document_json(document)
    return EventDraft(
        event_type=ROUTE_EVENT,
        member_id="",
        domain=None,
        origin=ORIGIN_OPERATOR,
        bot_ids=(),
        occurred_at=received_at,
        received_at=received_at,
        payload=payload,
        payload_sha256=sha256(payload),
        dedup_key=sha256(os.urandom(32)),
        body_sha256=None,
        metadata={},
    )


def fold_routes(
    routes: dict[str, Route],
    events: Iterable[tuple[int, datetime, dict[str, Any]]],
) -> dict[str, Route]:
    """Apply route events (position, received_at, payload), in position order, to a route set."""
    current = dict(routes)
    for position, received_at, payload in events:
        route_id = str(payload.get("route_id", ""))
        if payload.get("action") == REMOVED:
            current.pop(route_id, None)
        elif payload.get("action") == ADDED and route_id:
            current[route_id] = Route(
                route_id=route_id,
                member_id=str(payload.get("member_id") or ALL_PORTALS),
                event_pattern=str(payload.get("event_pattern") or "*"),
                url=str(payload.get("url") or ""),
                allow_http=bool(payload.get("allow_http")),
                added_at=received_at,
                added_by=str(payload.get("actor") or ""),
                position=position,
            )
    return current


class RouteOut(BaseModel):
    """A route and its health, as the read API lists it."""

    model_config = ConfigDict(frozen=True)

    route_id: str
    member_id: str = Field(description="a portal's member_id, or * for every portal")
    event_pattern: str = Field(description="shell pattern over the event type")
    url: str
    allow_http: bool
    added_at: datetime
    added_by: str
    position: int = Field(description="of the LEDGER.ROUTE_CHANGED event that added it")
    state: str = Field(description="ok, failing (the last attempt failed) or refused")
    backlog: int = Field(description="forwards pending in this process")
    oldest_pending_seconds: float
    last_outcome: str | None = Field(description="delivered, failed or given_up")
    last_status: int | None = Field(description="HTTP status of the last attempt")
    last_error: str | None
    last_attempt_at: datetime | None
    refused: str | None = Field(description="why this ledger will not forward there")
