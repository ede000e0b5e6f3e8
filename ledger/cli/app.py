"""The `ledger` command group; its subcommands live beside it (service, trust, integrity,
forensics, tools) and share `ledger.cli.common`. The group owns what every command has in common
at the edges: settings, logging, and failures rendered as one line."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from ledger import display
from ledger.cli.common import one_line
from ledger.settings import Settings
from ledger.storage import target as targets
from ledger.storage.store import OutageLogLine


def describe_failure(exc: BaseException, *, port: int | None = None) -> str:
    """One line for an operator: what failed and what to do about it."""
    explained = targets.explain(exc)
    if explained is not None:
        return one_line(str(explained))
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        where = f"port {port}" if port is not None else "the address"
        return (f"{where} is already in use: stop what listens there, or choose another with "
                "--port / LEDGER_PORT")
    if isinstance(exc, PermissionError):
        return (f"permission denied: {exc.filename or exc}: run as a user who may write "
                "there, or point LEDGER_DATA_DIR elsewhere")
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename or exc.__class__.__name__})"
    name = exc.__class__.__name__
    return one_line(f"unexpected {name}: {exc} (run with --debug for the traceback)")


class _LedgerGroup(click.Group):
    """Renders any failure of any subcommand as one line on stderr and exit status 1;
    `--debug` (or LEDGER_LOG_LEVEL=DEBUG) shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit,
                click.exceptions.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _debugging(ctx):
                raise
            raise click.ClickException(describe_failure(exc, port=ctx.meta.get(PORT_KEY))) \
                from exc


PORT_KEY = "ledger.port"  # set by `serve`, so that "address in use" can name the port
_THIRD_PARTY = ("pgserver", "alembic", "sqlalchemy", "aiohttp.access", "asyncio")


def _debugging(ctx: click.Context) -> bool:
    settings = ctx.find_object(Settings)
    return bool(ctx.meta.get("ledger.debug")) or (
        settings is not None and settings.log_level.upper() == "DEBUG"
    )


def configure_logging(settings: Settings, *, debug: bool, command: str | None) -> None:
    """The service logs at LEDGER_LOG_LEVEL; one-shot commands only warnings and errors (they
    answer on stdout). Third-party chatter (pgserver's initdb/pg_ctl output, alembic's
    revision lines) goes to the embedded server's log file, or to stderr with --debug."""
    level = logging.DEBUG if debug else logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise click.ClickException(
            f"LEDGER_LOG_LEVEL={settings.log_level!r}: use DEBUG, INFO, WARNING or ERROR"
        )
    if command not in ("serve", "forward") and level > logging.DEBUG:
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, handlers=[_stderr_handler(logging.NOTSET)], force=True)
    for name in _THIRD_PARTY:  # as a fresh process has them (commands may run in one process)
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            handler.close()
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    pool_log = logging.getLogger("asyncpg.pool")
    for old in [f for f in pool_log.filters if isinstance(f, OutageLogLine)]:
        pool_log.removeFilter(old)
    if level <= logging.DEBUG:
        return  # tracebacks too
    pool_log.addFilter(OutageLogLine())
    chatter = _ChatterLog(settings.data_dir.expanduser() / "embedded.log") \
        if settings.embedded else None
    for name in _THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.propagate = False
        if chatter is not None and name == "pgserver":
            logger.addHandler(chatter)
            logger.setLevel(logging.INFO)
        else:
            logger.addHandler(_stderr_handler(logging.WARNING))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LineFormatter(logging.Formatter):
    """One record, one line: a message's control characters (a refused delivery's claimed
    portal may hold line breaks and escape sequences) are written as visible escapes, so
    nobody can forge a log line or drive the terminal of whoever reads the log. A
    traceback, appended after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return display.terminal(super().formatMessage(record))


class _ChatterLog(logging.FileHandler):
    """The embedded server's chatter file: opened when first written, and never a reason for
    anything to fail (a server stopped after its data dir is gone still stops)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True, encoding="utf-8")
        self.setFormatter(LineFormatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            super().emit(record)
        except OSError:
            pass  # chatter is not worth an error


def _stderr_handler(level: int) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(LineFormatter(LOG_FORMAT))
    return handler


@click.group(cls=_LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ledger")
@click.option("--debug", is_flag=True, help="Log everything, and show tracebacks of failures.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Audit ledger for Bitrix24 chatbot events.

    Configuration comes from LEDGER_* environment variables (see docs/operations.md). With
    neither LEDGER_DATABASE_URL nor LEDGER_ADMIN_DATABASE_URL set, an embedded PostgreSQL is
    started in LEDGER_DATA_DIR (./.ledger).
    """
    ctx.meta["ledger.debug"] = debug
    try:
        ctx.obj = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"LEDGER_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise click.ClickException(f"invalid setting: {problems}") from exc
    configure_logging(ctx.obj, debug=debug, command=ctx.invoked_subcommand)
