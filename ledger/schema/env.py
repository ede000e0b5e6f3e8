"""Alembic environment: raw SQL revisions, run over asyncpg with the DSN from ledger's settings."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from ledger.settings import Settings


def _dsn() -> str:
    given = context.config.attributes.get("dsn")
    if isinstance(given, str):
        return given
    settings = Settings()
    url = settings.admin_database_url or settings.database_url
    if url is None:
        raise SystemExit("set LEDGER_ADMIN_DATABASE_URL, or use `ledger migrate`")
    return url.get_secret_value()


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run() -> None:
    dsn = _dsn()
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(dsn)
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline SQL generation is not supported; the revisions are SQL already")
asyncio.run(_run())
