"""`ledger project --follow`: the projector as a process of its own.

Folding is CPU work the intake must not share its event loop with (issue #15): `ledger serve`
runs this as a child process (`ledger.cli.sidecars`), an operator may run it alone. It writes
through a pool of the projector role, wakes on NOTIFY, polls as a fallback, saves snapshots, and
stops cleanly on SIGTERM — or when the `ledger serve` that started it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from ledger.projections.projector import Projector
from ledger.proving import TreeFollower
from ledger.settings import Settings
from ledger.storage import target as targets
from ledger.storage.notifications import listen_forever
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, close_pool, create_pool
from ledger.storage.tree_store import TreeStore
from ledger.supervision import Supervisor

log = logging.getLogger(__name__)
_PARENT_CHECK_SECONDS = 1.0


async def follow(settings: Settings, *, parent_pid: int | None = None, tree: bool = False) -> None:
    """Keep the projections current until SIGTERM/SIGINT, or until `parent_pid` is no longer
    this process's parent (the serving process died without stopping us).

    `tree`: grow the Merkle tree here too, through a pool of the service role (which owns the
    tree). In a serving process its gathered catch-up — a quarter second's leaves hashed and
    written at once — held the intake's event loop often enough to be most of its p99 at a
    fixed 1000/s (bench/RESULTS.md, "Latency at 1000/s")."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if parent_pid is None:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    else:  # a child of `serve`: Ctrl-C reaches it through serve, which stops it in order
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.nice(settings.projector_nice)  # when CPU is short, the intake answers first
        if settings.projector_nice:
            # and no wake-up preemption, as the forwarder: every NOTIFY wakes this process (20 a
            # second at 1000/s) beside an intake that is mid-request; niced, a task that slept
            # is still placed to preempt it (SCHED_BATCH: Linux; elsewhere nothing)
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    target = await targets.open_target(settings)
    try:
        pool = await create_pool(target.projector_dsn, size=2, connect=False,
                                 connect_timeout=settings.connect_timeout_seconds,
                                 backend_nice=settings.projector_nice if parent_pid else 0)
        try:
            projector = Projector(EventStore(pool, policy=settings.trust_policy),
                                  ProjectionStore(pool),
                                  snapshot_every=settings.projector_snapshot_every)
            trees = None
            if tree:  # opens no connection now: nothing here can fail once tasks have started
                trees = await create_pool(
                    target.service_dsn, size=1, connect=False,
                    connect_timeout=settings.connect_timeout_seconds,
                    backend_nice=settings.projector_nice if parent_pid else 0)
            supervisor = Supervisor(first_backoff=settings.task_restart_seconds)
            supervisor.start("listener", lambda: listen_forever(
                target.projector_dsn, "ledger_events", projector.wake))
            supervisor.start("projector", lambda: projector.run(
                poll_seconds=settings.projector_poll_seconds,
                gather_seconds=settings.projector_gather_ms / 1000))
            if trees is not None:
                follower = TreeFollower(TreeStore(trees), batch=settings.tree_batch)
                supervisor.start("tree-follower", lambda: follower.run(
                    target.service_dsn, poll_seconds=settings.tree_poll_seconds,
                    gather_seconds=settings.tree_gather_ms / 1000))
            log.info("projector following the store%s (pid %d)",
                     " and growing the Merkle tree" if tree else "", os.getpid())
            try:
                while not stop.is_set():
                    if parent_pid is not None and os.getppid() != parent_pid:
                        log.error("the ledger serve process %d is gone; the projector stops",
                                  parent_pid)
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_PARENT_CHECK_SECONDS):
                            await stop.wait()
            finally:
                await supervisor.close()
                if trees is not None:
                    await close_pool(trees)
            log.info("projector stopped at position %d", projector.checkpoint)
        finally:
            await close_pool(pool)
    finally:
        target.release()
