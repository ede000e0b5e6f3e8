"""An open-loop load generator: deliveries at a fixed rate, latency from when each was due.

    python -m bench.openloop URL --bodies FILE [--rate 1000] [--seconds 20] [--connections 64]

wrk is closed-loop: a connection sends its next request only after the last answer, so a slow
answer also delays the requests that would have been sent meanwhile, and their waiting is never
measured (coordinated omission). Here, as in wrk2, request k is *due* at start + k / rate and
goes out on connection k mod C; its latency is measured from that due time, so time spent queued
behind a slow answer counts. How late the generator itself sent (`send lag`: after the due time
or, if its connection was still busy then, after that connection's last answer) and its own CPU
are reported too: when the send lag is small, the latencies are the server's.

Raw HTTP/1.1 keep-alive on asyncio streams (an aiohttp client costs several times the CPU), on
an event loop over select(2): epoll's timeouts are whole milliseconds, which alone made sends up
to 1 ms late (measured: send lag p50 0.56 / p99 1.33 ms with epoll, 0.10 / 0.29 ms with select).
Bodies come from a corpus file, one per line, each made unique by replacing `__SEQ__`.

`fixed_rate` is *the* fixed-rate measurement of every bench (bench.intake's @1000/s column,
bench.latency's variants): one settle rule, one rate, one window length, one set of numbers,
so that two benches cannot measure "p99 at 1000/s" two ways again. (They did: bench.latency's
default window was 8 s, bench.intake's 20 s — the sixth session compared an 8-s p99 with a
20-s one; see bench/RESULTS.md, seventh session.) Besides p50/p99 it reports the p99 of each
5-s slice of the window (`OpenLoopResult.slices`): whether the tail is spread over the window
or sits at one time after the load before it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import selectors
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.proc import CpuMeter, CpuSample

# The fixed rate of issue #15's target (p99 <= 5 ms at 1,000 deliveries/s), for every bench.
FIXED_RATE = 1000.0
# Long enough that p99 is the 200th slowest of 20,000 and a window covers the time after a
# burst in which its consequences land (PostgreSQL's autovacuum, the kernel's writeback of the
# burst's pages ~30 s after they were written); 8 s (bench.latency's old default) is 80.
FIXED_SECONDS = 20.0
FIXED_CONNECTIONS = 64
SLICE_SECONDS = 5.0


@dataclass
class OpenLoopResult:
    rate: float  # asked for
    seconds: float  # of schedule
    due: int = 0
    answered: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0  # due but never answered: a connection failed, or the drain deadline
    latencies: list[float] = field(default_factory=list)  # seconds, from the due time
    dues: list[float] = field(default_factory=list)  # each latency's due time, s from start
    send_lags: list[float] = field(default_factory=list)  # seconds the generator was late
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process while it ran
    nice: int = 0  # the generator's scheduling priority
    started: float = 0.0  # time.perf_counter() of due time 0 (CLOCK_MONOTONIC: machine-wide)

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def achieved_rate(self) -> float:
        return self.answered / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds * 1e6 / self.answered if self.answered else 0.0

    def latency_ms(self, p: float) -> float:
        return _percentile(self.latencies, p) * 1000

    def send_lag_ms(self, p: float) -> float:
        return _percentile(self.send_lags, p) * 1000

    def slices(self, width: float = SLICE_SECONDS) -> list[tuple[float, int, float]]:
        """(start s, requests, p99 ms) of each `width`-second slice of due time: a tail spread
        evenly over the window, or one that sits in one slice (something that happened then)."""
        buckets: dict[int, list[float]] = {}
        for due, latency in zip(self.dues, self.latencies, strict=True):
            buckets.setdefault(int(due // width), []).append(latency)
        return [(index * width, len(values), _percentile(values, 99) * 1000)
                for index, values in sorted(buckets.items())]

    def shape(self, width: float = SLICE_SECONDS) -> str:
        """The slices' p99s as one line, e.g. `3.1 · 3.4 · 14.2 · 4.0`."""
        return " · ".join(f"{p99:.1f}" for _, _, p99 in self.slices(width))

    def held(self, lag_ms: float = 1.0) -> bool:
        """Every due request answered, at the rate asked, and sent on time (p99 of the
        generator's own lateness under `lag_ms`)."""
        return (self.answered == self.due and self.achieved_rate >= 0.98 * self.rate
                and self.send_lag_ms(99) < lag_ms)

    def summary(self) -> str:
        return (f"{self.answered}/{self.due} answered at {self.achieved_rate:.0f}/s (asked "
                f"{self.rate:.0f}/s), 2xx {self.ok}; latency from due "
                f"p50 {self.latency_ms(50):.2f} ms, p99 {self.latency_ms(99):.2f} ms, "
                f"p99.9 {self.latency_ms(99.9):.2f} ms; generator's own send lag p50 "
                f"{self.send_lag_ms(50):.2f} / p99 {self.send_lag_ms(99):.2f} ms; generator CPU "
                f"{self.cpu_us_per_request:.0f} µs/request "
                f"({self.cpu_seconds / self.wall_seconds:.0%} of a core, nice {self.nice})")


def _percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100), at least 1
    return ordered[int(rank) - 1]


def load_bodies(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line]


async def run(url: str, bodies: list[bytes], *, rate: float, seconds: float,
              connections: int = 64, tag: str | None = None,
              drain_seconds: float = 10.0) -> OpenLoopResult:
    """Send `rate` * `seconds` POSTs to `url` on schedule and measure them (see the module)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n").encode()
    marker = (tag or secrets.token_hex(4)).encode()
    result = OpenLoopResult(rate=rate, seconds=seconds)
    total = int(rate * seconds)
    result.due = total
    interval = 1.0 / rate

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port)

    async def lane(lane_index: int, start: float) -> None:
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for k in range(lane_index, total, connections):
            due = start + k * interval
            free = time.perf_counter()  # the lane's last answer is in: it may send now
            delay = due - free
            if delay > 0:
                await asyncio.sleep(delay)
            body = bodies[k % len(bodies)].replace(b"__SEQ__", marker + b"-%d" % k)
            request = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
            try:
                if streams is None:
                    streams = await connect()
                reader, writer = streams
                result.send_lags.append(max(0.0, time.perf_counter() - max(due, free)))
                writer.write(request)
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if streams is not None:
                    streams[1].close()
                streams = None
                continue
            result.latencies.append(time.perf_counter() - due)
            result.dues.append(due - start)
            result.answered += 1
            result.statuses[status] += 1
        if streams is not None:
            streams[1].close()

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a full collection mid-run would show up as the server's latency
    cpu = time.process_time()
    try:
        start = result.started = time.perf_counter() + 0.05
        lanes = [asyncio.create_task(lane(i, start)) for i in range(connections)]
        done, pending = await asyncio.wait(lanes, timeout=seconds + drain_seconds + 0.05)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in a lane is a bug in the benchmark: let it show
        result.wall_seconds = time.perf_counter() - start
        result.errors = total - result.answered
    finally:
        result.cpu_seconds = time.process_time() - cpu
        if gc_was_enabled:
            gc.enable()
    return result


async def _read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 answer with a Content-Length body (aiohttp always sends one): its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length:
        await reader.readexactly(length)
    return status


def run_sync(url: str, bodies: list[bytes], *, nice: int = -10,
             **options: Any) -> OpenLoopResult:
    """`run` on its own event loop over select(2) (microsecond timeouts; see the module), at
    the scheduling priority `nice` if allowed (root): on a machine busy with other work the
    generator must send on time, or its own lateness would be blamed on the server."""
    previous = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        raised = nice
    except PermissionError:
        raised = previous
    try:
        with asyncio.Runner(loop_factory=_precise_loop) as runner:
            result = runner.run(run(url, bodies, **options))
    finally:
        if raised != previous:
            os.setpriority(os.PRIO_PROCESS, 0, previous)
    result.nice = raised
    return result


@dataclass
class FixedRate:
    """One fixed-rate window (`fixed_rate`): the generator's result, the CPU the server's tree
    and the cluster spent in it, and how the window began."""

    result: OpenLoopResult
    spent: CpuSample
    settled: bool  # the server and PostgreSQL had gone idle (else the 15 s deadline passed)
    waited: float  # seconds from the end of the load before (the call) to the window


def fixed_rate(url: str, bodies: list[bytes], meter: CpuMeter, *, tag: str,
               rate: float = FIXED_RATE, seconds: float = FIXED_SECONDS,
               connections: int = FIXED_CONNECTIONS,
               before: Callable[[], None] | None = None) -> FixedRate:
    """The fixed-rate measurement every bench takes, called right after whatever load came
    first (bench.intake's closed loop, bench.latency's warm-up or burst): wait until the
    server's process tree and the PostgreSQL cluster are idle (a projector catching up would
    otherwise count in the window), call `before()` (a bench's own counters), then `rate`
    requests/s for `seconds` on `connections` fresh connections (`run_sync`)."""
    began = time.monotonic()
    settled = meter.settle()
    if before is not None:
        before()
    waited = time.monotonic() - began
    start = meter.sample()
    result = run_sync(url, bodies, rate=rate, seconds=seconds, connections=connections,
                      tag=tag)
    return FixedRate(result, meter.sample() - start, settled, waited)


def _precise_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--bodies", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=FIXED_RATE)
    parser.add_argument("--seconds", type=float, default=FIXED_SECONDS)
    parser.add_argument("--connections", type=int, default=FIXED_CONNECTIONS)
    args = parser.parse_args()
    result = run_sync(args.url, load_bodies(args.bodies), rate=args.rate,
                      seconds=args.seconds, connections=args.connections)
    print(result.summary())
    print(f"p99 by {SLICE_SECONDS:g} s of due time: {result.shape()} ms")


if __name__ == "__main__":
    main()
