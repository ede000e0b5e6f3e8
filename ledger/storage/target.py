"""Which PostgreSQL the ledger uses, with which roles, and making it ready.

With `LEDGER_DATABASE_URL` set, that DSN is the service's (restricted) connection and
`LEDGER_ADMIN_DATABASE_URL` (or the same DSN) migrates. With neither set, we start our own server
and connect as the two roles the first migration creates. With only the admin DSN set, `ledger
migrate` migrates that database and everything else asks for the service's DSN: an external
database is never silently swapped for an embedded one.

Driver failures that reach an operator are explained here (`explain`), because only this
package may know asyncpg's exception classes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from ledger import embedded, migrations
from ledger.embedded import EmbeddedHandle
from ledger.errors import (
    ConfigurationError,
    DatabaseMissing,
    DatabaseUnavailable,
    LedgerError,
    PermissionDenied,
    SchemaNotMigrated,
)
from ledger.settings import Settings
from ledger.storage.store import Pool, create_pool, schema_revision

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


async def open_target(
    settings: Settings, *, keep_running: bool = False, admin_only: bool = False
) -> DatabaseTarget:
    """Resolve DSNs. The embedded server is ours: start it, create and migrate its database.

    `admin_only` (migrations, role management) accepts LEDGER_ADMIN_DATABASE_URL alone.
    """
    admin_url = settings.admin_database_url
    if settings.database_url is not None:
        service = settings.database_url.get_secret_value()
        admin = admin_url.get_secret_value() if admin_url else service
        projector = (settings.projector_database_url.get_secret_value()
                     if settings.projector_database_url
                     else with_login(service, user=PROJECTOR_ROLE))
        return DatabaseTarget(service_dsn=service, admin_dsn=admin, embedded=None,
                              projector_dsn=projector)
    if admin_url is not None:
        if not admin_only:
            raise ConfigurationError(
                "LEDGER_ADMIN_DATABASE_URL is set but LEDGER_DATABASE_URL is not: set it to the "
                "service role's DSN, e.g. postgresql://ledger_app:PASSWORD@HOST/DATABASE (the "
                "embedded database is used only when neither is set)"
            )
        admin = admin_url.get_secret_value()
        return DatabaseTarget(service_dsn=admin, admin_dsn=admin, embedded=None)
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


async def prepare_external(admin_dsn: str, *, create_database: bool) -> None:
    """Make sure the admin DSN's database exists before migrating it: create it when asked
    (and allowed), otherwise say exactly what to run."""
    name = urlsplit(admin_dsn).path.lstrip("/") or _query_value(admin_dsn, "dbname")
    try:
        connection = await asyncpg.connect(admin_dsn)
    except asyncpg.InvalidCatalogNameError as exc:
        if not name:
            raise
        if not create_database:
            raise DatabaseMissing(
                f"database {name!r} does not exist: run `ledger migrate --create-database` "
                f"(needs CREATEDB), or have a superuser run CREATE DATABASE \"{name}\";"
            ) from exc
        try:
            await ensure_database(with_login(admin_dsn, database="postgres"), name)
        except asyncpg.InsufficientPrivilegeError as denied:
            raise DatabaseMissing(
                f"database {name!r} does not exist and this role may not create it ({denied}): "
                f"have a superuser run CREATE DATABASE \"{name}\" OWNER <this role>;"
            ) from denied
        log.info("created database %s", name)
        return
    await connection.close()


def _query_value(dsn: str, key: str) -> str:
    return (parse_qs(urlsplit(dsn).query).get(key) or [""])[0]


def explain(exc: BaseException) -> LedgerError | None:
    """The operator-facing meaning of a driver or socket failure anywhere in `exc`'s chain
    (alembic and SQLAlchemy wrap asyncpg's exceptions), or None when it is none of ours."""
    for cause in _chain(exc):
        if isinstance(cause, LedgerError):
            return cause
        if isinstance(cause, asyncpg.InsufficientPrivilegeError):
            return PermissionDenied(
                f"PostgreSQL refused: {cause}. This needs the admin role: set "
                "LEDGER_ADMIN_DATABASE_URL to a DSN of the database owner or a superuser"
            )
        if isinstance(cause, asyncpg.InvalidCatalogNameError):
            return DatabaseMissing(
                f"{cause}: create it with `ledger migrate --create-database`, or have a "
                "superuser run CREATE DATABASE"
            )
        if isinstance(cause, asyncpg.InvalidAuthorizationSpecificationError
                      |                       asyncpg.InvalidPasswordError):
            return DatabaseUnavailable(
                f"PostgreSQL refused the login: {cause}; check the user and password in "
                "LEDGER_DATABASE_URL / LEDGER_ADMIN_DATABASE_URL"
            )
        if isinstance(cause, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
            return SchemaNotMigrated(None, migrations.head_revision())
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return None  # a listening socket, not the database: the CLI words it
        if isinstance(cause, ConnectionError | socket.gaierror | TimeoutError) or (
            isinstance(cause, OSError) and cause.errno in _UNREACHABLE
        ) or (isinstance(cause, FileNotFoundError) and ".s.PGSQL." in str(cause)):
            return DatabaseUnavailable(
                f"cannot reach PostgreSQL ({cause}): check that it runs and that "
                "LEDGER_DATABASE_URL / LEDGER_ADMIN_DATABASE_URL name its host and port"
            )
        if isinstance(cause, asyncpg.PostgresError):
            return DatabaseUnavailable(f"PostgreSQL: {cause.__class__.__name__}: {cause}")
    return None


_UNREACHABLE = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is s for s in seen) or len(seen) > 20:
            continue
        seen.append(current)
        orig = getattr(current, "orig", None)
        pending += [orig if isinstance(orig, BaseException) else None,
                    current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):
            pending += list(current.exceptions)
    return seen


async def check_schema_if_reachable(target: DatabaseTarget, *, connect_timeout: float) -> None:
    """Before starting workers: an unmigrated schema is refused now, in one place; an
    unreachable database is not an error (the service starts and spools)."""
    try:
        pool = await create_pool(target.service_dsn, size=1, connect_timeout=connect_timeout)
    except DatabaseUnavailable:
        return
    try:
        await require_current_schema(pool)
    except DatabaseUnavailable:
        return
    finally:
        await pool.close()


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
