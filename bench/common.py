"""Shared plumbing for the benchmarks: a PostgreSQL to measure on, databases, machine facts."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from ledger import embedded, migrations
from ledger.embedded import EmbeddedHandle
from ledger.storage.target import with_login

OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "RESULTS.md"


class Cluster:
    """LEDGER_BENCH_DATABASE_URL (an admin DSN), or a fresh embedded server under bench/out."""

    def __init__(self) -> None:
        self._handle: EmbeddedHandle | None = None
        external = os.environ.get("LEDGER_BENCH_DATABASE_URL")
        if external:
            self.admin_dsn = external
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            self._handle = embedded.start(OUT / "pg")
            self.admin_dsn = self._handle.dsn("postgres")

    def dsn(self, database: str, user: str | None = None) -> str:
        return with_login(self.admin_dsn, database=database, user=user)

    async def fresh_database(self, name: str, *, migrate: bool) -> str:
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        if migrate:
            await asyncio.to_thread(migrations.upgrade, self.dsn(name))
        return name

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.server.stop()

    async def server_settings(self, wanted: dict[str, str] | None) -> None:
        """Run the embedded cluster with another tree's write-back settings (its
        `ledger.embedded.SETTINGS`): `wanted` over PostgreSQL's own defaults, for every name this
        tree or `wanted` sets; None = this tree's own (its ledger.conf). Applied with ALTER SYSTEM
        and a reload, waited for until a new session sees them. An external cluster is left as
        it is."""
        if self._handle is None:
            return
        names = sorted(set(embedded.SETTINGS) | set(wanted or {}))
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            for name in names:
                if wanted is None:
                    await connection.execute(f"ALTER SYSTEM RESET {name}")
                    continue
                value = wanted.get(name) or await connection.fetchval(  # else PostgreSQL's
                    "SELECT boot_val FROM pg_settings WHERE name = $1", name)
                await connection.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            loaded = await connection.fetchval("SELECT pg_conf_load_time()")
            await connection.execute("SELECT pg_reload_conf()")
        finally:
            await connection.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a reload is asynchronous: until a new session has it
            probe = await asyncpg.connect(self.admin_dsn)
            try:
                if await probe.fetchval("SELECT pg_conf_load_time() > $1", loaded):
                    return
            finally:
                await probe.close()
            await asyncio.sleep(0.05)


def wait_healthy(url: str, seconds: float = 30,
                 process: subprocess.Popen[bytes] | None = None) -> None:
    """Until `url` answers 200; fails at the deadline, or at once if `process` exits."""
    deadline = time.monotonic() + seconds
    while True:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server for {url} exited with {process.returncode}; "
                             "see its log in bench/out/")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - localhost
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        time.sleep(0.1)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    pg = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False)
    return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores ({cpu}), "
            f"{memory:.0f} GiB, Python {platform.python_version()}, "
            f"{pg.stdout.strip() or 'psql n/a'} client")


def record(title: str, lines: list[str]) -> None:
    """Append one run's results to bench/RESULTS.md (and print them)."""
    text = "\n".join([f"## {title}", "", f"Machine: {machine()}", "", *lines, "", ""])
    print(text)
    with RESULTS.open("a") as handle:
        handle.write(text)
