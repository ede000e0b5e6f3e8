"""The forwarder process (gateway mode): `ledger forward`, which `ledger serve` runs as one of
its sidecars (ledger.cli.sidecars: started with it, restarted with a backoff if it dies,
stopped when serving stops). Sending, retrying and recording attempts never run on the event
loop that answers Bitrix24 (ledger.gateway.forwarder says what the process does)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
from pathlib import Path

import click

from ledger.cli.app import main
from ledger.cli.common import fail_cleanly, settings_of
from ledger.gateway import outbox
from ledger.gateway.forwarder import (
    Forwarder,
    give_up_unreadable,
    outbox_keys,
    unreadable_outbox,
)
from ledger.metrics import Metrics
from ledger.settings import Settings
from ledger.storage import target as targets
from ledger.storage.gateway_store import GatewayStore
from ledger.storage.store import create_pool
from ledger.supervision import Supervisor

log = logging.getLogger(__name__)
_FIRST_BACKOFF, _MAX_BACKOFF, _STABLE_SECONDS = 0.5, 30.0, 60.0
_PARENT_CHECK_SECONDS = 0.5


@main.command()
@click.option("--parent-pid", type=int, default=None, hidden=True,
              help="Set by `ledger serve`: exit once that process is no longer our parent.")
@click.option("--rotate-key", is_flag=True,
              help="Retire keys/outbox.key (kept, read only, to open what it sealed) and make "
                   "a new one; restart `ledger serve` to seal with it.")
@click.option("--give-up-unreadable", is_flag=True,
              help="Set aside the outbox segments no key at hand opens (a lost key), each of "
                   "their forwards recorded as given up (outbox_key_lost).")
@click.option("--yes", is_flag=True, help="With --give-up-unreadable: do it (else: list).")
@click.pass_context
@fail_cleanly
def forward(
    ctx: click.Context, parent_pid: int | None, rotate_key: bool, give_up_unreadable: bool,
    yes: bool,
) -> None:
    """Forward what the intake sealed into the outbox to the routes' destinations.

    `ledger serve` runs one of these itself; run it by hand only when serving without it. One
    runs at a time per outbox (a second waits for the first to end).
    """
    settings = settings_of(ctx)
    if rotate_key:
        if settings.outbox_key is not None:
            raise click.ClickException(
                "the outbox key is set by LEDGER_OUTBOX_KEY: rotate it by writing the old "
                "value (base64) to keys/outbox-retired-<n>.key, then setting the new one")
        retired = outbox.rotate_key(settings.keys_dir)
        click.echo(f"outbox key rotated: the old one is kept as {retired} (read only) while "
                   "records sealed with it remain; restart `ledger serve` to seal with the "
                   "new one")
        return
    if give_up_unreadable:
        asyncio.run(_give_up_unreadable(settings, yes=yes))
        return
    if parent_pid is not None:
        _as_child(settings)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run_forwarder(settings, parent=parent_pid))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's when it is installed (as `serve` does): a forward costs a third less CPU on it
    (bench.forwarder), CPU the forwarder shares with the intake."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def run_forwarder(settings: Settings, *, parent: int | None = None) -> None:
    """Until SIGTERM/SIGINT — or, as `serve`'s child, until `parent` is gone (a `kill -9` of
    the intake must not leave a forwarder behind)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    lock = await _exclusive(settings, stop)
    if lock is None:
        return
    try:
        target = await targets.open_target(settings)
        try:
            # as serve's child, its backend (writing the attempt records) is niced like this
            # process: PostgreSQL's CPU goes to the intake's appends first, as ours does
            pool = await create_pool(
                target.service_dsn, size=2, connect=False,
                connect_timeout=settings.connect_timeout_seconds,
                backend_nice=settings.forwarder_nice if parent is not None else 0)
            supervisor = Supervisor(Metrics(), first_backoff=settings.task_restart_seconds)
            key, retired = outbox_keys(settings)
            for idle in await asyncio.to_thread(
                outbox.idle_retired_keys, settings.keys_dir, settings.outbox_root
            ):
                log.info("retired outbox key %s opens nothing left in the outbox: delete it "
                         "once every `ledger serve` started before its rotation was restarted",
                         idle)
            forwarder = Forwarder(settings, GatewayStore(pool), key, retired=retired,
                                  runner=supervisor)
            try:
                await forwarder.start()
                log.info("forwarding from %s", settings.outbox_root)
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), _PARENT_CHECK_SECONDS)
                    if parent is not None and os.getppid() != parent:
                        log.warning("ledger serve (pid %d) is gone; the forwarder stops", parent)
                        break
            finally:
                await forwarder.close()
                await supervisor.close()
                await pool.close()
        finally:
            target.release()
    finally:
        os.close(lock)


async def _give_up_unreadable(settings: Settings, *, yes: bool) -> None:
    segments = await asyncio.to_thread(unreadable_outbox, settings)
    if not segments:
        click.echo("every outbox segment opens with a key at hand: nothing to give up")
        return
    for path, count in segments:
        click.echo(f"{path.parent.name}/{path.name}: {count} record(s) no key opens")
    if not yes:
        click.echo("nothing changed: run again with --yes to set these aside and record "
                   "their forwards as given up (outbox_key_lost) — or restore the key")
        return
    lock = await asyncio.to_thread(_quiet_outbox, settings, segments)
    try:
        target = await targets.open_target(settings)
        try:
            pool = await create_pool(target.service_dsn, size=1, connect=False,
                                     connect_timeout=settings.connect_timeout_seconds)
            try:
                total = await give_up_unreadable(settings, GatewayStore(pool), segments)
            finally:
                await pool.close()
        finally:
            target.release()
    finally:
        os.close(lock)
    click.echo(f"{total} forward(s) given up and recorded (audit.forwards, outbox_key_lost); "
               f"the segments are in {settings.outbox_root / 'given-up'}")


def _quiet_outbox(settings: Settings, segments: list[tuple[Path, int]]) -> int:
    """`forwarder.lock`, held while forwards are given up — refused while a forwarder runs or
    a writer still has a listed segment's directory open: a running intake appends on to the
    segment it opened, through the rename (those forwards would be stored, never forwarded
    and recorded nowhere), and a key one process lacks may be one a running one holds."""
    handle = os.open(settings.outbox_root / "forwarder.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        live = [f"the intake writing {name}" for name in sorted(
            {p.parent.name for p, _ in segments if not outbox.writer_gone(p.parent)})]
    except BlockingIOError:
        live = ["a forwarder"]
    if live:
        os.close(handle)
        raise click.ClickException(
            f"{', '.join(live)} still runs, perhaps with the key these segments were sealed "
            "with: nothing changed. Stop `ledger serve` (and any `ledger forward`), then run "
            "this again")
    return handle


async def _exclusive(settings: Settings, stop: asyncio.Event) -> int | None:
    """One forwarder per outbox: hold `forwarder.lock` (a killed one's lock goes with it)."""
    root = settings.outbox_root
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True, mode=0o700)
    handle = os.open(root / "forwarder.lock", os.O_RDWR | os.O_CREAT, 0o600)
    said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if not said:
                log.warning("another forwarder holds %s; waiting for it to end",
                            root / "forwarder.lock")
                said = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _PARENT_CHECK_SECONDS)
        if stop.is_set():
            os.close(handle)
            return None


def _as_child(settings: Settings) -> None:
    """As `serve`'s sidecar: named, niced (and batch-scheduled), SIGINT left to the parent
    (which stops us), and metrics kept out of the workers' multiprocess files (`serve
    --workers` set PROMETHEUS_MULTIPROC_DIR for them; ours go to the status file)."""
    from prometheus_client import values

    _name_process(b"ledger-forward")
    with contextlib.suppress(OSError):
        os.nice(settings.forwarder_nice)  # intake first when CPU is short
    if settings.forwarder_nice:
        # and no wake-up preemption: each answer from a destination wakes this process; a
        # niced task that slept is still placed to preempt the intake it wakes beside, once
        # per forward under load (SCHED_BATCH: Linux; elsewhere nothing)
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def _name_process(name: bytes) -> None:
    """`ps -o comm`, `top` and /proc/PID/status show the forwarder as such, not as one more
    `python` beside the workers (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
