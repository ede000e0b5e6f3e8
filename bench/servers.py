"""The peers the intake benchmark compares the ledger with: what a user would write instead.

    python -m bench.servers hello --port 9001                  # answers after reading the bytes
    BENCH_TOKENS='{"member": "token"}' python -m bench.servers form --port 9002
    BENCH_TOKENS=… python -m bench.servers naive --port 9003 --dsn postgresql://…

- `hello`: reads the body and answers; no parsing (the ceiling of aiohttp itself; also the
  gateway benchmark's destination).
- `form`: the form-reading hello — aiohttp's own form parser (`request.post()`) and a check of
  `auth[application_token]` against the portal's known token (401 otherwise). No database.
- `naive`: the same read and check, plus one `INSERT` of the form as JSON per request, in
  autocommit on a pool, with `synchronous_commit = on` as the ledger's own connections have it:
  durable when it answers 200, nothing else (no redaction, dedup, chain or batching).

Tokens (simulated portals' application tokens) come in the environment variable BENCH_TOKENS, a
JSON object member_id → token.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
from collections.abc import AsyncIterator

import asyncpg
import orjson
from aiohttp import web

POOL = web.AppKey("pool", asyncpg.Pool)
TOKENS = web.AppKey("tokens", dict)
OK = b'{"status":"ok"}'
UNAUTHORIZED = b'{"status":"refused","code":"bad_token"}'


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=OK)


async def hello(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=OK, content_type="application/json")


async def _checked_form(request: web.Request) -> dict[str, str] | None:
    """The form as a flat dict if its application token is the portal's, else None."""
    form = await request.post()
    known = request.app[TOKENS].get(form.get("auth[member_id]"))
    token = form.get("auth[application_token]")
    if not isinstance(known, str) or not isinstance(token, str) \
            or not hmac.compare_digest(known, token):
        return None
    return {key: value for key, value in form.items() if isinstance(value, str)}


async def form(request: web.Request) -> web.Response:
    if await _checked_form(request) is None:
        return web.Response(status=401, body=UNAUTHORIZED, content_type="application/json")
    return web.Response(body=OK, content_type="application/json")


async def naive(request: web.Request) -> web.Response:
    """What a first version looks like: read the form, check the token, INSERT, autocommit."""
    document = await _checked_form(request)
    if document is None:
        return web.Response(status=401, body=UNAUTHORIZED, content_type="application/json")
    async with request.app[POOL].acquire() as connection:
        await connection.execute(
            "INSERT INTO naive_events (body) VALUES ($1::jsonb)", orjson.dumps(document).decode()
        )
    return web.Response(body=OK, content_type="application/json")


def make_app(kind: str, dsn: str | None) -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app[TOKENS] = json.loads(os.environ.get("BENCH_TOKENS", "{}"))
    if kind == "hello":
        app.router.add_post("/bitrix24/events", hello)
        return app
    if kind == "form":
        app.router.add_post("/bitrix24/events", form)
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
    parser.add_argument("kind", choices=["hello", "form", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    web.run_app(make_app(args.kind, args.dsn), host="127.0.0.1", port=args.port,
                access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    main()
