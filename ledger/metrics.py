"""Prometheus metrics of the service, in a registry of their own (no global state).

One process (`serve`): the registry is rendered as it is. Several (`serve --workers N`):
prometheus-client's multiprocess mode. Every worker writes its counters and histograms to mmap
files in `metrics_dir` (LEDGER_DATA_DIR/metrics, emptied by the parent at start and set as
PROMETHEUS_MULTIPROC_DIR before the workers exist), and whichever worker is scraped sums all of
them: one scrape shows the whole service, and a counter never goes backwards however the scrapes
land. Values computed on demand (spool depth and age, projector lag) are sampled into
multiprocess gauges every `SAMPLE_SECONDS` by each worker (summed for the spool depth, the
maximum otherwise, live workers only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ledger.errors import ConfigurationError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE_SECONDS = 1.0
SEEN_RESOLUTION_SECONDS = 1.0
_LAST_EVENT = "ledger_portal_last_event_timestamp_seconds"


class _PortalSilence(Collector):
    """Seconds since each portal's last stored event, computed when scraped."""

    def __init__(self, last_seen: Callable[[], dict[str, float]]) -> None:
        self._last_seen = last_seen

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ledger_portal_seconds_since_last_event",
            "Seconds since the service stored an event of the portal",
            labels=["member_id"],
        )
        now = time.time()
        for member_id, seen in self._last_seen().items():
            family.add_metric([member_id], now - seen)
        return [family]


class Metrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._dir = multiprocess_dir
        if multiprocess_dir is not None and not getattr(_values.ValueClass, "_multiprocess", False):
            raise ConfigurationError(
                "metrics across workers need PROMETHEUS_MULTIPROC_DIR set before the process "
                "starts (`ledger serve --workers N` does this)"
            )
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
            "ledger_rejections_unlogged",
            "Refusals counted but not written to the rejection log (rate limit, or the log "
            "could not be written)", registry=r,
        )
        self.batch_size = Histogram(
            "ledger_append_batch_size", "Drafts per group-commit transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r,
        )
        self.append_seconds = Histogram(
            "ledger_append_seconds", "Duration of one append transaction",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r,
        )
        self.append_ways = Counter(
            "ledger_append_batches", "Committed append batches by the way they took: "
            "one_statement (portals' trust known to the intake), retried (the one statement "
            "found the trust moved or a key stored, then the long way), long", ["way"],
            registry=r,
        )
        self.spooled = Counter(
            "ledger_deliveries_spooled", "Deliveries spooled while PostgreSQL was away",
            registry=r,
        )
        self.spool_depth = Gauge(
            "ledger_spool_records", "Deliveries waiting in the local spool", registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_age = Gauge(
            "ledger_spool_oldest_seconds", "Age of the oldest spooled delivery", registry=r,
            multiprocess_mode="livemax",
        )
        # every worker looks at every spool (`ledger.adoption`): the same value from each
        self.spool_absent_bytes = Gauge(
            "ledger_spool_absent_bytes", "Undrained bytes in the spools of worker numbers no "
            "process runs (a running worker adopts and drains them)", registry=r,
            multiprocess_mode="livemax",
        )
        self.spool_absent_age = Gauge(
            "ledger_spool_absent_oldest_seconds", "Age of the oldest delivery waiting in the "
            "spool of a worker number no process runs", registry=r,
            multiprocess_mode="livemax",
        )
        self.projector_lag = Gauge(
            "ledger_projector_lag_events", "Events not yet in the projections", registry=r,
            multiprocess_mode="livemax",
        )
        self.last_event = Gauge(
            _LAST_EVENT, "Unix time the service last stored an event of the portal",
            ["member_id"], registry=r, multiprocess_mode="max",
        )
        self.task_failures = Counter(
            "ledger_task_failures", "Crashes of a supervised background task", ["task"],
            registry=r,
        )
        self.task_up = Gauge(
            "ledger_task_up", "1 while a supervised background task runs", ["task"], registry=r
        )
        self.batch_failures = Counter(
            "ledger_batch_failures",
            "Unexpected failures while storing, spooling or draining a batch", ["stage"],
            registry=r,
        )
        self.forward_handoff_failures = Counter(
            "ledger_forward_handoff_failures",
            "Gateway mode: durable deliveries whose forward could not be sealed into the outbox "
            "(lost; recorded as given up: outbox_unwritable, outbox_stalled, outbox_full)",
            registry=r,
        )
        self.forward_seals_given_up = Counter(
            "ledger_forward_seals_given_up",
            "Gateway mode: forwards given up by the intake before they reached the outbox, by "
            "reason (outbox_unwritable, outbox_stalled, outbox_full); each is recorded",
            ["reason"], registry=r,
        )
        self.last_seen: dict[str, float] = {}
        self._published: dict[str, float] = {}  # when `last_event` was last set, per portal
        self._samplers: list[tuple[Gauge, Callable[[], float]]] = []
        self._texts: list[Callable[[], bytes]] = []
        if multiprocess_dir is None:
            r.register(_PortalSilence(lambda: self.last_seen))

    @property
    def multiprocess(self) -> bool:
        return self._dir is not None

    def seen(self, member_id: str) -> None:
        """A portal's event was stored now. The shared gauge is set at most once a second per
        portal (a labelled set is ~2 µs, per delivery otherwise)."""
        now = time.time()
        self.last_seen[member_id] = now
        if now - self._published.get(member_id, 0.0) >= SEEN_RESOLUTION_SECONDS:
            self._published[member_id] = now
            self.last_event.labels(member_id).set(now)

    def watch_lag(self, lag: Callable[[], int]) -> None:
        self._watch(self.projector_lag, lag)

    def watch_spool(self, depth: Callable[[], int], age: Callable[[], float]) -> None:
        self._watch(self.spool_depth, depth)
        self._watch(self.spool_age, age)

    def watch_absent_spools(self, size: Callable[[], int], age: Callable[[], float]) -> None:
        self._watch(self.spool_absent_bytes, size)
        self._watch(self.spool_absent_age, age)

    def _watch(self, gauge: Gauge, value: Callable[[], float]) -> None:
        if self._dir is None:
            gauge.set_function(value)
        else:  # other workers' functions cannot be called: sample into the shared files
            self._samplers.append((gauge, value))

    def sample(self) -> None:
        for gauge, value in self._samplers:
            gauge.set(value())

    @property
    def samples(self) -> bool:
        """Whether gauges must be sampled into the shared files (multiprocess mode)."""
        return self._dir is not None

    async def sample_forever(self) -> None:
        """Keep this worker's sampled gauges fresh while the service runs."""
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_SECONDS)

    def append_text(self, text: Callable[[], bytes]) -> None:
        """Another process's metrics, already in the text format (the forwarder's), appended
        to every scrape: its names are its own."""
        self._texts.append(text)

    def render(self) -> bytes:
        return self._render() + b"".join(text() for text in self._texts)

    def _render(self) -> bytes:
        if self._dir is None:
            return generate_latest(self.registry)
        self.sample()
        registry = CollectorRegistry()
        collector = _SharedFiles(registry, path=str(self._dir))  # type: ignore[no-untyped-call]
        registry.register(_PortalSilence(lambda: _last_seen_of(collector)))
        registry.register(_ProcessLocal(self.registry, collector))
        return generate_latest(registry)


class _SharedFiles(MultiProcessCollector):
    """prometheus_client's collector, minus files that are still empty: a process creating its
    file leaves it at 0 bytes for a moment (for good, if it is killed then), and reading one
    fails the whole scrape with a `struct.error` (prometheus/client_python#1199; seen here as
    a 500 from /metrics while `serve --workers 2` started its children)."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for file in Path(self._path).glob("*.db"):
            with contextlib.suppress(FileNotFoundError):  # a dead process's, just removed
                if file.stat().st_size > 0:
                    files.append(str(file))
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


class _ProcessLocal(Collector):
    """What only this process can compute (collectors registered on its registry, e.g. the
    gateway's backlog), without the metrics the shared files already hold."""

    def __init__(self, local: CollectorRegistry, shared: MultiProcessCollector) -> None:
        self._local, self._shared = local, shared

    def collect(self) -> list[Metric]:
        shared = {f.name for f in self._shared.collect()}  # type: ignore[no-untyped-call]
        return [f for f in self._local.collect() if f.name not in shared and f.samples]


def _last_seen_of(collector: MultiProcessCollector) -> dict[str, float]:
    seen: dict[str, float] = {}
    for family in collector.collect():  # type: ignore[no-untyped-call]
        if family.name == _LAST_EVENT:
            for sample in family.samples:
                member_id = sample.labels.get("member_id")
                if member_id:
                    seen[member_id] = max(seen.get(member_id, 0.0), sample.value)
    return seen


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
    """Gateway mode's metrics, in the forwarder process's registry (published to the intake
    with its status: `Metrics.append_text`)."""

    def __init__(
        self, r: CollectorRegistry, backlog: Callable[[], dict[str, tuple[int, float]]]
    ) -> None:
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
        self.outbox_unreadable = Gauge(
            "ledger_forward_outbox_unreadable",
            "Per outbox directory: segments set aside as sealed under a key this process does "
            "not hold (1 for a directory that cannot be read at all); the others go on",
            ["directory"], registry=r,
        )
        r.register(_RouteBacklog(backlog))
