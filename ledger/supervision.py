"""What restarts a crashed background task: one supervisor for everything long-running.

`ledger serve` runs the group committer (which also drains the spool), the projector, its
NOTIFY listener and the checkpointer as supervised tasks. When one raises, the supervisor logs
the traceback, counts it (`ledger_task_failures_total{task=…}`), marks the task down (readiness
names it), calls the task's `on_crash` hook — the committer's settles every delivery waiting on
it, so no sender waits forever — and starts it again after a backoff that doubles up to a cap
and resets once a run has lasted a while. A task that returns has finished (it was closed).
A task that crashed `CRASH_LOOP` times within `stable_after` seconds stays named by readiness
even while it runs between crashes: a crash loop must not look healthy at the instant probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ledger.metrics import Metrics

log = logging.getLogger(__name__)

Run = Callable[[], Awaitable[None]]
OnCrash = Callable[[BaseException], None]
CRASH_LOOP = 3  # crashes within `stable_after` seconds that make a running task unready


@dataclass(frozen=True, slots=True)
class Down:
    """Why a task is not running, and when it is started again (loop time)."""

    reason: str
    restart_at: float


class Supervisor:
    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        first_backoff: float = 0.1,
        max_backoff: float = 30.0,
        stable_after: float = 60.0,
        stop_seconds: float = 5.0,
    ) -> None:
        """A run that lasted `stable_after` seconds before crashing restarts after
        `first_backoff` again; each quicker crash doubles the wait, up to `max_backoff`.
        `stop` waits at most `stop_seconds` for a cancelled task to end."""
        self._metrics = metrics
        self._first, self._max, self._stable = first_backoff, max_backoff, stable_after
        self._stop_seconds = stop_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: dict[str, Down] = {}
        self._crashes: dict[str, deque[tuple[float, str]]] = {}

    def start(self, name: str, run: Run, *, on_crash: OnCrash | None = None) -> None:
        """Run `run()` as task `name`, again after every crash, until it returns or is stopped."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is supervised already")
        if self._metrics is not None:
            self._metrics.task_up.labels(name).set(1)
        self._tasks[name] = asyncio.create_task(self._supervise(name, run, on_crash), name=name)

    def down(self) -> dict[str, str]:
        """Each task not running now, with why and when it restarts (empty: all are up)."""
        now = asyncio.get_running_loop().time()
        down = {
            name: f"down ({d.reason}); restarting in {max(0.0, d.restart_at - now):.1f}s"
            for name, d in self._down.items()
        }
        for name, crashes in self._crashes.items():
            recent = [reason for at, reason in crashes if now - at < self._stable]
            if name not in down and len(recent) >= CRASH_LOOP:
                down[name] = (f"crash-looping: {len(recent)} crashes in the last "
                              f"{self._stable:g}s (last: {recent[-1]})")
        return down

    async def join(self, name: str) -> None:
        """Until task `name` has returned (after its owner asked it to finish)."""
        task = self._tasks.pop(name, None)
        if task is not None:
            await task

    async def stop(self, name: str) -> None:
        """Cancel task `name` and wait for it to end — a bounded wait, so that a shutdown
        (`systemctl stop`) never hangs on one task.

        A cancellation can be lost inside a task (on Python 3.11 `asyncio.wait_for` returns
        the result instead when the awaited thing completes in the same step, and a library
        may turn it into an error the task's loop retries), so it is repeated until the task
        ends; one that still runs after `stop_seconds` is abandoned, with an error logged.
        """
        task = self._tasks.pop(name, None)
        if task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._stop_seconds
        while not task.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.error("background task %s did not stop within %gs of being cancelled; "
                          "abandoned", name, self._stop_seconds)
                return
            task.cancel()
            await asyncio.wait({task}, timeout=min(0.5, remaining))
        with contextlib.suppress(asyncio.CancelledError):
            task.result()

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)

    async def _supervise(self, name: str, run: Run, on_crash: OnCrash | None) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._first
        try:
            while True:
                began = loop.time()
                try:
                    await run()
                    return
                except Exception as exc:  # noqa: BLE001 - every crash is logged, counted, restarted
                    if loop.time() - began >= self._stable:
                        backoff = self._first
                    self._crashed(name, exc, loop.time() + backoff)
                    if on_crash is not None:
                        try:
                            on_crash(exc)
                        except Exception:
                            log.exception("the crash hook of task %s failed", name)
                await asyncio.sleep(backoff)  # pacing restarts, not waiting for a result
                backoff = min(backoff * 2, self._max)
                self._up(name)
        finally:
            self._down.pop(name, None)
            self._crashes.pop(name, None)
            if self._metrics is not None:
                self._metrics.task_up.labels(name).set(0)

    def _crashed(self, name: str, exc: BaseException, restart_at: float) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:300]
        log.error("background task %s crashed; restarting", name, exc_info=exc)
        self._down[name] = Down(reason, restart_at)
        now = asyncio.get_running_loop().time()
        self._crashes.setdefault(name, deque(maxlen=CRASH_LOOP)).append((now, reason))
        if self._metrics is not None:
            self._metrics.task_failures.labels(name).inc()
            self._metrics.task_up.labels(name).set(0)

    def _up(self, name: str) -> None:
        self._down.pop(name, None)
        if self._metrics is not None:
            self._metrics.task_up.labels(name).set(1)
        log.info("background task %s restarted", name)
