"""Prometheus metrics of one ledger process, in a registry of its own (no global state)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _PortalSilence(Collector):
    """Seconds since each portal's last stored event, computed when scraped."""

    def __init__(self, last_seen: dict[str, float]) -> None:
        self._last_seen = last_seen

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ledger_portal_seconds_since_last_event",
            "Seconds since this process stored an event of the portal",
            labels=["member_id"],
        )
        now = time.time()
        for member_id, seen in self._last_seen.items():
            family.add_metric([member_id], now - seen)
        return [family]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("ledger_deliveries_received", "Deliveries received", registry=r)
        self.accepted = Counter("ledger_deliveries_accepted", "Deliveries stored", registry=r)
        self.duplicates = Counter(
            "ledger_deliveries_duplicate", "Redeliveries of stored events", registry=r
        )
        self.rejected = Counter(
            "ledger_deliveries_rejected", "Deliveries refused", ["reason"], registry=r
        )
        self.rejections_suppressed = Counter(
            "ledger_rejections_unlogged", "Rejections not written (rate limit)", registry=r
        )
        self.batch_size = Histogram(
            "ledger_append_batch_size", "Drafts per group-commit transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r,
        )
        self.append_seconds = Histogram(
            "ledger_append_seconds", "Duration of one append transaction",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r,
        )
        self.spooled = Counter(
            "ledger_deliveries_spooled", "Deliveries spooled while PostgreSQL was away",
            registry=r,
        )
        self.spool_depth = Gauge(
            "ledger_spool_records", "Deliveries waiting in the local spool", registry=r
        )
        self.spool_age = Gauge(
            "ledger_spool_oldest_seconds", "Age of the oldest spooled delivery", registry=r
        )
        self.projector_lag = Gauge(
            "ledger_projector_lag_events", "Events not yet in the projections", registry=r
        )
        self.last_seen: dict[str, float] = {}
        r.register(_PortalSilence(self.last_seen))

    def seen(self, member_id: str) -> None:
        self.last_seen[member_id] = time.time()

    def watch_lag(self, lag: Callable[[], int]) -> None:
        self.projector_lag.set_function(lag)

    def watch_spool(self, depth: Callable[[], int], age: Callable[[], float]) -> None:
        self.spool_depth.set_function(depth)
        self.spool_age.set_function(age)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---- gateway mode (ledger.gateway) ---------------------------------------------------------


class _RouteBacklog(Collector):
    """Per route: forwards pending and the age of the oldest, computed when scraped."""

    def __init__(self, backlog: Callable[[], dict[str, tuple[int, float]]]) -> None:
        self._backlog = backlog

    def collect(self) -> list[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "ledger_forward_backlog", "Forwards waiting for the route's destination",
            labels=["route"],
        )
        oldest = GaugeMetricFamily(
            "ledger_forward_oldest_pending_seconds",
            "Age of the oldest forward waiting for the route's destination", labels=["route"],
        )
        for route, (count, age) in self._backlog().items():
            pending.add_metric([route], count)
            oldest.add_metric([route], age)
        return [pending, oldest]


class ForwardMetrics:
    """Gateway mode's metrics, in the process's registry."""

    def __init__(
        self, metrics: Metrics, backlog: Callable[[], dict[str, tuple[int, float]]]
    ) -> None:
        r = metrics.registry
        self.attempts = Counter(
            "ledger_forward_attempts", "Forward attempts by outcome (delivered, failed)",
            ["route", "outcome"], registry=r,
        )
        self.given_up = Counter(
            "ledger_forward_given_up", "Forwards given up, by reason", ["route", "reason"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "ledger_forward_delivery_seconds", "From durable to the destination's 2xx",
            ["route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 300, 3600),
            registry=r,
        )
        self.unrecorded = Counter(
            "ledger_forward_attempts_unrecorded",
            "Attempt records dropped because PostgreSQL was away too long", registry=r,
        )
        r.register(_RouteBacklog(backlog))
