"""The embedded PostgreSQL's write-back settings (ledger/embedded.py SETTINGS): the server runs
with them, an operator sees them in one file, and what the operator sets wins."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from ledger import embedded
from ledger.embedded import EmbeddedHandle


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedHandle]:
    handle = embedded.start(tmp_path / "data")
    try:
        yield handle
    finally:
        handle.server.stop()


async def _settled(dsn: str, name: str, value: str) -> str:
    """SHOW `name` in a new session until it is `value` (a reload is asynchronous) or 30 s."""
    shown = ""
    async with asyncio.timeout(30):
        while shown != value:
            connection = await asyncpg.connect(dsn)
            try:
                shown = await connection.fetchval(f"SHOW {name}")
            finally:
                await connection.close()
            if shown != value:
                await asyncio.sleep(0.05)
    return shown


async def test_the_embedded_server_runs_with_its_write_back_settings_and_durability_as_is(
    server: EmbeddedHandle, tmp_path: Path,
) -> None:
    """Before: PostgreSQL's Linux defaults (backend_flush_after 0), and a burst's evicted buffers
    sat dirty in the page cache until the kernel wrote them back in one lump."""
    dsn = server.dsn("postgres")
    for name, value in embedded.SETTINGS.items():
        assert await _settled(dsn, name, value) == value
    connection = await asyncpg.connect(dsn)
    try:
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            assert await connection.fetchval(f"SHOW {name}") == "on"
        files = {row["name"]: row["sourcefile"] for row in await connection.fetch(
            "SELECT name, sourcefile FROM pg_settings WHERE name = ANY($1::text[])",
            list(embedded.SETTINGS))}
    finally:
        await connection.close()
    pgdata = tmp_path / "data" / "pgdata"
    # the operator sees where they come from: one file, included on postgresql.conf's first line
    assert set(files.values()) == {str(pgdata / embedded.CONF_NAME)}
    conf = (pgdata / "postgresql.conf").read_text().splitlines()
    assert conf[0].startswith(f"include_if_exists = '{embedded.CONF_NAME}'")
    assert embedded.configure(pgdata) is False  # a second start changes nothing
    assert len([line for line in (pgdata / "postgresql.conf").read_text().splitlines()
                if embedded.CONF_NAME in line]) == 1


async def test_an_operators_setting_wins_over_the_embedded_default(
    server: EmbeddedHandle, tmp_path: Path,
) -> None:
    """postgresql.conf below the include, and ALTER SYSTEM, override ledger.conf; a later start
    rewrites only ledger.conf."""
    dsn = server.dsn("postgres")
    name = "backend_flush_after"
    assert await _settled(dsn, name, embedded.SETTINGS[name]) == embedded.SETTINGS[name]
    pgdata = tmp_path / "data" / "pgdata"
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write(f"{name} = '64kB'\n")
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("SELECT pg_reload_conf()")
        assert await _settled(dsn, name, "64kB") == "64kB"
        (pgdata / embedded.CONF_NAME).write_text("# edited\n")  # lost at the next start
        assert embedded.configure(pgdata) is True
        await connection.execute("SELECT pg_reload_conf()")
        assert await _settled(dsn, name, "64kB") == "64kB"
        await connection.execute(f"ALTER SYSTEM SET {name} = '128kB'")
        await connection.execute("SELECT pg_reload_conf()")
        assert await _settled(dsn, name, "128kB") == "128kB"
    finally:
        await connection.close()
