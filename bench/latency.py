"""Where the latency at a fixed rate goes: `ledger serve` variants side by side, one run.

    python -m bench.latency [--rate 1000] [--seconds 20] [--rounds 2] [--closed 5]
                            [--burst 12 [--sample] [--io]]
                            [--variants default,delay0,no-projector,...]
                            [--baseline DIR --variants base:default,default]

Each variant is `ledger serve` (1 worker) with a few settings changed (VARIANTS), on a fresh
database of one PostgreSQL, fed by the open-loop generator (bench/openloop.py) at a fixed rate.
Variants are interleaved over rounds (the order reversed every other round) so that a machine
shared with other work drifts against all of them alike. For each it reports:
- p50/p99/p99.9 from each request's due time;
- CPU µs per delivery from /proc, split by process: the intake, the projector and forwarder
  sidecars, and the whole PostgreSQL cluster;
- commits per second and drafts per commit (the service's own /metrics);
- stalls: requests slower than `--slow-ms`, grouped into episodes by due time (a gap of more
  than 5 ms ends one), how many episodes per second and how many requests each held — a
  periodic cause shows as episodes about one period apart.
With `--closed S`, each server also takes S seconds of wrk -c64 (closed loop, as bench.intake):
deliveries/s and CPU µs per delivery at saturation. A variant written `base:NAME` runs the code
in `--baseline DIR` (e.g. `git archive main | tar -x -C DIR`) with NAME's settings: before and
after in one run.
With `--burst S`, each server first takes S seconds of wrk -c64 (tens of thousands of events at
saturation, as bench.intake's closed loop before its open-loop phase), then is measured at the
fixed rate: the after-burst condition. The fixed-rate window is `bench.openloop.fixed_rate`,
bench.intake's own (settled until the server and the cluster are idle, at most 15 s; 20 s by
default, as there — it was 8 s here, which bench/RESULTS.md's seventh session shows measured
another thing); its p99 by 5-s slice is printed below the table. `--sample` books the CPU of
every process of the server and of the cluster to its kind while measured, and lays the slow
requests against the kinds that were busy (bench/sampler.py). `--io` follows the page cache from
the burst's start to the window's end: the dirty pool, who dirtied it, PostgreSQL's relation
writes and extends, the WAL's fsyncs, per second beside the window's requests. The bench's
embedded cluster runs with each variant's code's `ledger.embedded.SETTINGS` (a `base:` variant
with its tree's), and a variant's `pg.NAME` keys on top.
Read ratios between variants of the same run, never absolute numbers, on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import openloop
from bench.common import OUT, Cluster
from bench.intake import corpus, free_port, provision, run_wrk, serve, stop
from bench.pgbackends import BackendSampler, Booked
from bench.proc import CpuMeter, _all, _tree, postmaster_pid, tree_cpu_seconds
from bench.sampler import IoSample, IoSampler, Sampled, Sampler, io_timeline, lay_against
from ledger import embedded
from ledger.simulation import Traffic

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "delay0": {"LEDGER_BATCH_MAX_DELAY_MS": "0"},
    "long": {"LEDGER_APPEND_ONE_ROUND_TRIP": "false"},
    "delay2": {"LEDGER_BATCH_MAX_DELAY_MS": "2"},
    "no-projector": {"LEDGER_RUN_PROJECTOR": "false"},
    "no-tree": {"LEDGER_RUN_TREE_FOLLOWER": "false"},
    "projector-nice0": {"LEDGER_PROJECTOR_NICE": "0"},
    "no-listeners": {"LEDGER_RUN_PROJECTOR": "false", "LEDGER_RUN_TREE_FOLLOWER": "false"},
    "quiet": {"LEDGER_RUN_PROJECTOR": "false", "LEDGER_RUN_TREE_FOLLOWER": "false",
              "LEDGER_BATCH_MAX_DELAY_MS": "0"},
    # the after-burst condition (as --burst 12) for this variant only: against `default`
    "after-burst": {"BENCH_BURST": "12"},
    # the write-back section's tries: cluster settings (`pg.NAME`) over the code's own
    "pg-bgwriter-only": {"BENCH_BURST": "12", "pg.backend_flush_after": "0"},
    "pg-flush-only": {"BENCH_BURST": "12", "pg.bgwriter_delay": "200ms",
                      "pg.bgwriter_lru_maxpages": "100"},
    # with --trace, asyncio's loop is used (only it can time each callback); this keeps uvloop
    "uvloop": {"BENCH_TRACE_LOOP": "uvloop"},
    # `serve --workers 2`: the commit/batch columns then read one worker's /metrics only
    "workers2": {"BENCH_WORKERS": "2"},
}


@dataclass
class Run:
    variant: str
    result: openloop.OpenLoopResult
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    commits: float = 0.0
    drafts: float = 0.0
    append_seconds: float = 0.0
    closed_rate: float = 0.0  # deliveries/s 2xx at 64 connections (--closed)
    closed_us: float = 0.0  # server tree + PostgreSQL CPU µs per delivery there
    syscalls: dict[str, int] = field(default_factory=dict)  # intake / postgres, while measured
    switches: dict[str, int] = field(default_factory=dict)
    preempted: int = 0  # involuntary context switches of the intake (serve's own process)
    trace: list[list[Any]] = field(default_factory=list)  # bench/trace.py's events (--trace)
    burst: int = 0  # deliveries stored at saturation before the fixed rate (--burst)
    settled: bool = True  # the server and cluster went idle after the burst
    sampled: Sampled | None = None  # --sample
    backends: Booked | None = None  # --backends
    io: list[IoSample] = field(default_factory=list)  # --io: from before the burst on


def _roles(root: int) -> dict[str, float]:
    """CPU seconds so far of `root`'s tree, by role (intake, projector, forwarder)."""
    table = _all()
    roles: dict[str, float] = {}
    for pid in _tree(root, table):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        role = ("projector" if b"project" in argv else "forwarder" if b"forward" in argv
                else "intake")
        roles[role] = roles.get(role, 0.0) + table[pid][1]
    return roles


def _counts(root: int) -> tuple[int, int, int]:
    """(read+write syscalls of the process tree `root`, voluntary context switches of its main
    threads, involuntary ones of `root` itself) so far: what a round trip or a wake-up costs,
    and how often the intake was preempted, counted — robust where CPU time on a busy machine
    is not."""
    table = _all()
    syscalls = switches = preempted = 0
    for pid in _tree(root, table) if root in table else []:
        try:
            io = dict(line.split(": ") for line in
                      Path(f"/proc/{pid}/io").read_text().splitlines())
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        syscalls += int(io["syscr"]) + int(io["syscw"])
        switches += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status,
                                  re.MULTILINE).group(1))  # type: ignore[union-attr]
        if pid == root:
            preempted += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status,
                                       re.MULTILINE).group(1))  # type: ignore[union-attr]
    return syscalls, switches, preempted


def _scrape(port: int) -> tuple[float, float, float]:
    """(commits, drafts committed, seconds spent appending) so far, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return (value("ledger_append_batch_size_count"), value("ledger_append_batch_size_sum"),
            value("ledger_append_seconds_sum"))


def measure(variant: str, args: argparse.Namespace, cluster: Cluster, lines: list[bytes],
            bodies: Path, tokens: dict[str, str], postmaster: int | None, tag: str) -> Run:
    code, _, settings = variant.rpartition(":")
    # the cluster's write-back settings are the code's too (ledger/embedded.py SETTINGS), with
    # the variant's own `pg.NAME` over them
    over = {k[3:]: v for k, v in VARIANTS[settings].items() if k.startswith("pg.")}
    own = _tree_settings(args.baseline) if code else None
    asyncio.run(cluster.server_settings(
        {**(own if own is not None else embedded.SETTINGS), **over} if over or code else None))
    # the other tree's code runs on its own schema (a service refuses a schema it does not know)
    database = asyncio.run(cluster.fresh_database("bench_latency", migrate=not code))
    if code:
        subprocess.run(
            [sys.executable, "-P", "-c", "import sys; from ledger import migrations; "
             "migrations.upgrade(sys.argv[1])", cluster.dsn(database)],
            env={**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve())}, check=True)
    service = cluster.dsn(database, user="ledger_app")
    asyncio.run(provision(service, tokens))
    port = free_port()
    data_dir = OUT / f"latency-data-{port}"
    shutil.rmtree(data_dir, ignore_errors=True)
    env = {"LEDGER_DATABASE_URL": service, "LEDGER_DATA_DIR": str(data_dir),
           **{k: v for k, v in VARIANTS[settings].items() if not k.startswith("pg.")}}
    burst_seconds = int(env.pop("BENCH_BURST", args.burst))
    if code:
        env["PYTHONPATH"] = str(Path(args.baseline).resolve())
    argv = [sys.executable, "-P", "-m", "ledger", "serve", "--port", str(port)]
    if workers := env.pop("BENCH_WORKERS", ""):
        argv += ["--workers", workers]
    trace_file = OUT / f"trace-{variant.replace(':', '-')}-{tag}.jsonl"
    if args.trace:
        trace_file.unlink(missing_ok=True)
        argv[2:4] = [str(Path(__file__).with_name("trace.py")), str(trace_file)]
    process = serve(argv, env, port, cwd=OUT, log_name=f"latency-{variant.replace(':', '-')}")
    url = f"http://127.0.0.1:{port}/bitrix24/events"
    try:
        openloop.run_sync(url, lines, rate=args.rate, seconds=1.0, tag=f"{tag}w")
        io_sampler = (IoSampler(process.pid, postmaster, cluster.dsn(database)).start()
                      if args.io else None)
        burst = 0
        if burst_seconds:  # the after-burst condition: as bench.intake's open loop meets it
            burst = int(run_wrk(url, bodies, burst_seconds, 64, tag=f"{tag}b")["ok"])
        before: dict[str, Any] = {}
        profilers: list[subprocess.Popen[bytes]] = []
        sampler = (Sampler(process.pid, postmaster, cluster.dsn(database))
                   if args.sample else None)
        by_backend = (BackendSampler(postmaster, cluster.dsn(database))
                      if args.backends and postmaster is not None else None)

        def counters() -> None:  # after the settle, right before the window
            before.update(cpu=_roles(process.pid), pg=_pg(postmaster), metrics=_scrape(port),
                          counts={"intake": _counts(process.pid),
                                  "postgres": _counts(postmaster or 0)})
            if args.profile:  # py-spy, collapsed stacks of the intake process (idle included)
                profilers.append(subprocess.Popen(
                    ["py-spy", "record", "--pid", str(process.pid), "--duration",
                     str(int(args.seconds)), "--rate", "500", "--format", "raw", "--idle",
                     "--output", str(OUT / f"profile-{variant}-{tag}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if sampler is not None:
                sampler.start()
            if by_backend is not None:
                by_backend.start()

        # the same measurement as bench.intake's fixed-rate column (one settle rule, window)
        window = openloop.fixed_rate(url, lines, CpuMeter(process.pid, postmaster),
                                     rate=args.rate, seconds=args.seconds, tag=f"{tag}m",
                                     before=counters)
        result, settled = window.result, window.settled
        cpu0, pg0, m0, n0 = before["cpu"], before["pg"], before["metrics"], before["counts"]
        sampled = sampler.stop() if sampler is not None else None
        backends = by_backend.stop() if by_backend is not None else None
        io = io_sampler.stop() if io_sampler is not None else []
        for profiler in profilers:
            profiler.wait(timeout=60)
        closed: dict[str, float] = {}
        spent = 0.0
        # the fixed rate's counters end here: the closed loop below must not count in them
        cpu1, pg1, m1 = _roles(process.pid), _pg(postmaster), _scrape(port)
        n1 = {"intake": _counts(process.pid), "postgres": _counts(postmaster or 0)}
        if args.closed:
            run_wrk(url, bodies, 1, 64, tag=f"{tag}cw")
            closed_from = tree_cpu_seconds(process.pid) + (_pg(postmaster) or 0.0)
            closed = run_wrk(url, bodies, int(args.closed), 64, tag=f"{tag}c")
            spent = tree_cpu_seconds(process.pid) + (_pg(postmaster) or 0.0) - closed_from
    finally:
        stop(process)
        shutil.rmtree(data_dir, ignore_errors=True)
    run = Run(variant, result, burst=burst, settled=settled, sampled=sampled, backends=backends,
              io=io)
    if args.trace:
        run.trace = [json.loads(line) for line in trace_file.read_text().splitlines()]
    run.syscalls = {k: n1[k][0] - n0[k][0] for k in n0}
    run.switches = {k: n1[k][1] - n0[k][1] for k in n0}
    run.preempted = n1["intake"][2] - n0["intake"][2]
    run.cpu = {role: cpu1.get(role, 0.0) - cpu0.get(role, 0.0) for role in cpu1}
    if pg0 is not None and pg1 is not None:
        run.cpu["postgres"] = pg1 - pg0
    run.commits, run.drafts, run.append_seconds = (b - a for a, b in zip(m0, m1, strict=True))
    if closed:
        run.closed_rate = closed["rate"]
        run.closed_us = spent * 1e6 / max(1.0, closed["ok"])
    return run


def _tree_settings(tree: str) -> dict[str, str]:
    """The embedded PostgreSQL settings of the code in `tree` (none before they existed)."""
    out = subprocess.run(
        [sys.executable, "-P", "-c", "import json; from ledger import embedded; "
         "print(json.dumps(getattr(embedded, 'SETTINGS', {})))"],
        env={**os.environ, "PYTHONPATH": str(Path(tree).resolve())}, check=True,
        capture_output=True, text=True).stdout
    return dict(json.loads(out))


def _pg(postmaster: int | None) -> float | None:
    return None if postmaster is None else tree_cpu_seconds(postmaster)


def stalls(result: openloop.OpenLoopResult, slow_ms: float) -> tuple[int, float, list[float]]:
    """(episodes, mean requests per episode, episode start times) of requests slower than
    `slow_ms`, grouped by due time."""
    slow = sorted(d for d, lat in zip(result.dues, result.latencies, strict=True)
                  if lat * 1000 > slow_ms)
    episodes: list[list[float]] = []
    for due in slow:
        if episodes and due - episodes[-1][-1] <= 0.005:
            episodes[-1].append(due)
        else:
            episodes.append([due])
    sizes = [len(e) for e in episodes]
    return len(episodes), (statistics.mean(sizes) if sizes else 0.0), [e[0] for e in episodes]


def _label(event: list[Any]) -> str:
    """A trace event's category: what kind of thing it was, and which."""
    kind = event[0]
    if kind == "gc":
        return f"gc gen{event[4]}"
    if kind == "cb":
        wall, cpu = event[2] - event[1], event[3]
        if wall - cpu > 0.0005:
            return "descheduled (callback wall - CPU > 0.5 ms)"
        return "callback > 1 ms: " + str(event[4]).split(" > ")[0].rsplit(".", 1)[-1][:40]
    if kind == "sql":
        return f"statement > 1.5 ms: {event[3][:24]}"
    return f"{kind} > 3 ms"


def _notable(event: list[Any]) -> bool:
    wall = event[2] - event[1]
    kind = event[0]
    return bool(kind == "gc" or (kind == "cb" and (wall > 0.001 or wall - event[3] > 0.0005))
            or (kind == "sql" and wall > 0.0015) or (kind == "commit" and wall > 0.003))


def attribution(result: openloop.OpenLoopResult, trace: list[list[Any]],
                slow_ms: float) -> list[str]:
    """For each kind of notable thing in the server's timeline (GC, slow callbacks, time
    descheduled, long statements and commits): the share of slow requests it overlapped,
    against the share of equally long windows placed at random (the control) — a cause shows
    as a lift well above 1 — and the first episodes, each with what overlapped it."""
    if not trace:
        return ["(no trace)"]
    start = result.started
    windows = [(start + d, start + d + lat) for d, lat in
               zip(result.dues, result.latencies, strict=True) if lat * 1000 > slow_ms]
    notable = sorted((e for e in trace if _notable(e)), key=lambda e: e[1])
    begins = [e[1] for e in notable]
    longest = max((e[2] - e[1] for e in notable), default=0.0)

    def overlapping(lo: float, hi: float) -> list[list[Any]]:
        import bisect
        first = bisect.bisect_left(begins, lo - longest)
        return [e for e in notable[first:bisect.bisect_right(begins, hi)] if e[2] > lo]

    rng = random.Random(1)
    span = (start, start + max(result.dues, default=0.0))
    hits: dict[str, int] = {}
    control: dict[str, int] = {}
    for lo, hi in windows:
        for label in {_label(e) for e in overlapping(lo, hi)}:
            hits[label] = hits.get(label, 0) + 1
        shift = rng.uniform(*span) - lo
        for label in {_label(e) for e in overlapping(lo + shift, hi + shift)}:
            control[label] = control.get(label, 0) + 1
    n = max(1, len(windows))
    lines = [f"{len(windows)} slow requests; a cause shows as a lift well above 1.\n",
             "| overlapped | slow requests | control | lift | count in run | median ms |",
             "|---|---:|---:|---:|---:|---:|"]
    counts: dict[str, list[float]] = {}
    for e in notable:
        counts.setdefault(_label(e), []).append((e[2] - e[1]) * 1000)
    for label in sorted(counts, key=lambda k: -hits.get(k, 0)):
        h, c = hits.get(label, 0), control.get(label, 0)
        lines.append(f"| {label} | {h / n:.0%} | {c / n:.0%} | "
                     f"{(h / c) if c else float('inf'):.1f} | {len(counts[label])} | "
                     f"{statistics.median(counts[label]):.2f} |")
    sql: dict[str, list[float]] = {}
    for e in trace:
        if e[0] in ("sql", "commit", "req"):
            sql.setdefault(e[0] if e[0] != "sql" else e[3][:24], []).append(e[2] - e[1])
    lines += ["", "| all of a kind (ms) | count | p50 | p99 |", "|---|---:|---:|---:|"]
    for label, walls in sorted(sql.items(), key=lambda kv: -len(kv[1]))[:10]:
        walls.sort()
        lines.append(f"| {label} | {len(walls)} | {walls[len(walls) // 2] * 1000:.2f} | "
                     f"{walls[int(len(walls) * 0.99)] * 1000:.2f} |")
    episodes: list[list[tuple[float, float]]] = []
    for lo, hi in sorted(windows):
        if episodes and lo - episodes[-1][-1][0] <= 0.005:
            episodes[-1].append((lo, hi))
        else:
            episodes.append([(lo, hi)])
    lines += ["", "First episodes (due time s: requests, worst ms; what overlapped, ms):"]
    for episode in episodes[:25]:
        lo, hi = episode[0][0], max(h for _, h in episode)
        seen = "; ".join(
            f"{e[0]}{e[4] if e[0] == 'gc' else ''} {(e[2] - e[1]) * 1000:.1f}"
            + (f" (cpu {e[3] * 1000:.1f}) {str(e[4])[:70]}" if e[0] == "cb" else "")
            + (f" {e[3]}" if e[0] in ("sql", "commit") else "")
            for e in overlapping(lo, hi)[:6])
        lines.append(f"- {lo - start:.3f}: {len(episode)}, "
                     f"{max(h - low for low, h in episode) * 1000:.1f}; {seen}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=openloop.FIXED_RATE)
    parser.add_argument("--seconds", type=float, default=openloop.FIXED_SECONDS,
                        help="the fixed-rate window (as bench.intake's; it was 8 s here)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slow-ms", type=float, default=5.0)
    parser.add_argument("--variants", default="default,delay0,no-projector,no-tree,quiet")
    parser.add_argument("--show-episodes", action="store_true")
    parser.add_argument("--closed", type=int, default=0,
                        help="also this many seconds of wrk -c64 per server")
    parser.add_argument("--baseline", help="a tree of other code for `base:` variants")
    parser.add_argument("--trace", action="store_true",
                        help="run the servers under bench/trace.py and attribute the slow "
                        "requests to what overlapped them (GC, slow callbacks, commits, SQL)")
    parser.add_argument("--burst", type=int, default=0, metavar="S",
                        help="first S seconds of wrk -c64 (the after-burst condition)")
    parser.add_argument("--sample", action="store_true",
                        help="CPU by process kind and PostgreSQL's maintenance while measured, "
                        "laid against the slow requests (bench/sampler.py)")
    parser.add_argument("--backends", action="store_true",
                        help="PostgreSQL's CPU by what each backend ran (bench/pgbackends.py)")
    parser.add_argument("--io", action="store_true",
                        help="from before the burst to the window's end, every 100 ms: the "
                        "page cache's dirty pool, who dirtied it (/proc/PID/io by kind), "
                        "pg_stat_io and the WAL's fsyncs, laid against the requests "
                        "(bench/sampler.py IoSampler)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the intake while measured: bench/out/profile-*.txt")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n.rpartition(":")[2] not in VARIANTS]
    if any(":" in n for n in names) and not args.baseline:
        raise SystemExit("base: variants need --baseline DIR")
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    cluster = Cluster()
    traffic = Traffic(seed=42, portals=20, churn=False)
    tokens = {p.member_id: p.token for p in traffic.portals}
    bodies = corpus(traffic, 20_000)
    lines = openloop.load_bodies(bodies)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    try:
        postmaster = asyncio.run(postmaster_pid(cluster.admin_dsn))
        load_before = os.getloadavg()[0]
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            for index, name in enumerate(order):
                run = measure(name, args, cluster, lines, bodies, tokens, postmaster,
                              f"l{round_}v{index}")
                runs[name].append(run)
                print(f"{name}: {run.result.summary()}"
                      + (f" (after a burst of {run.burst}"
                         f"{'' if run.settled else ', not settled'})" if run.burst else ""),
                      file=sys.stderr)
        load_after = os.getloadavg()[0]
    finally:
        cluster.stop()
    print(f"`python -m bench.latency {' '.join(sys.argv[1:])}`: {args.rate:.0f}/s for "
          f"{args.seconds:g} s, {args.rounds} round(s), medians; load average "
          f"{load_before:.1f}/{load_after:.1f} on {os.cpu_count()} cores\n")
    print("Per delivery: CPU µs by process, syscalls (read+write) and wake-ups (voluntary "
          "context switches of main threads) of the server's processes and of PostgreSQL.\n")
    print("| variant | p50 ms | p99 ms | p99.9 ms | intake µs | projector µs | forwarder µs | "
          "PG µs | commits/s | drafts/commit | append ms | stall episodes/s | req/episode | "
          "closed /s | closed µs | syscalls (server/PG) | wake-ups (server/PG) | intake preempted "
          "/1k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
          "---:|")
    for name, rs in runs.items():
        def med(values: list[float]) -> float:
            return statistics.median(values)

        def us(role: str, rs: list[Run] = rs) -> float:
            return med([r.cpu.get(role, 0.0) * 1e6 / max(1, r.result.ok) for r in rs])

        def per(kind: str, who: str, rs: list[Run] = rs) -> float:
            return med([getattr(r, kind).get(who, 0) / max(1, r.result.ok) for r in rs])

        episodes = [stalls(r.result, args.slow_ms) for r in rs]
        per_second = [n / r.result.wall_seconds for (n, _, _), r in zip(episodes, rs, strict=True)]
        print(f"| {name} | {med([r.result.latency_ms(50) for r in rs]):.2f} | "
              f"{med([r.result.latency_ms(99) for r in rs]):.2f} | "
              f"{med([r.result.latency_ms(99.9) for r in rs]):.2f} | "
              f"{us('intake'):.0f} | {us('projector'):.0f} | {us('forwarder'):.0f} | "
              f"{us('postgres'):.0f} | "
              f"{med([r.commits / r.result.wall_seconds for r in rs]):.0f} | "
              f"{med([r.drafts / max(1, r.commits) for r in rs]):.2f} | "
              f"{med([r.append_seconds * 1000 / max(1, r.commits) for r in rs]):.2f} | "
              f"{med(per_second):.1f} | "
              f"{med([size for _, size, _ in episodes]):.1f} | "
              f"{med([r.closed_rate for r in rs]):.0f} | {med([r.closed_us for r in rs]):.0f} | "
              f"{per('syscalls', 'intake'):.1f}/{per('syscalls', 'postgres'):.1f} | "
              f"{per('switches', 'intake'):.1f}/{per('switches', 'postgres'):.1f} | "
              f"{med([r.preempted * 1000 / max(1, r.result.ok) for r in rs]):.0f} |")
        if args.show_episodes:
            for _, _, starts in episodes:
                print(f"  {name} episodes at: " + " ".join(f"{s:.3f}" for s in starts[:40]))
    print(f"\np99 by {openloop.SLICE_SECONDS:g} s of each fixed-rate window (ms; the window "
          "began after the server and PostgreSQL went idle): " + "; ".join(
              f"{name} " + " | ".join(r.result.shape() for r in rs) for name, rs in runs.items()))
    if any(r.burst for rs in runs.values() for r in rs):
        print("\nBurst before the fixed rate (deliveries stored at saturation; settled): "
              + "; ".join(f"{name} " + ", ".join(f"{r.burst}{'' if r.settled else ' unsettled'}"
                                                 for r in rs) for name, rs in runs.items()))
    if args.backends:
        kinds = sorted({k for rs in runs.values() for r in rs if r.backends
                        for k in r.backends.seconds})
        print("\nPostgreSQL CPU µs per delivery by what each process ran (bench/pgbackends.py; "
              "medians):\n")
        print("| kind | " + " | ".join(runs) + " |")
        print("|---|" + "---:|" * len(runs))
        def booked(kind: str, rs: list[Run]) -> float:
            return statistics.median(
                [r.backends.seconds.get(kind, 0.0) * 1e6 / max(1, r.result.ok)
                 for r in rs if r.backends is not None] or [0.0])

        for kind in kinds:
            print(f"| {kind} | " + " | ".join(f"{booked(kind, rs):.1f}" for rs in runs.values())
                  + " |")
    if args.sample:
        for name, rs in runs.items():
            for index, r in enumerate(rs):
                if r.sampled is None:
                    continue
                print(f"\n### {name}, round {index + 1}: what was busy while measured\n")
                print("\n".join(lay_against(r.sampled, r.result.started, r.result.dues,
                                             r.result.latencies, args.slow_ms)))
    if args.io:
        for name, rs in runs.items():
            for index, r in enumerate(rs):
                print(f"\n### {name}, round {index + 1}: the page cache and who dirtied it "
                      "(t from before the burst; the window's requests by due time)\n")
                print("\n".join(io_timeline(r.io, r.result.started, r.result.dues,
                                             r.result.latencies)))
    if args.trace:
        for name, rs in runs.items():
            for r in rs:
                print(f"\n### {name}: what overlapped the requests slower than "
                      f"{args.slow_ms:g} ms\n")
                print("\n".join(attribution(r.result, r.trace, args.slow_ms)))


if __name__ == "__main__":
    main()
