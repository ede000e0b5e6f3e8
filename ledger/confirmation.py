"""Asking a portal whether an install is its own: the Bitrix24 REST call behind domain allowances.

A domain allowance names a portal by its domain, which any sender can type. So an install it
would admit is confirmed first: the install's `auth.access_token` is presented to the *allowed*
domain's REST API (`app.info`, `LEDGER_BITRIX24_REST_URL`), outside the append and its lock, with
a timeout. Only the portal itself accepts a token it issued. The token is held in memory for this
one call and never written, logged or spooled.

What `app.info` answers is documented (apidocs.bitrix24.com, api-reference/common/system/
app-info): `{"result": {"ID", "CODE", "VERSION", "STATUS", "INSTALLED", ...}}` on success,
`{"error", "error_description"}` with a 4xx otherwise. The documented answer carries no member_id;
when an answer does name one (`result.install.member_id` or `result.member_id`), it must be the
install's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aiohttp
import orjson

log = logging.getLogger(__name__)

_MAX_ANSWER_BYTES = 256 * 1024
# Anyone can send an install claiming an allowed domain, and a refused genuine install is never
# sent again. So call-backs wait for one of a bounded number of slots (within the confirmation
# timeout) rather than being refused when busy, and one sender address may hold only a few of
# them at once: a flood from one address cannot crowd out Bitrix24's own delivery.
_MAX_IN_FLIGHT = 64
_PER_SENDER = 8


class Confirmer(Protocol):
    async def confirm(
        self, domain: str, member_id: str, access_token: str, *, sender: str | None = None
    ) -> str | None:
        """None when the portal at `domain` confirms the install; otherwise why not."""
        ...


class RestConfirmer:
    """Confirms installs with the portal's REST API over one shared client session."""

    def __init__(
        self, session: aiohttp.ClientSession, *, base_url: str, timeout: float
    ) -> None:
        self._session = session
        self._base_url = base_url
        self._seconds = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._slots = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._by_sender: dict[str, int] = {}  # in flight per sender address (bounded by slots)

    async def confirm(
        self, domain: str, member_id: str, access_token: str, *, sender: str | None = None
    ) -> str | None:
        key = sender or ""
        if self._by_sender.get(key, 0) >= _PER_SENDER:
            return "too many installs from this address are being confirmed at once"
        self._by_sender[key] = self._by_sender.get(key, 0) + 1
        try:
            async with asyncio.timeout(self._seconds), self._slots:
                return await self._ask(domain, member_id, access_token)
        except TimeoutError:
            return f"{domain} did not confirm within {self._seconds:g}s"
        finally:
            left = self._by_sender[key] - 1
            if left:
                self._by_sender[key] = left
            else:
                del self._by_sender[key]

    async def _ask(self, domain: str, member_id: str, access_token: str) -> str | None:
        url = self._base_url.format(domain=domain).rstrip("/") + "/app.info"
        try:
            async with self._session.post(
                url, data={"auth": access_token}, timeout=self._timeout, allow_redirects=False
            ) as response:
                body = await _read_at_most(response.content, _MAX_ANSWER_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("install for %s not confirmed: %s unreachable (%s)",
                        member_id, domain, exc.__class__.__name__)
            return f"{domain} could not be reached"
        return _judge_answer(domain, member_id, status, body)


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes, however it arrives: `read(n)` returns what has arrived
    so far, and an answer in two chunks was judged by its first (a genuine install refused)."""
    body = bytearray()
    while len(body) < limit:
        chunk = await content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _judge_answer(domain: str, member_id: str, status: int, body: bytes) -> str | None:
    if len(body) > _MAX_ANSWER_BYTES:
        return f"{domain} answered with more than {_MAX_ANSWER_BYTES} bytes"
    try:
        answer: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{domain} answered HTTP {status} without JSON"
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("result"), dict):
        error = answer.get("error") if isinstance(answer, dict) else None
        reason = str(error)[:60] if isinstance(error, str) else f"HTTP {status}"
        return f"{domain} did not accept the install's access token ({reason})"
    result = answer["result"]
    install = result.get("install")
    named = install.get("member_id") if isinstance(install, dict) else result.get("member_id")
    if named is not None and named != member_id:
        return f"{domain} answers for another portal"
    return None
