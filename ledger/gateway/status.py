"""What the intake and the forwarder process share besides the outbox: the route set they last
saw (so either can start while PostgreSQL is away) and the status the forwarder publishes
(route health and its metrics), which `/readyz`, `/metrics`, the read API and the console read.

The status is a small JSON file, replaced atomically every `forward_status_seconds`; one older
than `stale_after` means the forwarder process is not running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ledger.errors import LedgerError
from ledger.gateway.routes import ROUTE_EVENT, Route, fold_routes
from ledger.settings import Settings
from ledger.storage.gateway_store import GatewayStore

log = logging.getLogger(__name__)

STATUS_NAME = "forwarder.json"
FORWARDER_DOWN = "forwarder_down"


@dataclass(frozen=True, slots=True)
class RouteHealth:
    route: Route
    state: str  # ok, failing, refused; forwarder_down (seen from the intake)
    backlog: int
    oldest_pending_seconds: float
    last_outcome: str | None
    last_status: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    refused: str | None

    def as_json(self) -> dict[str, Any]:
        r = self.route
        return route_json(r) | {
            "state": self.state, "backlog": self.backlog,
            "oldest_pending_seconds": round(self.oldest_pending_seconds, 3),
            "last_outcome": self.last_outcome, "last_status": self.last_status,
            "last_error": self.last_error,
            "last_attempt_at": self.last_attempt_at.isoformat() if self.last_attempt_at else None,
            "refused": self.refused,
        }


def route_json(r: Route) -> dict[str, Any]:
    return {"route_id": r.route_id, "member_id": r.member_id, "event_pattern": r.event_pattern,
            "url": r.url, "allow_http": r.allow_http, "added_at": r.added_at.isoformat(),
            "added_by": r.added_by, "position": r.position}


def route_of(r: dict[str, Any]) -> Route:
    return Route(
        route_id=r["route_id"], member_id=r["member_id"], event_pattern=r["event_pattern"],
        url=r["url"], allow_http=r["allow_http"], added_at=datetime.fromisoformat(r["added_at"]),
        added_by=r["added_by"], position=r["position"],
    )


def _replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def save_routes(path: Path, position: int, routes: list[Route]) -> None:
    """The route set as last folded (raises OSError)."""
    _replace(path, orjson.dumps({"position": position,
                                 "routes": [route_json(r) for r in routes]}))


def load_routes(path: Path) -> tuple[int, dict[str, Route]] | None:
    """The saved route set, if any (raises OSError, ValueError, KeyError, TypeError)."""
    if not path.exists():
        return None
    data = orjson.loads(path.read_bytes())
    return int(data["position"]), {r["route_id"]: route_of(r) for r in data["routes"]}


class RouteBook:
    """The route set folded from route events — what the intake's handoff and the forwarder
    process each keep — saved at `path` after every change, so either process starts from the
    set it last saw while PostgreSQL is away. `on_change` hears every new set, `on_reload` every
    reload from PostgreSQL that succeeded (the set is then current, changed or not)."""

    def __init__(
        self, store: GatewayStore, path: Path,
        on_change: Callable[[dict[str, Route]], None] | None = None,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        self._store, self._path, self._on_change = store, path, on_change
        self._on_reload = on_reload
        self.position = 0
        self.routes: dict[str, Route] = {}

    def ordered(self) -> list[Route]:
        return sorted(self.routes.values(), key=lambda r: r.position)

    async def start(self) -> None:
        """Routes from PostgreSQL, else the set saved last time (none usable: none)."""
        try:
            await self.reload()
        except LedgerError as exc:
            log.error("routes not loaded from PostgreSQL (%s); using %s", exc, self._path)
            try:
                saved = load_routes(self._path)
            except (OSError, ValueError, KeyError, TypeError) as bad:
                log.error("no saved routes usable in %s (%s): none until PostgreSQL answers",
                          self._path, bad)
                return
            if saved is not None:
                self.position, routes = saved
                self._changed(routes)

    async def reload(self) -> None:
        """Fold route changes recorded since the last look (`ledger routes` while serving)."""
        events = await self._store.route_events(ROUTE_EVENT, self.position)
        if events:
            self.position = events[-1][0]
            self._changed(fold_routes(self.routes, events))
            try:
                save_routes(self._path, self.position, self.ordered())
            except OSError as exc:
                log.warning("cannot save the routes to %s: %s", self._path, exc)
        if self._on_reload is not None:
            self._on_reload()

    async def follow(self, interval: float) -> None:
        """Reload every `interval` seconds until cancelled (a poll: route changes made by
        `ledger routes` reach a running service this way)."""
        while True:
            await asyncio.sleep(interval)  # a poll interval
            try:
                await self.reload()
            except LedgerError as exc:
                log.debug("routes not reloaded: %s", exc)

    def _changed(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        if self._on_change is not None:
            self._on_change(routes)


def status_path(settings: Settings) -> Path:
    return settings.outbox_root / STATUS_NAME


def publish(
    settings: Settings, health: list[RouteHealth], metrics: bytes,
    *, unreadable: dict[str, str] | None = None,
) -> None:
    """Written by the forwarder process (raises OSError). `unreadable`: outbox directories
    that do not open (wholly or in part), and why — names, sizes and what to do, never a
    body, a query or key material."""
    _replace(status_path(settings), orjson.dumps({
        "pid": os.getpid(), "written_at": time.time(),
        "routes": [h.as_json() for h in health], "metrics": metrics.decode(),
        "unreadable_outboxes": unreadable or {},
    }))


@dataclass(frozen=True, slots=True)
class Published:
    pid: int
    age_seconds: float
    routes: dict[str, dict[str, Any]]
    metrics: bytes
    unreadable_outboxes: dict[str, str] = field(default_factory=dict)


def read_status(settings: Settings) -> Published | None:
    """The forwarder's last status, or None when there is none or it is stale."""
    try:
        data = orjson.loads(status_path(settings).read_bytes())
        age = time.time() - float(data["written_at"])
        if age > stale_after(settings):
            return None
        return Published(int(data["pid"]), age, {r["route_id"]: r for r in data["routes"]},
                         str(data["metrics"]).encode(),
                         {str(k): str(v) for k, v in
                          dict(data.get("unreadable_outboxes") or {}).items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_after(settings: Settings) -> float:
    return 3 * settings.forward_status_seconds + 2.0


def health_of(route: Route, published: dict[str, Any] | None) -> RouteHealth:
    """A route's health as the intake reports it: the forwarder's word, or that it is down."""
    if published is None:
        return RouteHealth(route, FORWARDER_DOWN, 0, 0.0, None, None, None, None, None)
    last = published.get("last_attempt_at")
    return RouteHealth(
        route, str(published["state"]), int(published["backlog"]),
        float(published["oldest_pending_seconds"]), published.get("last_outcome"),
        published.get("last_status"), published.get("last_error"),
        datetime.fromisoformat(last) if last else None, published.get("refused"),
    )
