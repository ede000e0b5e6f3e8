"""Real PostgreSQL for every test: one throwaway server per session, one database per test.

The server is the project's own embedded PostgreSQL (the same mechanism `ledger serve` uses), or
the server behind LEDGER_TEST_DATABASE_URL (an admin DSN) when that is set. A template database
is migrated once; each test gets a fresh `CREATE DATABASE … TEMPLATE` clone.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import shutil
import tempfile
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from ledger import embedded, migrations
from ledger.settings import Settings
from ledger.storage.target import SERVICE_ROLE, ensure_database, with_login
from ledger.web import create_app

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = FIXTURES / "bitrix24"
MEMBER_ID = "bac1cd5c8940947a75e0d71b1a84e348"
DOMAIN = "some-domain.bitrix24.com"
TOKEN = "831c76b092f9f135d9b6b36c3a720757"
FORM = "application/x-www-form-urlencoded"

_counter = itertools.count()


def compiled_modules() -> list[str]:
    """The modules the optional compiled build compiles (pyproject.toml `[tool.ledger.mypyc]`)."""
    with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as file:
        return list(tomllib.load(file)["tool"]["ledger"]["mypyc"]["modules"])


def compiled_now() -> list[str]:
    """Those of them this interpreter imported as extension modules (mypyc's output)."""
    return [name for name in compiled_modules()
            if str(importlib.import_module(name).__file__).endswith(".so")]


def pytest_configure(config: pytest.Config) -> None:
    """Which build is under test is never a guess. By default (`./run test`) it is pure Python,
    and stray compiled modules in the checkout stop the run; with LEDGER_EXPECT_COMPILED=1 (CI's
    second run) every listed module must be compiled, so that run can never silently be pure."""
    compiled, listed = compiled_now(), compiled_modules()
    if os.environ.get("LEDGER_EXPECT_COMPILED", "0") == "1":
        missing = sorted(set(listed) - set(compiled))
        if missing:
            raise pytest.UsageError(
                f"LEDGER_EXPECT_COMPILED=1, but these run as Python: {', '.join(missing)}; "
                "build them first: LEDGER_MYPYC=1 .venv/bin/python setup.py build_ext --inplace"
            )
    elif compiled:
        raise pytest.UsageError(
            f"compiled modules in the checkout ({', '.join(compiled)}) would be tested instead "
            "of the Python: remove them (find ledger -name '*.so' -delete), or set "
            "LEDGER_EXPECT_COMPILED=1"
        )


def pytest_report_header(config: pytest.Config) -> str:
    compiled = compiled_now()
    return (f"ledger build: compiled (mypyc), {len(compiled)} modules" if compiled
            else "ledger build: pure Python")


@dataclass(frozen=True)
class Cluster:
    """A PostgreSQL server the tests may create databases on."""

    admin_dsn: str  # to the maintenance database

    def dsn(self, database: str, user: str | None = None) -> str:
        return with_login(self.admin_dsn, database=database, user=user)


@dataclass(frozen=True)
class Database:
    name: str
    admin_dsn: str
    service_dsn: str


@pytest.fixture(autouse=True)
def _no_ledger_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings in tests are explicit: nothing leaks in from the developer's shell, and
    relative paths (./.ledger, the spool) land in the test's own directory."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LEDGER_") and name != "LEDGER_TEST_DATABASE_URL":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    external = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if external:
        yield Cluster(admin_dsn=external)
        return
    data_dir = tmp_path_factory.mktemp("pg")
    handle = embedded.start(data_dir)
    try:
        yield Cluster(admin_dsn=handle.dsn("postgres"))
    finally:
        handle.server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def template(cluster: Cluster) -> str:
    name = f"ledger_template_{os.getpid()}"
    connection = await asyncpg.connect(cluster.admin_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    await asyncio.to_thread(migrations.upgrade, cluster.dsn(name))
    return name


async def _create_database(cluster: Cluster, template: str | None) -> Database:
    name = f"ledger_test_{os.getpid()}_{next(_counter)}"
    await ensure_database(cluster.admin_dsn, name, template=template)
    return Database(
        name=name,
        admin_dsn=cluster.dsn(name),
        service_dsn=cluster.dsn(name, user=SERVICE_ROLE),
    )


async def _drop_database(cluster: Cluster, name: str) -> None:
    connection = await asyncpg.connect(cluster.admin_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture
async def database(cluster: Cluster, template: str) -> AsyncIterator[Database]:
    """A migrated database of this test's own."""
    db = await _create_database(cluster, template)
    yield db
    await _drop_database(cluster, db.name)


@pytest.fixture
async def empty_database(cluster: Cluster, template: str) -> AsyncIterator[Database]:
    """A database nobody migrated (roles exist: the template run created them)."""
    db = await _create_database(cluster, None)
    yield db
    await _drop_database(cluster, db.name)


@pytest.fixture
def settings_factory(database: Database) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database.service_dsn,
            "admin_database_url": database.admin_dsn,
            "batch_max_delay_ms": 1.0,
            "run_projector": False,  # tests drain it explicitly with catch_up()
            "run_tree_follower": False,  # likewise: TreeFollower.catch_up()
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


ClientFactory: TypeAlias = "Callable[[Settings], Awaitable[TestClient[Any, Any]]]"


@pytest.fixture
def make_client(database: Database, aiohttp_client: Any) -> ClientFactory:
    """Serve `create_app(settings)` to a test client (closed before the database is dropped)."""

    async def make(settings: Settings) -> TestClient[Any, Any]:
        from tests.helpers import with_projector

        client: TestClient[Any, Any] = await aiohttp_client(with_projector(create_app(settings)))
        return client

    return make


@pytest.fixture
async def client(make_client: ClientFactory, settings: Settings) -> TestClient[Any, Any]:
    return await make_client(settings)


@pytest.fixture
async def admin(database: Database) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A superuser connection to the test's database, for looking behind the service's back."""
    connection = await asyncpg.connect(database.admin_dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def service_connection(database: Database) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A connection as the service's own restricted role."""
    connection = await asyncpg.connect(database.service_dsn)
    yield connection
    await connection.close()


def sample(name: str) -> bytes:
    return (SAMPLES / f"{name}.form").read_bytes()


def sample_names() -> list[str]:
    return sorted(p.stem for p in SAMPLES.glob("*.form"))


@pytest.fixture
async def proxy(database: Database) -> Any:
    """A relay in front of the test's PostgreSQL, and the service DSN that goes through it."""
    from tests.helpers import SocketProxy

    query = parse_qs(urlsplit(database.service_dsn).query)
    socket_dir, port = query["host"][0], int(query.get("port", ["5432"])[0])
    directory = tempfile.mkdtemp(prefix="pgproxy-")
    relay = SocketProxy(f"{socket_dir}/.s.PGSQL.{port}", directory, port)
    await relay.start()
    yield relay, database.service_dsn.replace(socket_dir, directory)
    if relay._server is not None:
        await relay.cut()


@pytest.fixture
def outage(proxy: Any, settings_factory: Any, tmp_path: Path) -> Any:
    """The relay, and settings for an app that reaches PostgreSQL only through it."""
    relay, dsn = proxy

    def settings(**extra: Any) -> Settings:
        made: Settings = settings_factory(database_url=dsn, spool_retry_seconds=0.1,
                                          spool_dir=tmp_path / "spool", **extra)
        return made

    return relay, settings
