"""Intake measured the way users compare (issue #15 item 5), in one run on one PostgreSQL.

    python -m bench.intake [--quick] [--workers 1,2] [--builds pure,compiled]
                           [--ledger-python PATH | --build-compiled] [--rounds N]

Servers, all fed the same bodies (simulated bot events, each made unique) — see bench/servers.py:
the form-reading hello (aiohttp form parser + token check, no database), the naive intake (the
same + one durable INSERT per request) and the body-only hello (throughput only), then
`ledger serve` — the real CLI, as production runs it, default log level — for each worker count
and build. The pure build is this interpreter's ledger; the compiled build is `--ledger-python`
(a venv with the mypyc-compiled ledger installed) or the venv `--build-compiled` makes; the
modules that really are compiled there are probed and printed.

For each server:
- closed loop, `wrk -t2 -c64` (apt-get install wrk): deliveries/s answered 2xx, p50/p99, and
  p99 against the issue's target connections / throughput * 2 (64 / rate * 2 s at 64);
- open loop at a fixed 1,000 deliveries/s for 20 s (`bench.openloop.fixed_rate`, the same
  measurement as bench.latency's): p50/p99 from each request's due time (no coordinated
  omission), p99 by 5-s slice of the window, and the generator's own send lag and CPU;
- CPU µs per delivery answered 2xx, from /proc (bench/proc.py): the server process with all its
  children (`--workers N`, a projector process), and every process of the PostgreSQL cluster.
Before each measured interval the server and the cluster are let settle (a projector catching
up after the warm-up) so that each interval pays for its own deliveries only.

Prints one table and the verdicts against issue #15's targets, and appends them to
bench/RESULTS.md. The machine is 2 cores shared with wrk, the generator and PostgreSQL (and, in
development, with other jobs): read the ratios and CPU per delivery, not wall-clock rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import openloop
from bench.builds import REPO, Build, build_compiled, probe
from bench.common import OUT, Cluster, record, wait_healthy
from bench.proc import CpuMeter, CpuSample, descendants, per_delivery_us, postmaster_pid
from ledger import wire
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.operations import change_trust
from ledger.settings import TrustPolicy
from ledger.simulation import Traffic
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange

LUA = Path(__file__).parent / "post.lua"

# issue #15's targets
NAIVE_TARGET, FORM_TARGET, SERVER_CPU_TARGET_US, FIXED_RATE_P99_TARGET_MS = 1.5, 0.35, 100, 5.0


def corpus(traffic: Traffic, size: int) -> Path:
    """Bot events (trust is provisioned up front), each with a __SEQ__ slot."""
    path = OUT / "bodies.txt"
    lines: list[str] = []
    while len(lines) < size:
        delivery = traffic.next()
        if delivery.document["event"] in (INSTALL, UNINSTALL, UPDATE):
            continue
        body = wire.http_build_query(delivery.document).decode()
        lines.append(body + "&data%5BBENCH_SEQ%5D=__SEQ__")
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


async def provision(dsn: str, tokens: dict[str, str]) -> None:
    pool = await create_pool(dsn, size=2)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    for member_id, token in tokens.items():
        await change_trust(store, TrustChange.PROVISIONED, member_id=member_id, token=token,
                           actor="bench")
    await pool.close()


def run_wrk(url: str, bodies: Path, seconds: float, connections: int,
            tag: str = "") -> dict[str, float]:
    """One wrk run; `tag` makes its bodies distinct from every other run's (see post.lua)."""
    command = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s",
               "--timeout", "10s", "-s", str(LUA), url, "--", str(bodies), tag]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    result["ok"] = result["requests"] - result["non_2xx"]
    result["rate"] = result["ok"] / result["seconds"]
    return result


def serve(argv: list[str], env: dict[str, str], port: int, cwd: Path | None = None,
          log_name: str | None = None) -> subprocess.Popen[bytes]:
    with (OUT / f"{log_name or f'server-{port}'}.log").open("wb") as log:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log,
                                   cwd=cwd)
    wait_healthy(f"http://127.0.0.1:{port}/healthz", process=process)
    return process


def stop(process: subprocess.Popen[bytes], seconds: float = 90) -> None:
    """SIGTERM, as an operator stops it; a server still busy with a backlog after `seconds`
    (aiohttp lets handlers finish) is killed with all its children, so that none outlives
    the benchmark."""
    tree = descendants(process.pid)
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        print(f"{process.args!r} did not stop in {seconds:.0f} s: killed", file=sys.stderr)
        for pid in [*tree, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    """A port nobody listens on now (other benchmarks may run on this machine at once)."""
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # hello | form | naive | ledger
    workers: int = 1
    build: Build | None = None
    fixed_rate: bool = True  # also measured at the fixed rate


@dataclass
class Measurement:
    """One server in one round; CPU in µs per delivery answered 2xx (None: not measurable)."""

    rate: float
    p50: float
    p99: float
    non_2xx: float
    server_us: float | None
    pg_us: float | None
    fixed: openloop.OpenLoopResult | None = None
    fixed_server_us: float | None = None
    fixed_pg_us: float | None = None
    fixed_waited: float = 0.0  # s from the end of the closed loop to the fixed-rate window
    unsettled: int = 0  # measured intervals that started before the server went idle
    # stored rows minus 2xx answers: from 0 (each body stored once) up to `in_flight` (the
    # requests wrk or the generator stopped waiting for, which the server may still store)
    extra_stored: int | None = None
    in_flight: int = 0


@dataclass(frozen=True)
class Plan:
    seconds: float
    warmup: float
    connections: int
    rate: float
    rate_seconds: float
    rate_connections: int


def measure(config: Config, plan: Plan, cluster: Cluster, bodies: Path, corpus_lines: list[bytes],
            tokens: dict[str, str], postmaster: int | None, tag: str) -> Measurement:
    port = free_port()
    env: dict[str, str] = {"BENCH_TOKENS": json.dumps(tokens)}
    cwd: Path | None = REPO
    if config.kind in ("hello", "form"):
        argv = [sys.executable, "-m", "bench.servers", config.kind, "--port", str(port)]
    elif config.kind == "naive":
        database = asyncio.run(cluster.fresh_database("bench_naive", migrate=False))
        argv = [sys.executable, "-m", "bench.servers", "naive", "--port", str(port),
                "--dsn", cluster.dsn(database)]
    else:
        assert config.build is not None
        database = asyncio.run(cluster.fresh_database("bench_ledger", migrate=True))
        service = cluster.dsn(database, user="ledger_app")
        asyncio.run(provision(service, tokens))
        data_dir = OUT / f"ledger-data-{port}"
        shutil.rmtree(data_dir, ignore_errors=True)
        # -P and a directory without ledger/ in it: the build's own installation is imported
        argv = [config.build.python, "-P", "-m", "ledger", "serve", "--port", str(port),
                "--workers", str(config.workers)]
        env = {"LEDGER_DATABASE_URL": service, "LEDGER_DATA_DIR": str(data_dir)}
        cwd = OUT
    table = {"naive": "naive_events", "ledger": "ledger.events"}.get(config.kind)
    rows_before = 0 if table != "ledger.events" else asyncio.run(
        _count(cluster.dsn("bench_ledger"), table))
    answered = 0  # 2xx over every run against this server, warm-ups included
    slug = "".join(c if c.isalnum() else "-" for c in config.name)
    process = serve(argv, env, port, cwd=cwd, log_name=f"server-{slug}")
    url = f"http://127.0.0.1:{port}/bitrix24/events"
    meter = CpuMeter(process.pid, postmaster)
    unsettled = 0

    def measured(run: Callable[[], int]) -> tuple[int, CpuSample]:
        nonlocal unsettled
        unsettled += not meter.settle()
        before = meter.sample()
        delivered = run()
        return delivered, meter.sample() - before

    try:
        answered += int(run_wrk(url, bodies, plan.warmup, plan.connections,
                                tag=f"{tag}w")["ok"])
        closed: dict[str, float] = {}

        def closed_loop() -> int:
            closed.update(run_wrk(url, bodies, plan.seconds, plan.connections, tag=f"{tag}m"))
            return int(closed["ok"])

        delivered, spent = measured(closed_loop)
        answered += delivered
        result = Measurement(
            rate=closed["rate"], p50=closed["p50_ms"], p99=closed["p99_ms"],
            non_2xx=closed["non_2xx"], server_us=per_delivery_us(spent.server, delivered),
            pg_us=per_delivery_us(spent.postgres, delivered),
        )
        if config.fixed_rate:  # measured as bench.latency measures it: openloop.fixed_rate
            window = openloop.fixed_rate(
                url, corpus_lines, meter, rate=plan.rate, seconds=plan.rate_seconds,
                connections=plan.rate_connections, tag=f"{tag}o")
            unsettled += not window.settled
            delivered = window.result.ok
            answered += delivered
            result.fixed = window.result
            result.fixed_waited = window.waited
            result.fixed_server_us = per_delivery_us(window.spent.server, delivered)
            result.fixed_pg_us = per_delivery_us(window.spent.postgres, delivered)
        result.unsettled = unsettled
    finally:
        stop(process)
        if config.kind == "ledger":
            shutil.rmtree(OUT / f"ledger-data-{port}", ignore_errors=True)
    if table is not None:
        database = "bench_ledger" if config.kind == "ledger" else "bench_naive"
        stored = asyncio.run(_count(cluster.dsn(database), table)) - rows_before
        result.extra_stored = stored - answered
        result.in_flight = 2 * plan.connections + (
            plan.rate_connections + result.fixed.due - result.fixed.answered
            if result.fixed else 0)
    return result


async def _count(dsn: str, table: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await connection.close()


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**miss**"


def report(configs: list[Config], runs: dict[str, list[Measurement]], plan: Plan,
           header: list[str]) -> list[str]:
    def med(name: str, pick: Callable[[Measurement], float | None]) -> float | None:
        return _median([pick(m) for m in runs[name]])

    lines = [*header, "",
             "| server | deliveries/s | p50 ms | p99 ms | p99 target ms | server CPU µs | "
             "PG CPU µs | @1000/s p50 ms | @1000/s p99 ms | @1000/s server µs | "
             "@1000/s PG µs | gen. lag p99 ms | not 2xx |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config in configs:
        name = config.name
        rate = med(name, lambda m: m.rate)
        target = plan.connections / rate * 2 * 1000 if rate else None
        fixed_p50 = med(name, lambda m: m.fixed.latency_ms(50) if m.fixed else None)
        fixed_p99 = med(name, lambda m: m.fixed.latency_ms(99) if m.fixed else None)
        lag = med(name, lambda m: m.fixed.send_lag_ms(99) if m.fixed else None)
        non_2xx = sum(m.non_2xx + (m.fixed.due - m.fixed.ok if m.fixed else 0)
                      for m in runs[name])
        lines.append(
            f"| {name} | {_fmt(rate)} | {_fmt(med(name, lambda m: m.p50), 2)} | "
            f"{_fmt(med(name, lambda m: m.p99), 2)} | "
            f"{_fmt(target, 1) if config.kind == 'ledger' else '-'} | "
            f"{_fmt(med(name, lambda m: m.server_us))} | {_fmt(med(name, lambda m: m.pg_us))} | "
            f"{_fmt(fixed_p50, 2)} | {_fmt(fixed_p99, 2)} | "
            f"{_fmt(med(name, lambda m: m.fixed_server_us))} | "
            f"{_fmt(med(name, lambda m: m.fixed_pg_us))} | {_fmt(lag, 2)} | {non_2xx:.0f} |")

    naive_rate, form_rate = med("naive intake", lambda m: m.rate), med(
        "form-reading hello", lambda m: m.rate)
    lines += ["", "Verdicts (issue #15 targets; medians over rounds):"]
    for config in configs:
        if config.kind != "ledger":
            continue
        name = config.name
        rate = med(name, lambda m: m.rate) or 0.0
        p99 = med(name, lambda m: m.p99) or 0.0
        cpu = med(name, lambda m: m.server_us)
        fixed_p99 = med(name, lambda m: m.fixed.latency_ms(99) if m.fixed else None)
        vs_naive = rate / naive_rate if naive_rate else 0.0
        vs_form = rate / form_rate if form_rate else 0.0
        p99_target = plan.connections / rate * 2 * 1000 if rate else 0.0
        parts = [
            f"/ naive **{vs_naive:.2f}x** (≥ {NAIVE_TARGET}x) {_verdict(vs_naive >= NAIVE_TARGET)}",
            f"/ form-reading hello **{vs_form:.2f}x** (≥ {FORM_TARGET}x) "
            f"{_verdict(vs_form >= FORM_TARGET)}",
            f"server CPU **{_fmt(cpu)} µs** (≤ {SERVER_CPU_TARGET_US}) "
            f"{_verdict(cpu is not None and cpu <= SERVER_CPU_TARGET_US)}",
            f"p99 at {plan.rate:.0f}/s **{_fmt(fixed_p99, 1)} ms** "
            f"(≤ {FIXED_RATE_P99_TARGET_MS:.0f}) "
            f"{_verdict(fixed_p99 is not None and fixed_p99 <= FIXED_RATE_P99_TARGET_MS)}",
            f"p99 at {plan.connections} connections **{p99:.1f} ms** (≤ {p99_target:.1f}) "
            f"{_verdict(p99 <= p99_target)}",
        ]
        lines.append(f"- {name}: " + "; ".join(parts))

    ledgers = [c for c in configs if c.kind == "ledger"]
    for config in ledgers:
        base = next(c for c in ledgers if c.workers == config.workers)
        if config is base:
            continue
        rate, base_rate = med(config.name, lambda m: m.rate), med(base.name, lambda m: m.rate)
        cpu, base_cpu = (med(config.name, lambda m: m.server_us),
                         med(base.name, lambda m: m.server_us))
        if rate and base_rate and cpu and base_cpu:
            lines.append(f"- {config.name} / {base.name}: throughput **{rate / base_rate:.2f}x**, "
                         f"server CPU per delivery **{cpu / base_cpu:.2f}x**")
    if any(len(ms) > 1 for ms in runs.values()):
        lines.append("- per round (consistency: CPU per delivery should agree), server / PG "
                     "CPU µs at 64 connections: " + "; ".join(
                         f"{name} " + ", ".join(f"{_fmt(m.server_us)}/{_fmt(m.pg_us)}"
                                               for m in ms)
                         for name, ms in runs.items()))
    for config in configs:
        for index, m in enumerate(runs[config.name]):
            if m.fixed is not None and config.kind in ("ledger", "naive"):
                round_ = f" (round {index + 1})" if len(runs[config.name]) > 1 else ""
                lines.append(
                    f"- {config.name}{round_}, p99 by {openloop.SLICE_SECONDS:g} s of the "
                    f"fixed-rate window (ms): "
                    f"{m.fixed.shape()}; p99.9 {m.fixed.latency_ms(99.9):.1f}; the window "
                    f"began {m.fixed_waited:.1f} s after the closed loop")
    for m in runs.get("form-reading hello", []):
        if m.fixed is not None:
            verdict = "held" if m.fixed.held() else "**did not hold**"
            lines.append(f"- the open-loop generator against the form-reading hello {verdict} "
                         f"{plan.rate:.0f}/s: {m.fixed.summary()}")
    checked = [(name, m) for name, ms in runs.items() for m in ms
               if m.extra_stored is not None]
    counts = ", ".join(f"{name} {m.extra_stored:+d}" for name, m in checked)
    if all(0 <= (m.extra_stored or 0) <= m.in_flight for _, m in checked):
        lines.append(f"- rows stored minus 2xx answers, per server ({counts}): never below 0 "
                     "(no answer without its row, no duplicate) and at most the requests in "
                     "flight when a load run stopped")
    else:
        lines.append(f"- **rows stored minus 2xx answers out of bounds** ({counts}): below 0 "
                     "means answers without a row of their own (duplicates?), above the "
                     "requests in flight at a run's end means rows nobody was answered for")
    unsettled = sum(m.unsettled for ms in runs.values() for m in ms)
    if unsettled:
        lines.append(f"- {unsettled} measured interval(s) began before the server and "
                     "PostgreSQL had gone idle (15 s deadline): their CPU includes earlier work")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="closed-loop measured seconds")
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=openloop.FIXED_RATE,
                        help="open-loop deliveries/s")
    parser.add_argument("--rate-seconds", type=float, default=openloop.FIXED_SECONDS)
    parser.add_argument("--rate-connections", type=int, default=openloop.FIXED_CONNECTIONS)
    parser.add_argument("--workers", default="1,2", help="ledger worker counts")
    parser.add_argument("--builds", default="pure,compiled")
    parser.add_argument("--ledger-python", help="interpreter of a venv with the compiled ledger "
                        "(default: this one, which makes a single build)")
    parser.add_argument("--build-compiled", action="store_true",
                        help="make that venv first: bench/out/venv-compiled, "
                        "VARIABLE=1 pip install .")
    parser.add_argument("--mypyc-switch", default="LEDGER_MYPYC", metavar="VARIABLE",
                        help="the environment variable that turns the mypyc build on")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all servers; medians")
    parser.add_argument("--quick", action="store_true",
                        help="smoke: 3 s closed loop, 5 s open loop, 1 s warm-up")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rate_seconds, args.warmup = 3, 5, 1
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    plan = Plan(args.seconds, args.warmup, args.connections, args.rate, args.rate_seconds,
                args.rate_connections)
    OUT.mkdir(parents=True, exist_ok=True)
    wanted = {b.strip() for b in args.builds.split(",") if b.strip()}
    builds: list[Build] = []
    notes: list[str] = []
    if "pure" in wanted:
        builds.append(probe(sys.executable, outside=OUT))
    if "compiled" in wanted:
        python = args.ledger_python
        if args.build_compiled:
            python = build_compiled(OUT / "venv-compiled", variable=args.mypyc_switch) \
                or python
        # not resolved: two venvs' interpreters are symlinks to one binary
        if python and os.path.abspath(python) != os.path.abspath(sys.executable):
            other = probe(python, outside=OUT)
            if not other.compiled:
                notes.append(f"`{python}` runs a ledger without compiled modules: its rows are "
                             "a second pure build, not the compiled one")
            builds.append(other)
        else:
            notes.append("compiled build: not run (no --ledger-python, or --build-compiled "
                         "found no switch in this tree)")
    workers = [int(w) for w in args.workers.split(",")]
    configs = [Config("form-reading hello", "form"), Config("naive intake", "naive")]
    for index, build in enumerate(builds):
        label = build.label if index == 0 or build.label != builds[0].label \
            else f"{build.label} #{index + 1}"
        for count in workers:
            configs.append(Config(f"ledger, {count} worker{'s' if count > 1 else ''}, {label}",
                                  "ledger", count, build))
    configs.append(Config("hello (reads bytes only)", "hello", fixed_rate=False))

    cluster = Cluster()
    traffic = Traffic(seed=42, portals=20, churn=False)
    tokens = {p.member_id: p.token for p in traffic.portals}
    bodies = corpus(traffic, 20_000)
    corpus_lines = openloop.load_bodies(bodies)
    runs: dict[str, list[Measurement]] = {c.name: [] for c in configs}
    try:
        postmaster = asyncio.run(postmaster_pid(cluster.admin_dsn))
        if postmaster is None:
            notes.append("PostgreSQL CPU: not measured (the cluster's processes are not visible "
                         "from here)")
        settings = asyncio.run(_cluster_settings(cluster.admin_dsn))
        load_before = os.getloadavg()
        for round_ in range(args.rounds):
            order = configs if round_ % 2 == 0 else configs[::-1]  # drift hurts both sides alike
            for index, config in enumerate(order):
                tag = f"r{round_}c{index}"
                runs[config.name].append(measure(config, plan, cluster, bodies, corpus_lines,
                                                 tokens, postmaster, tag))
                print(f"{config.name}: done (round {round_ + 1})", file=sys.stderr)
        load_after = os.getloadavg()
    finally:
        cluster.stop()

    build_lines = [
        f"{b.label} = `{_shown(b.python)}` "
        f"({', '.join(m.removeprefix('ledger.') for m in b.compiled) or 'no compiled modules'})"
        for b in builds
    ]
    header = [
        f"`python -m bench.intake {' '.join(sys.argv[1:])}`".replace("`python -m bench.intake `",
                                                                      "`python -m bench.intake`"),
        "",
        f"Same 20k simulated bot events (each made unique) to every server, one PostgreSQL "
        f"({settings}). Closed loop: wrk -t2 -c{plan.connections}, {plan.seconds:g} s after "
        f"{plan.warmup:g} s warm-up. Open loop: bench.openloop at {plan.rate:.0f}/s for "
        f"{plan.rate_seconds:g} s on {plan.rate_connections} connections, latency from each "
        f"request's due time (gen. lag: how late the generator itself sent; not 2xx: wrk's non-2xx "
        f"answers and the fixed-rate requests not answered 2xx within 10 s of the schedule's "
        f"end, i.e. a server that could not keep the rate). CPU per delivery "
        f"answered 2xx from /proc: the server's process tree, and all processes of the "
        f"PostgreSQL cluster (its background work shows in the hello's PG column). Ledger: "
        f"the `ledger serve` CLI, default log level. Builds: {'; '.join(build_lines)}. "
        f"Rounds: {args.rounds}. Load "
        f"average before/after: {load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} "
        f"cores — a shared machine: read ratios and CPU per delivery.",
        *[f"- {note}" for note in notes],
    ]
    lines = report(configs, runs, plan, header)
    if args.no_record:
        print("\n".join(lines))
    else:
        record("Intake, measured the way users compare (issue #15)", lines)


def _shown(path: str) -> str:
    """A path relative to the repository when inside it (RESULTS.md is read elsewhere)."""
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else path


async def _cluster_settings(dsn: str) -> str:
    connection = await asyncpg.connect(dsn)
    try:
        names = ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")
        values = [await connection.fetchval(f"SHOW {name}") for name in names]
    finally:
        await connection.close()
    return ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))


if __name__ == "__main__":
    main()
