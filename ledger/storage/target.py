"""Which PostgreSQL the ledger uses, with which roles, and making it ready.

With `LEDGER_DATABASE_URL` set, that DSN is the service's (restricted) connection and
`LEDGER_ADMIN_DATABASE_URL` (or the same DSN) migrates. Unset, we start our own server and
connect as the two roles the first migration creates.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ledger import embedded, migrations
from ledger.embedded import EmbeddedHandle
from ledger.errors import ConfigurationError, DatabaseUnavailable, SchemaNotMigrated
from ledger.settings import Settings
from ledger.storage.store import Pool, schema_revision

log = logging.getLogger(__name__)

DATABASE = "ledger"
SERVICE_ROLE = "ledger_app"
PROJECTOR_ROLE = "ledger_projector"


@dataclass(frozen=True)
class DatabaseTarget:
    service_dsn: str
    admin_dsn: str
    embedded: EmbeddedHandle | None
    projector_dsn: str = ""  # the only role that may write projections

    def release(self) -> None:
        """Let go of the embedded server (stopped when this was its last user)."""
        if self.embedded is not None:
            self.embedded.server.stop()


async def open_target(settings: Settings, *, keep_running: bool = False) -> DatabaseTarget:
    """Resolve DSNs. The embedded server is ours: start it, create and migrate its database."""
    if settings.database_url is not None:
        service = settings.database_url.get_secret_value()
        admin = settings.admin_database_url.get_secret_value() if settings.admin_database_url \
            else service
        projector = (settings.projector_database_url.get_secret_value()
                     if settings.projector_database_url
                     else with_login(service, user=PROJECTOR_ROLE))
        return DatabaseTarget(service_dsn=service, admin_dsn=admin, embedded=None,
                              projector_dsn=projector)
    handle = await asyncio.to_thread(
        embedded.start, settings.data_dir, keep_running=keep_running
    )
    target = DatabaseTarget(
        service_dsn=handle.dsn(DATABASE, SERVICE_ROLE),
        admin_dsn=handle.dsn(DATABASE),
        embedded=handle,
        projector_dsn=handle.dsn(DATABASE, PROJECTOR_ROLE),
    )
    try:
        await ensure_database(handle.dsn("postgres"), DATABASE)
        await migrate(target)
    except BaseException:
        target.release()
        raise
    return target


async def ensure_database(maintenance_dsn: str, name: str, *, template: str | None = None) -> None:
    """CREATE DATABASE unless it exists (names are ours, never user input)."""
    try:
        connection = await asyncpg.connect(maintenance_dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            clause = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
            await connection.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await connection.close()


async def migrate(target: DatabaseTarget) -> None:
    await asyncio.to_thread(migrations.upgrade, target.admin_dsn)


async def require_current_schema(pool: Pool) -> None:
    """Refuse to serve on a schema the code does not match."""
    current, expected = await schema_revision(pool), migrations.head_revision()
    if current != expected:
        raise SchemaNotMigrated(current, expected)


async def create_reader(target: DatabaseTarget, name: str, password: str) -> str:
    """A login role in `ledger_reader` (the audit views only); returns its DSN."""
    if not name.isidentifier() or not name.islower():
        raise ConfigurationError(f"{name!r}: use a lower-case identifier for the role name")
    connection = await asyncpg.connect(target.admin_dsn)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
        verb = "ALTER" if exists else "CREATE"
        quoted = password.replace("'", "''")
        await connection.execute(f"{verb} ROLE {name} LOGIN PASSWORD '{quoted}'")
        await connection.execute(f"GRANT ledger_reader TO {name}")
        database = await connection.fetchval("SELECT current_database()")
        await connection.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
    finally:
        await connection.close()
    return with_login(target.admin_dsn, user=name, password=password)


def with_login(
    dsn: str, *, database: str | None = None, user: str | None = None,
    password: str | None = None,
) -> str:
    """The same server, another database and/or login (host, port, options kept)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if user is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:{password}@{host}" if password else f"{user}@{host}"
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))
