"""The intake's CPU per delivery for gateway mode's handoff, in-process: this revision against
another one.

    python -m bench.handoff [--batches 8,16,32] [--rounds 3] [--baseline-src DIR]

The handoff runs on the intake's event loop, the one process a saturated `serve` is bound by
(bench.gateway): every microsecond here is taken from intake throughput with a route. Each run
is a child process (uvloop, as `serve`) that hands `Handoff.accept` the deliveries of one
commit — `--batches` of them at once, 2 KB bodies, one route — 300 times, and counts this
process's CPU (user + system, every thread: the writer thread is the handoff's too) per
delivery, minus the same concurrency doing nothing. Runs of this revision and of
`--baseline-src` (`git archive main | tar -x -C DIR`) alternate; read the ratio of the medians.
Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

_ROUNDS_IN_CHILD = 300


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


async def _child(batch: int) -> float:
    from ledger.gateway.handoff import Handoff
    from ledger.gateway.outbox import OutboxWriter
    from ledger.gateway.routes import Accepted
    from ledger.settings import Settings

    class Runner:
        def start(self, name: str, run: Any) -> None:
            pass

        async def stop(self, name: str) -> None:
            pass

    directory = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    try:
        settings = Settings(data_dir=directory, outbox_dir=directory / "outbox")
        writer = OutboxWriter(directory / "outbox" / "worker-0", os.urandom(32))
        handoff = Handoff(settings, None, writer, Runner(), None)  # type: ignore[arg-type]
        handoff._routes_for = lambda member_id, event_type: ["rt_0123456789"]  # type: ignore[method-assign]
        deliveries = [Accepted(
            body=os.urandom(1000).hex().encode(), content_type="application/x-www-form-urlencoded",
            raw_query="", member_id="bac1cd5c8940947a75e0d71b1a84e348",
            event_type="ONIMBOTMESSAGEADD", position=i, event_hash=os.urandom(32),
            dedup_key=os.urandom(16), received_at=datetime.now(UTC),
        ) for i in range(batch)]

        async def handed(delivery: Accepted) -> None:
            await asyncio.sleep(0)  # woken together, as one commit's handlers are
            await handoff.accept(delivery)

        async def idle(delivery: Accepted) -> None:
            await asyncio.sleep(0)

        spent: dict[str, list[float]] = {"handed": [], "idle": []}
        for _ in range(3):
            for name, step in (("idle", idle), ("handed", handed)):
                began = _cpu()
                for _ in range(_ROUNDS_IN_CHILD):
                    await asyncio.gather(*(step(d) for d in deliveries))
                spent[name].append((_cpu() - began) * 1e6 / (_ROUNDS_IN_CHILD * batch))
        writer.close()
        return min(spent["handed"]) - min(spent["idle"])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def child(arguments: list[str]) -> None:
    from ledger.cli.forwarding import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        print(orjson.dumps({"us": runner.run(_child(int(arguments[0])))}).decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, default=None)
    args = parser.parse_args()
    from bench.common import record

    batches = [int(b) for b in args.batches.split(",")]
    revisions: list[tuple[str, Path | None]] = [("this revision", None)]
    if args.baseline_src is not None:
        revisions.append(("baseline", args.baseline_src.resolve()))
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in batches:
            for name, source in revisions:
                path = [str(source)] if source is not None else []
                # this file by its path: the baseline's tree may have no bench.handoff
                code = (f"import sys, runpy; sys.path[:0] = {path!r}; "
                        f"runpy.run_path({__file__!r})['child'](sys.argv[1:])")
                done = subprocess.run([sys.executable, "-c", code, str(batch)], check=False,
                                      capture_output=True, text=True,
                                      cwd=Path(__file__).parent.parent)
                if done.returncode:
                    raise SystemExit(f"{name}, batch {batch}: {done.stderr[-2000:]}")
                us = orjson.loads(done.stdout.strip().splitlines()[-1])["us"]
                results.setdefault((name, batch), []).append(us)
    lines = [
        f"`python -m bench.handoff --batches {args.batches} --rounds {args.rounds}`: the "
        "intake's CPU per delivery handed to the outbox (`Handoff.accept`, one commit's "
        "deliveries at once, 2 KB bodies; user + system CPU of the whole process, minus the "
        "same concurrency doing nothing), revisions alternating.",
        "",
        "| handoff | deliveries per commit | CPU µs/delivery (rounds) | median |",
        "|---|---:|---|---:|",
    ]
    for (name, batch), runs in sorted(results.items(), key=lambda r: (r[0][1], r[0][0])):
        lines.append(f"| {name} | {batch} | {', '.join(f'{u:.1f}' for u in runs)} | "
                     f"{statistics.median(runs):.1f} |")
    if args.baseline_src is not None:
        def median(name: str, batch: int) -> float:
            return statistics.median(results[(name, batch)])

        ratios = ", ".join(f"{b}: **{median('this revision', b) / median('baseline', b):.2f}x**"
                           for b in batches)
        lines += ["", f"- this revision / baseline, by deliveries per commit: {ratios}"]
    record("Gateway mode: the intake's handoff CPU per delivery", lines)


if __name__ == "__main__":
    main()
