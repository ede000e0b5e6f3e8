"""What an operator reads in the log while PostgreSQL is away: lines that say so, no tracebacks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from ledger.cli.app import configure_logging
from ledger.settings import Settings
from ledger.storage.store import close_pool, create_pool

FLOOR = "Failed to restore the pool connection floor"


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """configure_logging binds handlers to the captured stderr: put back what was there, or
    loggers that outlive the test (pgserver's at exit) write to a closed file."""
    names = ["", "pgserver", "alembic", "sqlalchemy", "aiohttp.access", "asyncio", "asyncpg.pool"]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, filters, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.filters[:] = handlers, filters
        lg.setLevel(level)
        lg.propagate = propagate


async def test_the_pools_reconnect_attempts_during_an_outage_are_one_line_each(
    proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """asyncpg's pool retries its connection floor while PostgreSQL is cut off and logs each
    failed attempt with a traceback: a screenful every second or two that reads like a crash."""
    relay, dsn = proxy
    configure_logging(Settings(database_url=dsn), debug=False, command="serve")
    pool = await create_pool(dsn, size=2)
    try:
        assert await pool.fetchval("SELECT 1") == 1
        await relay.cut()  # the pool's connection dies; new ones are refused
        seen = ""
        async with asyncio.timeout(20):
            while FLOOR not in seen:
                await asyncio.sleep(0.05)  # poll the captured stderr; the deadline bounds it
                seen += capsys.readouterr().err
        floor = [line for line in seen.splitlines() if FLOOR in line]
        assert floor, seen
        assert all("PostgreSQL unavailable" in line for line in floor), seen
        assert "Traceback" not in seen, seen
    finally:
        await close_pool(pool, seconds=1)


def test_any_other_failure_the_pool_logs_keeps_its_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(Settings(database_url="postgresql://x@/y"), debug=False, command="serve")
    try:
        raise ValueError("a bug, not an outage")
    except ValueError:
        logging.getLogger("asyncpg.pool").warning("%s; retrying", FLOOR, exc_info=True)
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "ValueError: a bug, not an outage" in err


def test_with_debug_the_outage_keeps_its_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings(database_url="postgresql://x@/y"), debug=False, command="serve")
    configure_logging(Settings(database_url="postgresql://x@/y"), debug=True, command="serve")
    try:
        raise ConnectionRefusedError("refused")
    except OSError:
        logging.getLogger("asyncpg.pool").warning("%s; retrying", FLOOR, exc_info=True)
    assert "Traceback" in capsys.readouterr().err
