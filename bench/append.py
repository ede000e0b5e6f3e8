"""What one group-commit transaction costs, before and after: CPU of the appending process and
of its PostgreSQL backend, per append, for small and large batches.

    python -m bench.append --baseline DIR [--rounds 3] [--appends 400] [--batches 1,4,64]
    python -m bench.append --baseline DIR --clients @1000,64 --appends 2000

With `--clients`, the drafts go through the group committer from that many concurrent senders
(each sends its next when the last is stored), or, written `@RATE`, at that fixed rate (open
loop), instead of `EventStore.append` batches.

At a fixed moderate rate (1,000 deliveries/s) batches are small, so what a transaction costs
whatever it holds — its round trips, each a wake-up of PostgreSQL and of the appender — is paid
every few deliveries; at saturation it is spread over ~64. Each measurement is a process of its
own appending realistic event drafts (bench/scale.py's) one batch after another through
`EventStore.append` on a one-connection pool; `DIR` holds other code (e.g. `git archive main |
tar -x -C DIR`) run the same way, interleaved with this tree's (the order alternating by round),
so a busy machine drifts against both alike. Reported: medians of µs per append and their ratio,
and the driver's share per row: the CPU of the statement that writes the events (asyncpg
encoding the row arrays, sending them, taking the answer). CPU time, not wall time: on a shared
machine wall time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_TREE = str(Path(__file__).resolve().parent.parent)  # this tree, for bench.scale


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _clients(dsn: str, clients: int, drafts: int, rate: float = 0.0) -> dict[str, float]:
    """`clients` senders at once, each submitting its next draft when the last is stored,
    through the group committer as `ledger serve` wires it (offline trust, append timeout, and
    the head locked ahead where the code has it): per draft, this process's CPU, its backends'
    CPU, commits, and wall time (64 clients: the large batches of saturation). With `rate`,
    open loop instead: one draft due every 1/rate s, each submitted when due whatever is still
    waiting (the small batches of a fixed moderate rate, drafts arriving while one commits),
    with p50/p99 of the time from due to stored."""
    import tempfile

    from ledger.committer import GroupCommitter
    from ledger.metrics import Metrics
    from ledger.offline import Appender, OfflineTrust
    from ledger.settings import Settings, TrustPolicy
    from ledger.simulation import Traffic
    from ledger.storage.store import EventStore, create_pool

    sys.path.append(_TREE)
    from bench.scale import templates, vary

    traffic = Traffic(seed=42, portals=20, churn=False)
    base = templates(traffic, Settings(database_url=dsn), 200)
    pool = await create_pool(dsn, size=4)
    import inspect  # the baseline's store may not keep a connection: as `serve` wires each

    keep = ({"keep_connection": True}
            if "keep_connection" in inspect.signature(EventStore).parameters else {})
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, notify_every=0.05, **keep)
    offline = OfflineTrust(Path(tempfile.mkdtemp()) / "trust", worker=0,
                           policy=TrustPolicy.ALLOWLIST)
    await offline.start(store)
    metrics = Metrics()
    committer = GroupCommitter(Appender(store, offline), max_events=256, max_delay=0,
                               metrics=metrics, append_timeout=10.0)
    if hasattr(store, "lock_ahead_when"):
        store.lock_ahead_when(committer.waiting)
    committer.start()
    n = 0

    async def client(count: int) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            await committer.submit(vary(base[n % len(base)], n))

    def commits() -> float:
        return metrics.registry.get_sample_value("ledger_append_batch_size_count") or 0.0

    latencies: list[float] = []

    async def timed(due: float) -> None:
        nonlocal n
        n += 1
        await committer.submit(vary(base[n % len(base)], n))
        latencies.append(time.perf_counter() - due)

    async def open_loop(count: int) -> None:
        start, sent = time.perf_counter(), set()
        for k in range(count):
            due = start + k / rate
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            sent.add(task := asyncio.create_task(timed(due)))
            task.add_done_callback(sent.discard)
        while sent:
            await asyncio.gather(*sent)

    async def load(count: int) -> None:
        if rate:
            await open_loop(count)
        else:
            await asyncio.gather(*(client(count // clients) for _ in range(clients)))

    try:
        await load(200)  # warm
        latencies.clear()
        backends = [int(r[0]) for r in await pool.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND usename = current_user")]
        cpu, wall, done = time.process_time(), time.perf_counter(), commits()
        pg = sum(_cpu_of(b) for b in backends)
        await load(drafts)
        count = drafts if rate else drafts // clients * clients
        found = {"client_us": (time.process_time() - cpu) * 1e6 / count,
                 "pg_us": (sum(_cpu_of(b) for b in backends) - pg) * 1e6 / count,
                 "wall_us": (time.perf_counter() - wall) * 1e6 / count,
                 "commits": (commits() - done) / count}
        if latencies:
            latencies.sort()
            found["p50_ms"] = latencies[len(latencies) // 2] * 1000
            found["p99_ms"] = latencies[int(len(latencies) * 0.99)] * 1000
        return found
    finally:
        await committer.close()
        if hasattr(store, "let_go_ahead"):
            await store.let_go_ahead()
        if hasattr(store, "release_kept"):
            await store.release_kept()
        await store.announcer.flush()
        await pool.close()


async def _worker(dsn: str, batch: int, appends: int) -> dict[str, float]:
    """One measurement, in this process (whichever ledger PYTHONPATH gives it)."""
    from ledger.settings import Settings, TrustPolicy
    from ledger.simulation import Traffic
    from ledger.storage.store import EventStore, create_pool

    sys.path.append(_TREE)  # after whichever ledger PYTHONPATH chose
    from bench.scale import templates, vary

    traffic = Traffic(seed=42, portals=20, churn=False)
    settings = Settings(database_url=dsn)
    base = templates(traffic, settings, 200)
    pool = await create_pool(dsn, size=1)
    try:
        import inspect  # as `serve` wires the store of each tree

        keep = ({"keep_connection": True}
                if "keep_connection" in inspect.signature(EventStore).parameters else {})
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST, **keep)
        backend = int(await pool.fetchval("SELECT pg_backend_pid()"))
        n = 0
        # the driver's share: CPU of the statement that writes the rows (encoding the
        # parameters, sending them, taking the answer), per row; nothing else runs meanwhile
        write_cpu = [0.0]
        original_write = getattr(store, "_write", None)
        if original_write is not None:
            async def timed_write(*args: Any, **kwargs: Any) -> Any:
                began = time.process_time()
                try:
                    return await original_write(*args, **kwargs)
                finally:
                    write_cpu[0] += time.process_time() - began

            setattr(store, "_write", timed_write)  # noqa: B010 - an instance's, for this measure

        async def run(count: int) -> None:
            nonlocal n
            for _ in range(count):
                await store.append([vary(base[(n + i) % len(base)], n + i)
                                    for i in range(batch)])
                n += batch

        await run(50)  # statements prepared, caches warm
        write_cpu[0] = 0.0
        cpu, pg, wall = time.process_time(), _cpu_of(backend), time.perf_counter()
        await run(appends)
        found = {"client_us": (time.process_time() - cpu) * 1e6 / appends,
                 "pg_us": (_cpu_of(backend) - pg) * 1e6 / appends,
                 "wall_us": (time.perf_counter() - wall) * 1e6 / appends,
                 "write_us_per_row": write_cpu[0] * 1e6 / (appends * batch)}
        if hasattr(store, "release_kept"):
            await store.release_kept()
        return found
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a tree of other code to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--appends", type=int, default=400)
    parser.add_argument("--batches", default="1,4,64")
    parser.add_argument("--clients", default="",
                        help="instead of batches: this many concurrent senders through the "
                        "group committer, e.g. 2,64 (µs and commits per draft)")
    parser.add_argument("--worker", nargs=3, metavar=("DSN", "BATCH", "APPENDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        dsn, batch, appends = args.worker
        if batch.startswith("c"):
            print(json.dumps(asyncio.run(_clients(dsn, int(batch[1:]), int(appends)))))
        elif batch.startswith("r"):
            print(json.dumps(asyncio.run(_clients(dsn, 0, int(appends), float(batch[1:])))))
        else:
            print(json.dumps(asyncio.run(_worker(dsn, int(batch), int(appends)))))
        return
    if not args.baseline:
        raise SystemExit("--baseline DIR: the code to compare with")
    from bench.common import Cluster
    from bench.intake import provision
    from ledger.simulation import Traffic

    tokens = {p.member_id: p.token for p in Traffic(seed=42, portals=20, churn=False).portals}
    batches: list[int | str] = (
        [f"r{c[1:]}" if c.startswith("@") else f"c{c}" for c in args.clients.split(",")]
        if args.clients else [int(b) for b in args.batches.split(",")])
    codes = {"before": str(Path(args.baseline).resolve()), "after": None}
    found: dict[tuple[str, int | str], list[dict[str, float]]] = {}
    cluster = Cluster()
    try:
        for round_ in range(args.rounds):
            order = list(codes) if round_ % 2 == 0 else list(codes)[::-1]
            for batch in batches:
                for code in order:
                    database = asyncio.run(cluster.fresh_database("bench_append", migrate=True))
                    dsn = cluster.dsn(database, user="ledger_app")
                    asyncio.run(provision(dsn, tokens))
                    env = dict(os.environ)
                    if codes[code] is not None:
                        env["PYTHONPATH"] = str(codes[code])
                    output = subprocess.run(
                        [sys.executable, "-P", __file__, "--worker", dsn, str(batch),
                         str(args.appends)],
                        env=env, capture_output=True, text=True, check=True, cwd="/",
                    ).stdout
                    found.setdefault((code, batch), []).append(json.loads(output))
    finally:
        cluster.stop()
    print(f"`python -m bench.append {' '.join(sys.argv[1:])}`: µs per append (medians of "
          f"{args.rounds} rounds, {args.appends} appends each); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    keys = ["client_us", "pg_us", "wall_us"] + (["commits"] if args.clients else
                                                ["write_us_per_row"])
    if any(str(b).startswith("r") for b in batches):
        keys += ["p50_ms", "p99_ms"]
    print(f"| {'concurrent senders' if args.clients else 'drafts per append'} | appender CPU "
          "before | after | ratio | PostgreSQL backend CPU before | after | ratio | wall before "
          "| after | ratio |" + (" commits per draft before | after | ratio |"
                                 if args.clients else " the write statement's client CPU per "
                                 "row before | after | ratio |")
          + (" p50 ms before | after | ratio | p99 ms before | after | ratio |"
             if "p50_ms" in keys else ""))
    print("|---:" + "|---:|---:|---:" * len(keys) + "|")
    for batch in batches:
        cells = [str(batch).replace("c", "").replace("r", "@")]
        for key in keys:
            if key.endswith("_ms") and not str(batch).startswith("r"):
                cells += ["", "", ""]
                continue
            before = statistics.median(r[key] for r in found[("before", batch)])
            after = statistics.median(r[key] for r in found[("after", batch)])
            digits = (2 if key in ("commits", "p50_ms", "p99_ms")
                      else 1 if key == "write_us_per_row" else 0)
            cells += [f"{before:.{digits}f}", f"{after:.{digits}f}",
                      f"**{after / before:.2f}x**" if before else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
