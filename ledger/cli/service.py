"""Running the service and reaching its database: serve, migrate, db."""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from importlib.metadata import version
from pathlib import Path

import click
from prometheus_client import multiprocess as prometheus_multiprocess
from pydantic import SecretStr

from ledger import migrations
from ledger.cli.app import PORT_KEY, configure_logging, describe_failure, main
from ledger.cli.common import (
    fail_cleanly,
    settings_of,
)
from ledger.cli.sidecars import Sidecar
from ledger.gateway.forwarder import outbox_key
from ledger.settings import Settings
from ledger.storage import target as targets

log = logging.getLogger(__name__)
_MAX_RESTARTS, _RESTART_WINDOW_SECONDS = 5, 60.0  # more worker deaths than this: stop serving


@main.command()
@click.option("--host", default=None, help="Listen address (default: LEDGER_HOST, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Listen port (default: LEDGER_PORT, 8080).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes sharing the port (SO_REUSEPORT); the first one also writes "
              "checkpoints. /metrics then sums all of them. The projector runs in a process "
              "of its own either way (LEDGER_RUN_PROJECTOR).")
@click.pass_context
@fail_cleanly
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int) -> None:
    """Receive Bitrix24 events at POST /bitrix24/events and store them.

    Gateway mode's forwarder runs beside the intake as one child process (`ledger forward`),
    restarted if it dies.

    On the embedded database the schema is migrated first; on an external one the service
    refuses to start until `ledger migrate` has run.
    """
    settings = settings_of(ctx)
    address = (host or settings.host, port if port is not None else settings.port)
    # the listen address is a setting too: gateway mode refuses routes that point back at it
    settings = settings.model_copy(update={"host": address[0], "port": address[1]})
    ctx.meta[PORT_KEY] = address[1]
    # a lost outbox key refuses here, in one line, before any process starts (OutboxKeyLost)
    outbox_key(settings)
    _check_address(*address, reuse_port=workers > 1)  # before starting anything
    debug = bool(ctx.meta.get("ledger.debug"))
    if workers == 1:  # gateway mode's forwarder is a sidecar always (it idles without routes)
        target = asyncio.run(targets.open_target(settings))  # the children's DSNs
        sidecars = _sidecars(settings, target)
        try:
            _serve(_serving(settings), *address, reuse_port=False, debug=debug,
                   sidecars=sidecars)
        finally:
            _stop(sidecars)
            target.release()
        return
    metrics_dir = _fresh_metrics_dir(settings)
    # Start (and migrate) the database once, here, before the workers attach to it.
    target = asyncio.run(targets.open_target(settings))
    try:
        asyncio.run(targets.check_schema_if_reachable(
            target, connect_timeout=settings.connect_timeout_seconds))
    except BaseException:
        target.release()
        raise
    sidecars = _sidecars(settings, target)
    try:
        _run_workers(_serving(_attached(settings, target)), address, workers, metrics_dir,
                     sidecars, debug=debug)
    finally:
        _stop(sidecars)
        target.release()


def _sidecars(settings: Settings, target: targets.DatabaseTarget) -> list[Sidecar]:
    """The service's child processes besides its workers: one of each, whatever --workers
    says. They reach the database `target` this process opened (the embedded one by its DSNs,
    so that a child killed with -9 leaves the embedded server no stale user)."""
    env: dict[str, str] = {}
    if target.embedded is not None:
        env = {"LEDGER_DATABASE_URL": target.service_dsn,
               "LEDGER_PROJECTOR_DATABASE_URL": target.projector_dsn}
    found: list[Sidecar] = []
    if settings.run_projector:
        found.append(Sidecar("projector", ["project", "--follow", *_tree_flag(settings)],
                             env=env, first_backoff=settings.task_restart_seconds))
    # gateway mode: sending, retrying and recording forwards, off the intake's event loop; it
    # refuses routes to the listen address serve was given (--host/--port)
    found.append(Sidecar("forwarder", ["forward"], env={
        **env, "LEDGER_HOST": settings.host, "LEDGER_PORT": str(settings.port)},
        first_backoff=0.5))
    return found


def _tree_flag(settings: Settings) -> list[str]:
    """The projector process grows the Merkle tree too, when both run (see `_serving`)."""
    return ["--tree"] if settings.run_projector and settings.run_tree_follower else []


def _serving(settings: Settings) -> Settings:
    """The serving processes' settings: the Merkle tree follower is left to the projector
    process when that runs, off the event loop that answers Bitrix24."""
    if _tree_flag(settings):
        return settings.model_copy(
            update={"run_tree_follower": False, "tree_in_projector_process": True})
    return settings


def _stop(sidecars: list[Sidecar]) -> None:
    for sidecar in sidecars:
        sidecar.stop()


def _run_workers(
    settings: Settings, address: tuple[str, int], workers: int, metrics_dir: Path,
    sidecars: list[Sidecar], *, debug: bool,
) -> None:
    context = multiprocessing.get_context("spawn")

    def start(index: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_serve, args=(_worker_settings(settings, index, metrics_dir), *address),
            kwargs={"reuse_port": True, "debug": debug}, name=f"ledger-worker-{index}",
        )
        process.start()
        return process

    for sidecar in sidecars:  # the parent checked the schema (when reachable)
        sidecar.start()
    processes = {index: start(index) for index in range(workers)}
    started = {index: time.monotonic() for index in processes}
    stopping = False
    failed: list[str] = []

    def forward(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes.values():
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # A worker killed or crashed is replaced under the same number, so its share of connections
    # is served again (its spool, LEDGER_SPOOL_DIR/worker-N, is drained meanwhile by whichever
    # running worker adopts it, `ledger.adoption`, and by itself once back). One that
    # exits on a failure it explained (exit status 1 or 2: settings, schema, port) has a problem
    # a restart will not mend, and neither has one that keeps dying: then everything stops.
    restarts: list[float] = []
    while processes:
        multiprocessing.connection.wait([p.sentinel for p in processes.values()])
        for index, process in list(processes.items()):
            if process.exitcode is None:
                continue
            process.join()
            del processes[index]
            if process.pid is not None:
                prometheus_multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    process.pid, str(metrics_dir)
                )
            if process.exitcode in (0, -signal.SIGTERM, -signal.SIGINT) or stopping:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < _RESTART_WINDOW_SECONDS]
            if process.exitcode in (1, 2) or len(restarts) >= _MAX_RESTARTS:
                failed.append(process.name or f"ledger-worker-{index}")
                forward(signal.SIGTERM, None)
                continue
            log.error("%s exited with %s after %.0f s; starting it again", process.name,
                      process.exitcode, now - started[index])
            restarts.append(now)
            processes[index] = start(index)
            started[index] = now
    if failed:
        raise click.ClickException(f"worker(s) {', '.join(failed)} failed; see the log above")


def _check_address(host: str, port: int, *, reuse_port: bool) -> None:
    """Fail with one line now, not with a traceback once the database is up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(sockaddr)
        except PermissionError as exc:
            raise click.ClickException(
                f"not allowed to listen on port {port}: ports below 1024 need root or "
                "CAP_NET_BIND_SERVICE; choose another with --port / LEDGER_PORT"
            ) from exc
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise click.ClickException(
                    f"port {port} on {host} is already in use: stop what listens there, or "
                    "choose another with --port / LEDGER_PORT"
                ) from exc
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") \
                from exc


def _fresh_metrics_dir(settings: Settings) -> Path:
    """The workers' shared metric files: emptied at every start (the counters of the last run
    belong to it), announced to prometheus-client through its environment variable before any
    worker imports it."""
    directory = (settings.data_dir / "metrics").expanduser().resolve()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def _attached(settings: Settings, target: targets.DatabaseTarget) -> Settings:
    """Workers reach the embedded server this process started by its DSNs, as the sidecars
    do: a worker that opened it itself would be one of its registered users, and one killed
    with -9 would stay registered, so the server outlived the service."""
    if target.embedded is None:
        return settings
    return settings.model_copy(update={
        "database_url": SecretStr(target.service_dsn),
        "projector_database_url": SecretStr(target.projector_dsn),
    })


def _worker_settings(settings: Settings, index: int, metrics_dir: Path) -> Settings:
    update: dict[str, object] = {"worker": index, "metrics_dir": metrics_dir}
    if index > 0:
        update.update(checkpoint_dir=None)
    return settings.model_copy(update=update)


def _serve(
    settings: Settings, host: str, port: int, *, reuse_port: bool, debug: bool,
    sidecars: Sequence[Sidecar] = (),
) -> None:
    """One serving process; `sidecars` (one worker only) are started once it is up (the schema
    checked) and stopped as its shutdown begins, before the database they use is let go."""
    from aiohttp import web

    from ledger.web import create_app

    if reuse_port:  # a spawned worker: set up logging like the parent did
        configure_logging(settings, debug=debug, command="serve")
    app = create_app(settings)
    loop, which = _event_loop()

    async def say_which(_: web.Application) -> AsyncIterator[None]:
        # last of the start-up contexts: said once the service starts, never before a failure
        log.info("worker %d: %s", settings.worker, which)
        yield

    app.cleanup_ctx.append(say_which)

    async def start_sidecars(_: web.Application) -> None:
        for sidecar in sidecars:
            await asyncio.to_thread(sidecar.start)

    async def stop_sidecars(_: web.Application) -> None:
        await asyncio.to_thread(_stop, list(sidecars))

    if sidecars:
        app.on_startup.append(start_sidecars)  # after the app's own start-up (cleanup_ctx)
        app.on_shutdown.append(stop_sidecars)
    try:
        web.run_app(
            app,
            shutdown_timeout=settings.shutdown_timeout_seconds,
            loop=loop,
            host=host,
            port=port,
            reuse_port=reuse_port or None,
            print=lambda line: click.echo(line, err=True),
            access_log=None,
        )
    except Exception as exc:
        if not reuse_port or debug:
            raise  # the group renders it (or shows the traceback)
        # a worker has no click group around it: one line, and the parent sees exit status 1
        click.echo(f"Error: worker {settings.worker}: {describe_failure(exc, port=port)}",
                   err=True)
        sys.exit(1)


def _event_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    """uvloop's event loop when it is installed (`pip install 'ledger[fast]'`), asyncio's
    otherwise; and a line saying which, and whether the pure modules run compiled (mypyc)."""
    build = "compiled (mypyc)" if _compiled() else "pure Python"
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), f"asyncio event loop, {build} modules"
    return uvloop.new_event_loop(), f"uvloop {version('uvloop')} event loop, {build} modules"


def _compiled() -> bool:
    from ledger import drafts

    return not str(drafts.__file__).endswith(".py")


@main.command()
@click.option("--create-database", is_flag=True,
              help="Create the database named in LEDGER_ADMIN_DATABASE_URL if it is missing "
              "(the admin role needs CREATEDB).")
@click.pass_context
@fail_cleanly
def migrate(ctx: click.Context, create_database: bool) -> None:
    """Bring the database schema (and its roles) up to date.

    On an external PostgreSQL this connects with LEDGER_ADMIN_DATABASE_URL (else
    LEDGER_DATABASE_URL); with neither set it migrates the embedded database.
    """

    async def run() -> str:
        target = await targets.open_target(settings_of(ctx), admin_only=True)
        try:
            if target.embedded is None:  # the embedded one was migrated on opening
                await targets.prepare_external(target.admin_dsn, create_database=create_database)
                await targets.migrate(target)
                return "external"
            return "embedded"
        finally:
            target.release()

    where = asyncio.run(run())
    click.echo(f"schema is up to date ({where} database, revision {migrations.head_revision()})")


@main.group()
def db() -> None:
    """Reach the database the service uses."""


@db.command("url")
@click.option("--admin", is_flag=True, help="The superuser/migration DSN instead of the service's.")
@click.pass_context
@fail_cleanly
def db_url(ctx: click.Context, admin: bool) -> None:
    """Print a DSN, so that `psql "$(ledger db url)"` works.

    Without --admin it is the service's own restricted role. The embedded server is left
    running for the DSN to be usable; `ledger db stop` stops it.
    """

    async def run() -> str:
        target = await targets.open_target(settings_of(ctx), keep_running=True)
        return target.admin_dsn if admin else target.service_dsn

    click.echo(asyncio.run(run()))


@db.command("stop")
@click.pass_context
@fail_cleanly
def db_stop(ctx: click.Context) -> None:
    """Stop the embedded PostgreSQL (no effect on an external database)."""
    settings = settings_of(ctx)
    if not settings.embedded:
        raise click.ClickException(
            "LEDGER_DATABASE_URL / LEDGER_ADMIN_DATABASE_URL is set: the database is not ours "
            "to stop"
        )

    async def run() -> None:
        target = await targets.open_target(settings)
        target.release()

    asyncio.run(run())
