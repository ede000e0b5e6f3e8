"""Fuzz the running intake: N random bodies (bytes, mangled forms, mangled samples, wrong types),
counting answers by status. Any 5xx or a dead server is a failure.

    python -m bench.fuzz [--bodies 100000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter

from aiohttp.test_utils import TestClient, TestServer

from bench.common import OUT, Cluster, record
from ledger import wire
from ledger.settings import Settings, TrustPolicy
from ledger.simulation import Traffic
from ledger.web import create_app

TYPES = [wire.FORM, wire.FORM, "application/json", "text/plain", "", "multipart/form-data",
         "application/x-www-form-urlencoded; charset=latin1"]


def bodies(rng: random.Random, traffic: Traffic, count: int) -> list[tuple[bytes, str]]:
    made = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            body = rng.randbytes(rng.randint(0, 3000))
        elif kind < 0.7:  # a real delivery, mangled
            mangled = bytearray(wire.http_build_query(traffic.next().document))
            for _ in range(rng.randint(1, 20)):
                mangled[rng.randrange(len(mangled))] = rng.choice(b"[]%&=+\x00\xff\xc3a0")
            body = bytes(mangled)
        elif kind < 0.85:  # deep or wide keys
            body = b"a" + b"[x]" * rng.randint(1, 80) + b"=1&" + b"k=v&" * rng.randint(0, 12000)
        else:
            body = b'{"event": ' + rng.randbytes(rng.randint(0, 200)) + b"}"
        made.append((body, rng.choice(TYPES)))
    return made


async def run(count: int, concurrency: int) -> None:
    cluster = Cluster()
    statuses: Counter[int] = Counter()
    try:
        database = await cluster.fresh_database("bench_fuzz", migrate=True)
        settings = Settings(database_url=cluster.dsn(database, user="ledger_app"),
                            trust_policy=TrustPolicy.TOFU, run_projector=False,
                            log_level="ERROR", data_dir=OUT / "fuzz")
        corpus = bodies(random.Random(1), Traffic(seed=1, portals=20), count)
        async with TestClient(TestServer(create_app(settings))) as client:
            queue = list(reversed(corpus))
            began = time.perf_counter()

            async def worker() -> None:
                while queue:
                    body, content_type = queue.pop()
                    async with client.post("/bitrix24/events", data=body,
                                           headers={"Content-Type": content_type}) as response:
                        await response.read()
                        statuses[response.status] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            seconds = time.perf_counter() - began
            healthy = (await client.get("/healthz")).status == 200
    finally:
        cluster.stop()
    fives = sum(n for status, n in statuses.items() if status >= 500)
    record("Fuzzing the intake", [
        f"`python -m bench.fuzz --bodies {count}`: {count} bodies in {seconds:.0f}s; answers "
        f"{dict(sorted(statuses.items()))}; **5xx: {fives}**; server healthy after: {healthy}.",
    ])
    if fives or not healthy:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bodies", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(run(args.bodies, args.concurrency))


if __name__ == "__main__":
    main()
