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

Since no answer names the member_id, a token the portal accepts proves less than the install
claims: any live token issued on that domain would do, and with it a made-up member_id could be
bound to the domain and the allowance spent. Two more checks narrow who can do that:
`result.CODE` must be this application's code (`LEDGER_BITRIX24_APP_CODE`, when set: another
application's token no longer passes), and `profile` must say the token's user is an
administrator of the portal (`ADMIN`, `LEDGER_CONFIRM_REQUIRE_ADMIN`: installing is an
administrator's act, so an ordinary user's token of the application no longer passes).
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
        self, session: aiohttp.ClientSession, *, base_url: str, timeout: float,
        app_code: str | None = None, require_admin: bool = True,
    ) -> None:
        self._session = session
        self._base_url = base_url
        self._app_code = app_code
        self._require_admin = require_admin
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
        answer = await self._call(domain, member_id, access_token, "app.info")
        if isinstance(answer, str):
            return answer
        refused = _judge_app(domain, member_id, answer, self._app_code)
        if refused is not None or not self._require_admin:
            return refused
        answer = await self._call(domain, member_id, access_token, "profile")
        if isinstance(answer, str):
            return answer
        if answer.get("ADMIN") is not True:
            return (f"{domain} says the install's token is not an administrator's (an install "
                    "is an administrator's act; see LEDGER_CONFIRM_REQUIRE_ADMIN)")
        return None

    async def _call(
        self, domain: str, member_id: str, access_token: str, method: str
    ) -> dict[str, Any] | str:
        """`result` of one REST call with the install's token, or why there is none."""
        url = self._base_url.format(domain=domain).rstrip("/") + "/" + method
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
        return _result(domain, status, body)


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


def _result(domain: str, status: int, body: bytes) -> dict[str, Any] | str:
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
    result: dict[str, Any] = answer["result"]
    return result


def _judge_app(
    domain: str, member_id: str, result: dict[str, Any], app_code: str | None
) -> str | None:
    install = result.get("install")
    named = install.get("member_id") if isinstance(install, dict) else result.get("member_id")
    if named is not None and named != member_id:
        return f"{domain} answers for another portal"
    if app_code is not None and result.get("CODE") != app_code:
        return (f"{domain} answers for another application's token (app.info CODE is not "
                "LEDGER_BITRIX24_APP_CODE)")
    return None
