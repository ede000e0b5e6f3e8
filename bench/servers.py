"""Baselines for the intake benchmark: an aiohttp hello-world and a naive one-INSERT intake.

    python -m bench.servers hello --port 9001
    python -m bench.servers naive --port 9002 --dsn postgresql://…
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import asyncpg
import orjson
from aiohttp import web

from ledger import wire

POOL = web.AppKey("pool", asyncpg.Pool)
OK = b'{"status":"ok"}'


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=OK)


async def hello(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=OK, content_type="application/json")


async def naive(request: web.Request) -> web.Response:
    """What a first version looks like: decode, INSERT, autocommit — nothing else."""
    document = wire.parse_php_form(await request.read(), max_fields=10_000, max_nesting=32)
    async with request.app[POOL].acquire() as connection:
        await connection.execute(
            "INSERT INTO naive_events (body) VALUES ($1::jsonb)", orjson.dumps(document).decode()
        )
    return web.Response(body=OK, content_type="application/json")


def make_app(kind: str, dsn: str | None) -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    if kind == "hello":
        app.router.add_post("/bitrix24/events", hello)
        return app

    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        assert dsn is not None
        pool = await asyncpg.create_pool(
            dsn, min_size=8, max_size=16, server_settings={"synchronous_commit": "on"}
        )
        async with pool.acquire() as connection:
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS naive_events (id bigserial PRIMARY KEY, body jsonb)"
            )
        app[POOL] = pool
        yield
        await pool.close()

    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/bitrix24/events", naive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["hello", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    web.run_app(make_app(args.kind, args.dsn), host="127.0.0.1", port=args.port,
                access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    main()
