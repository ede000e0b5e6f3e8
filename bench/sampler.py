"""What ran on the machine while a fixed rate was measured: CPU by process kind, PostgreSQL's
maintenance, sampled — to attribute a tail that comes and goes (bench.latency --sample).

Every `interval` seconds, one thread reads /proc for every process of the server's tree and of
the PostgreSQL cluster and books each process's CPU since the last sample to its kind: the
intake, the projector (its process tree), the forwarder, PostgreSQL's backends by role
(`postgres: ROLE DATABASE …` in the process title), and its auxiliaries (autovacuum worker,
checkpointer, WAL writer, background writer, …). A process that appears and exits between two
samples (a short autovacuum) is seen only through its parent's reaped time, booked to
`postmaster (reaped)`. Another thread asks PostgreSQL, at the same pace, which autovacuum and
analyze are in progress (pg_stat_progress_vacuum / _analyze, pg_stat_activity) on one extra
connection — a wake-up of a backend per sample, the same for every variant.

The result: CPU seconds by kind over the interval; per 100 ms bucket the kinds that used more
than a fifth of a core, so that the slow requests can be laid against them (a cause is a kind
whose busy buckets hold a larger share of the slow requests than of all the requests); and the
maintenance PostgreSQL reported (relation, phase, when).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.proc import _all, _tree


def _kind(pid: int, server_tree: set[int], projector_tree: set[int]) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if pid in projector_tree:
        return "projector"
    if pid in server_tree:
        return "forwarder" if b"forward" in argv else "intake"
    title = argv[0].decode(errors="replace")
    if not title.startswith("postgres:"):
        return "postmaster"
    words = title.removeprefix("postgres:").split()
    aux = " ".join(words[:2])
    for name in ("autovacuum worker", "autovacuum launcher", "background writer",
                 "checkpointer", "walwriter", "logical replication"):
        if aux.startswith(name.split()[0]) and name.split()[-1] in aux:
            return name
    return f"backend {words[0]}" if words else "postgres other"


@dataclass
class Sampled:
    """CPU seconds by kind; per bucket, the kinds over `busy_share` of a core; maintenance."""

    seconds: dict[str, float] = field(default_factory=dict)
    busy: list[tuple[float, float, frozenset[str]]] = field(default_factory=list)
    maintenance: list[tuple[float, str]] = field(default_factory=list)  # (t, what)
    stats_before: dict[str, object] = field(default_factory=dict)
    stats_after: dict[str, object] = field(default_factory=dict)


class Sampler:
    """Start before the interval, `stop()` after it; see the module."""

    def __init__(self, server_pid: int, postmaster: int | None, dsn: str,
                 interval: float = 0.1, busy_share: float = 0.2) -> None:
        self.server_pid, self.postmaster, self.dsn = server_pid, postmaster, dsn
        self.interval, self.busy_share = interval, busy_share
        self.result = Sampled()
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._proc, daemon=True),
                         threading.Thread(target=self._pg, daemon=True)]

    def start(self) -> Sampler:
        self.result.stats_before = asyncio.run(_stats(self.dsn))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Sampled:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.result.stats_after = asyncio.run(_stats(self.dsn))
        return self.result

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        table = _all()
        server = set(_tree(self.server_pid, table)) if self.server_pid in table else set()
        projector: set[int] = set()
        for pid in server:
            try:
                if b"project" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    projector |= set(_tree(pid, table))
            except OSError:
                continue
        cluster = (set(_tree(self.postmaster, table))
                   if self.postmaster is not None and self.postmaster in table else set())
        found: dict[int, tuple[str, float]] = {}
        for pid in server | cluster:
            kind = _kind(pid, server, projector)
            if kind == "postmaster":  # its own time and what it reaped of exited children
                kind = "postmaster (reaped)"
            found[pid] = (kind, table[pid][1])
        return found

    def _proc(self) -> None:
        last = self._snapshot()
        while not self._done.wait(self.interval):
            now = time.perf_counter()
            current = self._snapshot()
            spent: dict[str, float] = {}
            for pid, (kind, cpu) in current.items():
                before = last.get(pid)
                delta = cpu - (before[1] if before is not None else 0.0)
                if before is None and kind != "autovacuum worker":
                    delta = 0.0  # a new connection's start-up: not booked to the interval
                spent[kind] = spent.get(kind, 0.0) + max(0.0, delta)
            for kind, seconds in spent.items():
                self.result.seconds[kind] = self.result.seconds.get(kind, 0.0) + seconds
            busy = frozenset(k for k, s in spent.items() if s > self.busy_share * self.interval)
            self.result.busy.append((now - self.interval, now, busy))
            last = current

    def _pg(self) -> None:
        asyncio.run(self._pg_loop())

    async def _pg_loop(self) -> None:
        connection = await asyncpg.connect(self.dsn)
        try:
            while not self._done.is_set():
                rows = await connection.fetch(
                    "SELECT a.backend_type, coalesce(v.relid::regclass::text, "
                    "n.relid::regclass::text, '') AS rel, coalesce(v.phase, n.phase, '') "
                    "AS phase, left(a.query, 60) AS query FROM pg_stat_activity a "
                    "LEFT JOIN pg_stat_progress_vacuum v ON v.pid = a.pid "
                    "LEFT JOIN pg_stat_progress_analyze n ON n.pid = a.pid "
                    "WHERE a.backend_type IN ('autovacuum worker', 'checkpointer') "
                    "AND a.state IS DISTINCT FROM 'idle' AND a.pid <> pg_backend_pid()")
                now = time.perf_counter()
                for row in rows:
                    if row["backend_type"] == "checkpointer" and row["query"] == "":
                        continue
                    self.result.maintenance.append(
                        (now, f"{row['backend_type']}: {row['rel'] or row['query']} "
                              f"{row['phase']}".strip()))
                await asyncio.sleep(self.interval)
        finally:
            await connection.close()


async def _stats(dsn: str) -> dict[str, object]:
    """Counters that say what maintenance ran: ledger.events' vacuums and analyzes, the
    checkpoints, the WAL written."""
    connection = await asyncpg.connect(dsn)
    try:
        table = await connection.fetchrow(
            "SELECT n_live_tup, n_dead_tup, n_ins_since_vacuum, n_mod_since_analyze, "
            "autovacuum_count, autoanalyze_count, vacuum_count, analyze_count "
            "FROM pg_stat_all_tables WHERE schemaname = 'ledger' AND relname = 'events'")
        checkpoints = await connection.fetchrow(
            "SELECT checkpoints_timed, checkpoints_req, buffers_checkpoint "
            "FROM pg_stat_bgwriter") if await connection.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pg_stat_bgwriter'::regclass "
            "AND attname = 'checkpoints_timed'") else await connection.fetchrow(
            "SELECT num_timed AS checkpoints_timed, num_requested AS checkpoints_req, "
            "buffers_written AS buffers_checkpoint FROM pg_stat_checkpointer")
        wal = await connection.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        return {**(dict(table) if table else {}), **(dict(checkpoints) if checkpoints else {}),
                "wal_bytes": int(wal)}
    finally:
        await connection.close()


def lay_against(sampled: Sampled, started: float, dues: list[float],
                latencies: list[float], slow_ms: float) -> list[str]:
    """For each kind: the share of all requests and of slow ones due in buckets where it was
    busy; a cause has lift (slow share / all share) well above 1."""
    buckets = sorted(sampled.busy)
    import bisect
    begins = [b[0] for b in buckets]
    total: dict[str, int] = {}
    slow: dict[str, int] = {}
    n_slow = 0
    for due, latency in zip(dues, latencies, strict=True):
        at = started + due
        index = bisect.bisect_right(begins, at) - 1
        kinds = buckets[index][2] if 0 <= index < len(buckets) and at < buckets[index][1] \
            else frozenset()
        is_slow = latency * 1000 > slow_ms
        n_slow += is_slow
        for kind in kinds:
            total[kind] = total.get(kind, 0) + 1
            if is_slow:
                slow[kind] = slow.get(kind, 0) + 1
    n = max(1, len(dues))
    lines = [f"{n_slow} requests over {slow_ms:g} ms of {len(dues)}.", "",
             "| kind busy (> 0.2 core in a 100 ms bucket) | CPU s in interval | requests due "
             "then | slow requests due then | lift |", "|---|---:|---:|---:|---:|"]
    for kind in sorted(sampled.seconds, key=lambda k: -sampled.seconds[k]):
        share, slow_share = total.get(kind, 0) / n, slow.get(kind, 0) / max(1, n_slow)
        lift = slow_share / share if share else float("nan")
        lines.append(f"| {kind} | {sampled.seconds[kind]:.2f} | {share:.0%} | "
                     f"{slow_share:.0%} | {lift:.1f} |")
    if sampled.maintenance:
        first: dict[str, tuple[float, float]] = {}
        for at, what in sampled.maintenance:
            lo, hi = first.get(what, (at, at))
            first[what] = (min(lo, at), max(hi, at))
        lines += ["", "PostgreSQL maintenance seen (s from the interval's start):"]
        lines += [f"- {what}: {lo - started:.1f} to {hi - started:.1f}"
                  for what, (lo, hi) in sorted(first.items(), key=lambda kv: kv[1])]
    before, after = sampled.stats_before, sampled.stats_after
    lines += ["", "ledger.events and checkpoints, before → after: " + ", ".join(
        f"{k} {before.get(k)} → {after.get(k)}" for k in after)]
    return lines
