"""LISTEN on a connection of its own, reconnecting by itself.

A pooled connection would be handed back to the pool and go deaf; NOTIFY is only ever a wake-up
hint here — readers go by their checkpoints — so a lost notification costs a poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

log = logging.getLogger(__name__)


async def listen_forever(
    dsn: str, channel: str, on_notify: Callable[[], None], *, backoff: float = 1.0
) -> None:
    """Call `on_notify` for every notification (and after each (re)connect), until cancelled."""
    while True:
        connection: asyncpg.Connection[Any] | None = None
        try:
            connection = await asyncpg.connect(dsn)
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _, lost=lost: lost.set())
            await connection.add_listener(channel, lambda *_: on_notify())
            on_notify()  # anything committed while we were not listening
            await lost.wait()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("listener on %s lost its connection (%s); reconnecting", channel, exc)
        finally:
            if connection is not None and not connection.is_closed():
                await connection.close()
        await asyncio.sleep(backoff)  # pacing reconnection attempts, not waiting for a result
