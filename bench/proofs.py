"""The Merkle tree's cost and its proofs at scale.

    python -m bench.proofs [--events 1000000] [--rounds 6] [--round-events 20000]

1. Append throughput with the tree follower running vs not, in the same run, alternating
   rounds (A B A B …) on one database so the machine's noise hits both alike; the follower runs
   in the appending process, as in `ledger serve`.
2. A store of `--events` events (filled through the real append path), the tree caught up from
   scratch, then inclusion and consistency proofs: size and time, generated and verified.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import Cluster, record
from bench.intake import provision
from bench.scale import templates, vary
from ledger import checkpoints, proofs, proving
from ledger.models import EventDraft
from ledger.proving import TreeFollower
from ledger.settings import Settings
from ledger.simulation import Traffic
from ledger.storage.store import EventStore, create_pool
from ledger.storage.tree_store import TreeStore


async def appends(store: EventStore, base: list[EventDraft], start: int, count: int) -> float:
    """Events/s of 4 concurrent appenders, 50 drafts per append (group-commit sized)."""
    per = count // 4

    async def worker(w: int) -> None:
        first = start + w * per
        for offset in range(0, per, 50):
            await store.append([vary(base[(first + offset + i) % len(base)], first + offset + i)
                                for i in range(min(50, per - offset))])

    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(4)))
    return 4 * per / (time.perf_counter() - began)


async def run(events: int, rounds: int, round_events: int, gather: float) -> None:
    cluster = Cluster()
    lines: list[str] = []
    try:
        traffic = Traffic(seed=9, portals=50, churn=False)
        tokens = {p.member_id: p.token for p in traffic.portals}
        db = await cluster.fresh_database("bench_proofs", migrate=True)
        dsn = cluster.dsn(db, user="ledger_app")
        await provision(dsn, tokens)
        settings = Settings(database_url=dsn, run_projector=False)
        base = templates(traffic, settings, 500)
        pool = await create_pool(dsn, size=8)
        store, trees = EventStore(pool, policy=settings.trust_policy), TreeStore(pool)

        # 1. throughput with and without the follower
        rates: dict[bool, list[float]] = {False: [], True: []}
        lags: list[int] = []
        sequence = 0
        for r in range(rounds):
            with_tree = r % 2 == 1
            task = None
            if with_tree:
                await trees.catch_up()
                follower = TreeFollower(trees)
                task = asyncio.create_task(
                    follower.run(dsn, poll_seconds=1.0, gather_seconds=gather))
            rate = await appends(store, base, sequence, round_events)
            sequence += round_events
            if task is not None:
                head, _ = await store.head()
                lags.append(head - (await trees.head()).size)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            rates[with_tree].append(rate)
            print(f"  round {r}: {'with' if with_tree else 'without'} follower {rate:.0f}/s",
                  flush=True)
        without, with_ = statistics.median(rates[False]), statistics.median(rates[True])
        lines += [
            f"`python -m bench.proofs --events {events} --rounds {rounds} --round-events "
            f"{round_events} --gather-ms {gather * 1000:g}` (4 concurrent appenders x 50 drafts "
            "per append, alternating rounds on one database; a shared, noisy 2-core machine: "
            "read the ratio, not the rates).",
            "",
            "| append throughput | rounds (events/s) | median |",
            "|---|---|---:|",
            f"| without the tree follower | {', '.join(f'{x:.0f}' for x in rates[False])} "
            f"| {without:.0f} |",
            f"| with the tree follower | {', '.join(f'{x:.0f}' for x in rates[True])} "
            f"| {with_:.0f} |",
            f"- with / without: **{with_ / without:.2f}x** (target ≥ 0.90); tree lag at the end "
            f"of each round: {lags} leaves",
        ]

        # 2. a large store: fill, build the tree from scratch, prove
        began = time.perf_counter()
        while sequence < events:  # fresh dedup keys: continue the rounds' sequence
            batch = [vary(base[(sequence + i) % len(base)], sequence + i)
                     for i in range(min(2000, events - sequence))]
            await store.append(batch)
            sequence += len(batch)
            if sequence % 200_000 < 2000:
                print(f"  filled {sequence}", flush=True)
        filled = time.perf_counter() - began
        head, _ = await store.head()
        before = (await trees.head()).size
        began = time.perf_counter()
        size = await trees.catch_up(limit=5000)
        build = time.perf_counter() - began
        built = size - before
        async with pool.acquire() as connection:
            nodes = await connection.fetchval("SELECT count(*) FROM ledger.tree_nodes")
            table = await connection.fetchval(
                "SELECT pg_total_relation_size('ledger.tree_nodes')")
        key = Ed25519PrivateKey.generate()
        note = await proving.make_checkpoint(trees, key, "bench")
        public = key.public_key()
        lines += [
            "",
            f"Store of {head} events (filled through the append path in {filled:.0f}s). "
            f"The tree caught up {built} leaves in {build:.0f}s "
            f"({built / max(build, 1e-9):.0f} leaves/s, batches of 5 000): {nodes} nodes, "
            f"{table / 2**20:.0f} MiB with index.",
        ]
        generate: list[float] = []
        verify: list[float] = []
        sizes: list[int] = []
        paths: list[int] = []
        rng = random.Random(7)
        for _ in range(200):
            position = rng.randint(1, size)
            began = time.perf_counter()
            bundle = await proving.inclusion_bundle(trees, position, note)
            generate.append((time.perf_counter() - began) * 1000)
            encoded = orjson.dumps(bundle)
            began = time.perf_counter()
            proofs.verify_inclusion(orjson.loads(encoded), public, "bench")
            verify.append((time.perf_counter() - began) * 1000)
            sizes.append(len(encoded))
            paths.append(len(bundle["audit_path"]))
        old_size = size - 1000
        old_note = await _checkpoint_at(trees, key, old_size)
        began = time.perf_counter()
        consistency = await proving.consistency_bundle(trees, old_note, note)
        c_generate = (time.perf_counter() - began) * 1000
        began = time.perf_counter()
        proofs.verify_consistency(consistency, public, "bench")
        c_verify = (time.perf_counter() - began) * 1000
        lines += [
            "",
            f"Inclusion proofs at {size} leaves (200 random positions): audit path "
            f"{min(paths)}-{max(paths)} hashes ({32 * max(paths)} bytes), bundle "
            f"{statistics.median(sizes)} bytes median as JSON (event, hex path, checkpoint); "
            f"generate p50 {_p(generate, 50):.2f} ms / p99 {_p(generate, 99):.2f} ms "
            f"(one query for the nodes, one for the event), verify offline p50 "
            f"{_p(verify, 50):.2f} ms.",
            f"Consistency proof {old_size} → {size}: {len(consistency['proof'])} hashes, "
            f"generated in {c_generate:.1f} ms, verified in {c_verify:.2f} ms.",
        ]
        await pool.close()
    finally:
        cluster.stop()
    record("Merkle tree: follower cost, proofs at scale", lines)


async def _checkpoint_at(trees: TreeStore, key: Ed25519PrivateKey, size: int) -> str:
    """A checkpoint of an earlier size, signed from the stored nodes (as if taken back then)."""
    from datetime import UTC, datetime

    from ledger import merkle
    from ledger.storage.tree_store import EVENTS_LOG

    nodes, _ = await trees.proof_material(EVENTS_LOG, size)
    return checkpoints.sign(checkpoints.Checkpoint(
        "bench", size, bytes(32), datetime.now(UTC), merkle.root_from(size, nodes)), key)


def _p(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-events", type=int, default=20_000)
    parser.add_argument("--gather-ms", type=float, default=250.0)
    args = parser.parse_args()
    asyncio.run(run(args.events, args.rounds, args.round_events, args.gather_ms / 1000))


if __name__ == "__main__":
    main()
