"""Operator actions on routes, shared by the CLI and tests: each is an event in the store."""

from __future__ import annotations

from datetime import UTC, datetime

from ledger.errors import NoSuchRoute, OperatorActionRefused, RouteRefused
from ledger.gateway.routes import (
    ADDED,
    ALL_PORTALS,
    REMOVED,
    ROUTE_EVENT,
    Route,
    check_destination,
    check_pattern,
    fold_routes,
    new_route_id,
    plain_http_hosts,
    route_event,
)
from ledger.models import EventDraft, Stored
from ledger.operations import local_actor
from ledger.settings import Settings
from ledger.storage.gateway_store import GatewayStore
from ledger.storage.store import EventStore


async def current_routes(store: EventStore) -> dict[str, Route]:
    """The route set now: the fold of every route event, in position order."""
    return fold_routes({}, await GatewayStore(store.pool).route_events(ROUTE_EVENT, 0))


async def add_route(
    store: EventStore,
    settings: Settings,
    *,
    member_id: str | None,
    url: str,
    event_pattern: str = "*",
    allow_http: bool = False,
    actor: str | None = None,
) -> tuple[str, int]:
    """Record a new route (checked first); its id and the position of the event recording it."""
    if member_id is not None and (not member_id.strip() or member_id == ALL_PORTALS):
        raise RouteRefused("give a portal's member_id, or all portals")
    check_destination(
        url, allow_http=allow_http,
        http_hosts=plain_http_hosts(settings.forward_plain_http_hosts),
        listen_host=settings.host, listen_port=settings.port,
    )
    route_id = new_route_id()
    draft = route_event(
        action=ADDED, route_id=route_id, actor=actor or local_actor(),
        received_at=datetime.now(UTC), member_id=member_id or ALL_PORTALS,
        event_pattern=check_pattern(event_pattern), url=url, allow_http=allow_http,
    )
    return route_id, await _append(store, draft)


async def remove_route(store: EventStore, route_id: str, *, actor: str | None = None) -> int:
    if route_id not in await current_routes(store):
        raise NoSuchRoute(route_id)
    draft = route_event(action=REMOVED, route_id=route_id, actor=actor or local_actor(),
                        received_at=datetime.now(UTC))
    return await _append(store, draft)


async def _append(store: EventStore, draft: EventDraft) -> int:
    (outcome,) = await store.append([draft])
    if not isinstance(outcome, Stored):
        raise OperatorActionRefused(f"the route change was not recorded: {outcome}")
    return outcome.position
