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
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.proc import _all, _tree


def _trees(table: dict[int, tuple[int, float]], server_pid: int,
           postmaster: int | None) -> tuple[set[int], set[int], set[int]]:
    """The server's processes, the projector's among them, and the cluster's."""
    server = set(_tree(server_pid, table)) if server_pid in table else set()
    projector: set[int] = set()
    for pid in server:
        try:
            if b"project" in Path(f"/proc/{pid}/cmdline").read_bytes():
                projector |= set(_tree(pid, table))
        except OSError:
            continue
    cluster = (set(_tree(postmaster, table))
               if postmaster is not None and postmaster in table else set())
    return server, projector, cluster


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
        server, projector, cluster = _trees(table, self.server_pid, self.postmaster)
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


# --- who dirties the page cache, and when it is written back (bench.latency --io) ---------

_WRITE_KINDS_PG = ("backend", "autovacuum worker", "background writer", "checkpointer",
                   "walwriter")


def _meminfo() -> tuple[int, int]:
    """(Dirty, Writeback) of the page cache, bytes."""
    found: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Dirty", "Writeback"):
            found[name] = int(rest.split()[0]) * 1024
    return found.get("Dirty", 0), found.get("Writeback", 0)


def _disk_written() -> int:
    """Bytes written to the machine's whole disks so far (/proc/diskstats, 512-byte sectors;
    partitions and virtual devices left out so nothing counts twice)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        name = fields[2]
        if name.startswith(("loop", "ram", "dm-", "md", "zram")) or not Path(
                f"/sys/block/{name}").exists():
            continue
        total += int(fields[9]) * 512
    return total


def _io_kind(pid: int, server: set[int], projector: set[int]) -> str:
    kind = _kind(pid, server, projector)
    if kind.startswith("backend "):  # the role: ledger_app (intake, projector), postgres (us)
        return kind
    return kind if kind in _WRITE_KINDS_PG or kind in ("intake", "projector", "forwarder",
                                                       "postmaster") else "gone"


@dataclass
class IoSample:
    at: float  # perf_counter
    dirty: int
    writeback: int
    disk: int
    written: dict[str, int]  # kind -> write_bytes - cancelled_write_bytes so far (live procs)
    cancelled: dict[str, int]
    pg_io: dict[str, tuple[int, int, int, int, float]] = field(default_factory=dict)
    wal: tuple[int, int, float, float] = (0, 0, 0.0, 0.0)  # writes, syncs, write ms, sync ms


class IoSampler:
    """Every `interval` s: the page cache's Dirty and Writeback, the bytes written to disk,
    and every process's /proc/PID/io write_bytes and cancelled_write_bytes booked to its kind
    (the server's intake, projector, forwarder; PostgreSQL's backends by role, autovacuum,
    bgwriter, checkpointer, walwriter; `other` — every other process on the machine). write_bytes
    is charged to the process that dirties a page, when it dirties it: who fills the pool the
    kernel later writes back. On the same pace, PostgreSQL's pg_stat_io (writes, extends,
    writebacks, fsyncs by backend type) and pg_stat_wal (writes, syncs and their times: the
    sampler turns track_io_timing and track_wal_io_timing on for the run and back after).
    A process that exits between two samples takes its bytes with it (not booked)."""

    def __init__(self, server_pid: int, postmaster: int | None, dsn: str,
                 interval: float = 0.1) -> None:
        self.server_pid, self.postmaster, self.dsn, self.interval = (server_pid, postmaster,
                                                                     dsn, interval)
        self.samples: list[IoSample] = []
        self._pg: dict[str, tuple[int, int, int, int, float]] = {}
        self._wal: tuple[int, int, float, float] = (0, 0, 0.0, 0.0)
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._proc, daemon=True),
                         threading.Thread(target=self._pg_thread, daemon=True)]
        self._last: dict[int, tuple[str, int, int]] = {}
        self._gone: dict[str, list[int]] = {}

    def start(self) -> IoSampler:
        asyncio.run(_timing(self.dsn, on=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[IoSample]:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=30)
        asyncio.run(_timing(self.dsn, on=False))
        return self.samples

    def _sample(self) -> IoSample:
        table = _all()
        server, projector, cluster = _trees(table, self.server_pid, self.postmaster)
        written: dict[str, int] = {}
        cancelled: dict[str, int] = {}
        now: dict[int, tuple[str, int, int]] = {}
        for pid in table:
            try:
                io = Path(f"/proc/{pid}/io").read_text().split("\n")
            except OSError:
                continue
            values = dict(line.split(": ") for line in io if line)
            kind = (_io_kind(pid, server, projector) if pid in server or pid in cluster
                    else "other")
            now[pid] = (kind, int(values["write_bytes"]), int(values["cancelled_write_bytes"]))
        # a process that exited keeps what it wrote in the totals (its last reading)
        for pid, (kind, wb, cw) in self._last.items():
            if pid not in now:
                gone = self._gone.setdefault(kind, [0, 0])
                gone[0] += wb
                gone[1] += cw
        self._last = now
        for kind, (wb, cw) in self._gone.items():
            written[kind] = written.get(kind, 0) + wb
            cancelled[kind] = cancelled.get(kind, 0) + cw
        for kind, wb, cw in now.values():
            written[kind] = written.get(kind, 0) + wb
            cancelled[kind] = cancelled.get(kind, 0) + cw
        dirty, writeback = _meminfo()
        return IoSample(time.perf_counter(), dirty, writeback, _disk_written(), written,
                        cancelled, dict(self._pg), self._wal)

    def _proc(self) -> None:
        self.samples.append(self._sample())
        while not self._done.wait(self.interval):
            self.samples.append(self._sample())

    def _pg_thread(self) -> None:
        asyncio.run(self._pg_loop())

    async def _pg_loop(self) -> None:
        connection = await asyncpg.connect(self.dsn)
        try:
            while not self._done.is_set():
                rows = await connection.fetch(
                    "SELECT backend_type, sum(coalesce(writes, 0))::bigint AS writes, "
                    "sum(coalesce(extends, 0))::bigint AS extends, "
                    "sum(coalesce(writebacks, 0))::bigint AS writebacks, "
                    "sum(coalesce(fsyncs, 0))::bigint AS fsyncs, "
                    "sum(coalesce(write_time, 0))::float8 AS write_time FROM pg_stat_io "
                    "WHERE object = 'relation' GROUP BY backend_type")
                self._pg = {r["backend_type"]: (r["writes"], r["extends"], r["writebacks"],
                                                r["fsyncs"], r["write_time"]) for r in rows}
                wal = await connection.fetchrow(
                    "SELECT wal_write, wal_sync, wal_write_time, wal_sync_time FROM pg_stat_wal")
                if wal is not None:
                    self._wal = (int(wal[0]), int(wal[1]), float(wal[2]), float(wal[3]))
                await connection.execute("SELECT pg_stat_clear_snapshot()")
                await asyncio.sleep(self.interval)
        finally:
            await connection.close()


async def _timing(dsn: str, *, on: bool) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for name in ("track_io_timing", "track_wal_io_timing"):
            await connection.execute(f"ALTER SYSTEM {'SET' if on else 'RESET'} {name}"
                                     + (" = on" if on else ""))
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()


def io_timeline(samples: list[IoSample], started: float, dues: list[float],
                latencies: list[float], step: float = 1.0, top: int = 6) -> list[str]:
    """Per `step` s (t from the first sample; the window's requests by due time): the page
    cache's dirty pool and writeback at the step's end, MB written to disk in it, MB dirtied by
    each kind (the `top` kinds over the run), PostgreSQL's relation writes/extends (8 kB pages,
    all backend types) and its WAL fsyncs (count, mean ms), and the requests due then (count,
    p99 ms, over 5 ms)."""
    if len(samples) < 2:
        return ["(no io samples)"]
    t0 = samples[0].at
    first, last = samples[0], samples[-1]
    totals = {k: last.written.get(k, 0) - first.written.get(k, 0) for k in last.written}
    kinds = [k for k in sorted(totals, key=lambda k: -totals[k]) if totals[k] > 0][:top]
    mb = 1024 * 1024
    cancelled = {k: last.cancelled.get(k, 0) - first.cancelled.get(k, 0) for k in totals}
    lines = ["Dirtied over the run (write_bytes, of it cancelled: truncated or deleted before "
             "written back; MB): " + ", ".join(
                 f"{k} {totals[k] / mb:.1f} ({cancelled[k] / mb:.1f})"
                 for k in sorted(totals, key=lambda k: -totals[k]) if totals[k] > 0)]
    pg_types = sorted(set(last.pg_io) | set(first.pg_io))
    pg_total = {t: tuple(b - a for a, b in zip(first.pg_io.get(t, (0, 0, 0, 0, 0.0)),
                                               last.pg_io.get(t, (0, 0, 0, 0, 0.0)),
                                               strict=True)) for t in pg_types}
    lines.append("pg_stat_io over the run (relation pages of 8 kB: writes / extends / "
                 "writebacks / fsyncs, write ms): " + ", ".join(
                     f"{t} {v[0]}/{v[1]}/{v[2]}/{v[3]} {v[4]:.0f}"
                     for t, v in pg_total.items() if any(v[:4])))
    peak = max(samples, key=lambda x: x.dirty)
    lump, lump_at = 0, 0.0  # the largest fall of the dirty pool within 1 s: a write-back lump
    k = 0
    for n, x in enumerate(samples):
        while samples[k].at < x.at - 1.0:
            k += 1
        fall = max(y.dirty for y in samples[k:n + 1]) - x.dirty
        if fall > lump:
            lump, lump_at = fall, x.at
    worst_sync = max(((y.wal[3] - x.wal[3]) / (y.wal[1] - x.wal[1])
                      for x, y in itertools.pairwise(samples)
                      if y.wal[1] > x.wal[1]), default=0.0)
    lines.append(f"Dirty peak {peak.dirty / mb:.0f} MB at t={peak.at - t0:.1f} s; largest "
                 f"write-back lump (fall of Dirty within 1 s) {lump / mb:.0f} MB at "
                 f"t={lump_at - t0:.1f} s; WAL fsync, worst 0.1-s mean {worst_sync:.1f} ms")
    lines += ["", "| t s | Dirty MB | Writeback MB | disk MB | " + " | ".join(
        f"{k} MB" for k in kinds) + " | PG writes/extends | WAL fsyncs (mean ms; worst "
        "0.1-s mean) | requests (p99 ms, > 5 ms) |", "|" + "---:|" * (7 + len(kinds))]
    steps = int((last.at - t0) / step) + 1
    by_step: dict[int, list[float]] = {}
    for due, latency in zip(dues, latencies, strict=True):
        index = int((started + due - t0) / step)
        by_step.setdefault(index, []).append(latency * 1000)
    j = 0
    for index in range(steps):
        lo_t, hi_t = t0 + index * step, t0 + (index + 1) * step
        i = j
        a = samples[i]
        while j + 1 < len(samples) and samples[j + 1].at <= hi_t:
            j += 1
        b = samples[j]
        if b.at < lo_t:
            continue
        dirtied = [(b.written.get(k, 0) - a.written.get(k, 0)) / mb for k in kinds]
        pages = [sum(v[i] for v in b.pg_io.values()) - sum(v[i] for v in a.pg_io.values())
                 for i in (0, 1)]
        syncs = b.wal[1] - a.wal[1]
        sync_ms = (b.wal[3] - a.wal[3]) / syncs if syncs else 0.0
        worst = max(((y.wal[3] - x.wal[3]) / (y.wal[1] - x.wal[1])
                     for x, y in zip(samples[i:j], samples[i + 1:j + 1], strict=True)
                     if y.wal[1] > x.wal[1]), default=0.0)
        reqs = sorted(by_step.get(index, []))
        req = (f"{len(reqs)} ({reqs[min(len(reqs) - 1, int(len(reqs) * 0.99))]:.1f}, "
               f"{sum(r > 5 for r in reqs)})" if reqs else "")
        lines.append(f"| {index * step:.0f} | {b.dirty / mb:.0f} | {b.writeback / mb:.0f} | "
                     f"{(b.disk - a.disk) / mb:.0f} | "
                     + " | ".join(f"{d:.1f}" for d in dirtied)
                     + f" | {pages[0]}/{pages[1]} | {syncs} ({sync_ms:.2f}; {worst:.1f}) | {req} |")
    return lines
