"""Hostile input: whatever arrives, the answer is a clear 4xx — never a 5xx, never a crash."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import wire
from ledger.errors import DeliveryRejected
from tests.conftest import FORM, sample
from tests.helpers import Client, install_sample_portal, post

LIMITS = {"max_fields": 1000, "max_nesting": 32}
form_keys = st.text(alphabet="ab[]. _%+=&\x00é", max_size=20)
form_bodies = st.lists(
    st.tuples(form_keys, st.text(max_size=20)), max_size=30
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass"))


@given(st.binary(max_size=2000) | form_bodies)
@settings(max_examples=2000, deadline=None)
def test_the_decoder_either_decodes_or_refuses_with_a_reason(body: bytes) -> None:
    result = _decode(body)
    if isinstance(result, DeliveryRejected):
        assert 400 <= result.status < 500
        assert result.code
    else:
        assert isinstance(result, dict)


def _decode(body: bytes) -> dict[str, Any] | DeliveryRejected:
    try:
        return wire.parse_php_form(body, **LIMITS)
    except DeliveryRejected as rejected:
        return rejected


@given(st.integers(min_value=33, max_value=200))
@settings(max_examples=20, deadline=None)
def test_deep_nesting_is_refused(depth: int) -> None:
    with pytest.raises(DeliveryRejected) as caught:
        wire.parse_php_form(b"a" + b"[x]" * depth + b"=1", **LIMITS)
    assert caught.value.code == "too_deep"


async def test_arbitrary_bodies_never_get_a_5xx(client: Client) -> None:
    await install_sample_portal(client)
    strategy = st.tuples(
        st.binary(max_size=3000) | form_bodies | st.just(sample("onimbotdelete-1")),
        st.sampled_from([FORM, "application/json", "text/plain", "", "multipart/form-data"]),
    )
    examples: list[tuple[bytes, str]] = []

    @given(strategy)
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    def collect(example: tuple[bytes, str]) -> None:
        examples.append(example)

    collect()
    for body, content_type in examples:
        response = await client.post("/bitrix24/events", data=body,
                                     headers={"Content-Type": content_type})
        assert response.status < 500, (body[:200], response.status)
        if response.status >= 400:
            assert (await response.json())["error"]
    assert (await post(client, sample("onimbotjoinchat-1")))[0] == 200  # still serving


async def test_a_chunked_body_over_the_limit_is_refused(client: Client) -> None:
    async def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    response = await client.post("/bitrix24/events", data=chunks(),
                                 headers={"Content-Type": FORM})
    assert response.status == 413


async def test_a_slow_client_gets_408(make_client: Any, settings_factory: Any) -> None:
    client = await make_client(settings_factory(body_timeout_seconds=0.3))
    stalled = asyncio.Event()

    async def trickle() -> Any:
        yield b"event=ONIMBOTDELETE&"
        await stalled.wait()  # never sends the rest (released at teardown)

    task = asyncio.create_task(client.post("/bitrix24/events", data=trickle(),
                                           headers={"Content-Type": FORM}))
    async with asyncio.timeout(10):
        response = await asyncio.shield(task)
    assert response.status == 408
    stalled.set()
