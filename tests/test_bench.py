"""The benchmark's own instruments: the open-loop generator and the /proc CPU meter.

Their numbers go into bench/RESULTS.md and issue #15's verdicts, so they are tested like code:
latency is measured from when a request was due (a slow server shows as queueing, not hidden
by it), and a process tree's CPU includes its children, alive or reaped.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from bench import openloop
from bench.proc import tree_cpu_seconds

Handler = Callable[[web.Request], Awaitable[web.Response]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/bitrix24/events", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/bitrix24/events"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_open_loop_sends_every_due_request_with_unique_bodies(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    seen: list[bytes] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(text="ok")

    url = await serve(hello)
    result = await openloop.run(url, [b"a=1&seq=__SEQ__", b"b=2&seq=__SEQ__"], rate=200,
                                seconds=1, connections=4, tag="t")
    assert (result.due, result.answered, result.ok, result.errors) == (200, 200, 200, 0)
    assert len(set(seen)) == 200
    assert all(b"__SEQ__" not in body for body in seen)
    assert 0.9 < result.wall_seconds < 5
    assert 0 <= result.latency_ms(50) < 100


async def test_open_loop_latency_counts_the_wait_behind_a_slow_answer(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """One connection, a request due every 10 ms, each answered after 50 ms: the 20th was due
    at 190 ms and answered at ~1 s. A closed-loop tool would report 50 ms for every one."""

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.05)  # the server under test is slow: that is the scenario
        return web.Response(text="ok")

    url = await serve(slow)
    result = await openloop.run(url, [b"a=__SEQ__"], rate=100, seconds=0.2, connections=1)
    assert result.answered == result.due == 20
    assert max(result.latencies) > 0.7  # 20 x 50 ms - 190 ms, less some slack
    assert min(result.latencies) >= 0.05
    # the generator itself was not late: each send went out once its connection was free
    assert result.send_lag_ms(99) < 40


def test_slices_show_when_in_the_window_the_tail_was() -> None:
    """A 20-s window whose only slow requests sit in its last 5 s: the window's p99 says
    "slow", the slices say when — the first three hold the fast requests' p99, the last the
    slow ones'. (The sixth session compared an 8-s window with a 20-s one: a tail that lands
    late after a burst is in one and not the other.)"""
    result = openloop.OpenLoopResult(rate=100, seconds=20)
    for k in range(2000):
        due = k / 100
        result.dues.append(due)
        result.latencies.append(0.040 if due >= 15 and k % 10 == 0 else 0.002)
    assert [(start, n) for start, n, _ in result.slices()] == [
        (0.0, 500), (5.0, 500), (10.0, 500), (15.0, 500)]
    assert [round(p99, 1) for _, _, p99 in result.slices()] == [2.0, 2.0, 2.0, 40.0]
    assert result.shape() == "2.0 · 2.0 · 2.0 · 40.0"
    assert result.latency_ms(99) == 40.0  # 50 slow of 2000: the whole window's p99 is slow
    assert [p99 for _, _, p99 in result.slices(10)] == [2.0, 40.0]


def test_tree_cpu_counts_children_alive_and_reaped() -> None:
    """A parent whose child burns CPU: the tree has that CPU while the child lives and still
    after the parent reaped it."""
    child = ("import sys, time\nwhile time.process_time() < 0.3: pass\n"
             "print('burnt', flush=True)\nsys.stdin.readline()")
    parent = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {child!r}], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        print(child.stdout.readline().strip(), flush=True)
        sys.stdin.readline()
        child.communicate("")  # lets the child end, and reaps it
        print("reaped", flush=True)
        sys.stdin.readline()
    """)
    with subprocess.Popen([sys.executable, "-c", parent], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        try:
            assert process.stdout.readline().strip() == "burnt"
            alive = tree_cpu_seconds(process.pid)
            assert alive >= 0.29
            process.stdin.write("\n")
            process.stdin.flush()
            assert process.stdout.readline().strip() == "reaped"
            assert tree_cpu_seconds(process.pid) >= alive
            process.stdin.write("\n")
            process.stdin.flush()
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
