"""PostgreSQL's CPU by what each process did: which statement a backend ran, or which auxiliary
process it is (bench.latency --backends).

Every `interval` seconds one thread reads, on one extra connection, every backend's last or
current statement from pg_stat_activity and, from /proc, the CPU of every process of the
cluster; a process's CPU since the last sample is booked to what it was seen doing at this
sample (its current statement, or while idle the one it ran last). A backend that serves
several kinds of statement (a pooled connection) is booked kind by kind, approximately; the
kept append connection and the projector's and tree follower's connections each run one kind.
The sampler's own backend is left out. Kinds are named by `_kind` from the statement's text.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import asyncpg

from bench.proc import _all, _tree

# (substring of the statement, kind), first match wins
_KINDS = (
    ("ledger.append_events", "append (one statement)"),
    ("stream_heads WHERE stream = 'events' FOR UPDATE", "append (long way)"),
    ("INSERT INTO ledger.events", "append (long way)"),
    ("pg_xact_status", "settle doubts"),
    ("tree_", "tree follower"),
    ("projections.", "projector"),
    ("portal_trust", "trust refresh"),
    ("TRUST_CHANGED", "trust refresh"),
    ("LISTEN", "listen"),
    ("COMMIT", "commit"),
)


def _kind(backend_type: str, query: str) -> str:
    if backend_type != "client backend":
        return backend_type
    for needle, kind in _KINDS:
        if needle in query:
            return kind
    return "other: " + " ".join(query.split())[:50]


@dataclass
class Booked:
    seconds: dict[str, float] = field(default_factory=dict)


class BackendSampler:
    """Start before the interval, `stop()` after it; see the module."""

    def __init__(self, postmaster: int, dsn: str, interval: float = 0.05) -> None:
        self.postmaster, self.dsn, self.interval = postmaster, dsn, interval
        self.result = Booked()
        self._done = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)

    def start(self) -> BackendSampler:
        self._thread.start()
        return self

    def stop(self) -> Booked:
        self._done.set()
        self._thread.join(timeout=30)
        return self.result

    async def _loop(self) -> None:
        connection = await asyncpg.connect(self.dsn)
        own = connection.get_server_pid()
        last: dict[int, float] = {}
        try:
            while True:
                rows = await connection.fetch(
                    "SELECT pid, coalesce(backend_type, '') AS t, coalesce(query, '') AS q "
                    "FROM pg_stat_activity")
                table = _all()
                cluster = set(_tree(self.postmaster, table)) if self.postmaster in table else set()
                seen = {r["pid"]: _kind(r["t"], r["q"]) for r in rows}
                current: dict[int, float] = {}
                for pid in cluster:
                    if pid == own:
                        continue
                    current[pid] = table[pid][1]
                    if pid in last:
                        kind = seen.get(pid, "postmaster" if pid == self.postmaster
                                        else "other process")
                        spent = max(0.0, current[pid] - last[pid])
                        self.result.seconds[kind] = self.result.seconds.get(kind, 0.0) + spent
                last = current
                if self._done.wait(self.interval):
                    break
        finally:
            await connection.close()
