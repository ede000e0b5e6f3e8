"""Running the service and reaching its database: serve, migrate, db."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal

import click

from ledger.cli.app import main
from ledger.cli.common import (
    fail_cleanly,
    settings_of,
)
from ledger.settings import Settings
from ledger.storage import target as targets


@main.command()
@click.option("--host", default=None, help="Listen address (default: LEDGER_HOST, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Listen port (default: LEDGER_PORT, 8080).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes sharing the port (SO_REUSEPORT); the first one also projects "
              "and writes checkpoints.")
@click.pass_context
@fail_cleanly
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int) -> None:
    """Receive Bitrix24 events at POST /bitrix24/events and store them.

    On the embedded database the schema is migrated first; on an external one the service
    refuses to start until `ledger migrate` has run.
    """
    settings = settings_of(ctx)
    address = (host or settings.host, port if port is not None else settings.port)
    # the listen address is a setting too: gateway mode refuses routes that point back at it
    settings = settings.model_copy(update={"host": address[0], "port": address[1]})
    if workers == 1:
        _serve(settings, *address, reuse_port=False)
        return
    # Start (and migrate) the database once, here, before the workers attach to it.
    target = asyncio.run(targets.open_target(settings))
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_serve, args=(_worker_settings(settings, i), *address),
                        kwargs={"reuse_port": True}, name=f"ledger-worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    def forward(signum: int, _: object) -> None:
        for process in processes:
            if process.pid is not None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    target.release()
    failed = [p.name for p in processes if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        raise click.ClickException(f"worker(s) {', '.join(failed)} failed; see the log above")


def _worker_settings(settings: Settings, index: int) -> Settings:
    if index == 0:
        return settings
    return settings.model_copy(
        update={"run_projector": False, "checkpoint_dir": None, "worker": index}
    )


def _serve(settings: Settings, host: str, port: int, *, reuse_port: bool) -> None:
    from aiohttp import web

    from ledger.web import create_app

    if reuse_port:  # a spawned worker: set up logging like the parent did
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        reuse_port=reuse_port or None,
        print=lambda line: click.echo(line, err=True),
        access_log=None,
    )


@main.command()
@click.pass_context
@fail_cleanly
def migrate(ctx: click.Context) -> None:
    """Bring the database schema (and its roles) up to date."""

    async def run() -> None:
        target = await targets.open_target(settings_of(ctx))
        try:
            if target.embedded is None:  # the embedded one was migrated on opening
                await targets.migrate(target)
        finally:
            target.release()

    asyncio.run(run())
    click.echo("schema is up to date", err=True)


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
        raise click.ClickException("LEDGER_DATABASE_URL is set: the database is not ours to stop")

    async def run() -> None:
        target = await targets.open_target(settings)
        target.release()

    asyncio.run(run())
