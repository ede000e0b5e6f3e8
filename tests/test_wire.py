"""The form decoder is PHP's parse_str, byte for byte; the encoder is PHP's http_build_query."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from ledger import wire
from ledger.errors import DeliveryRejected
from tests.conftest import FIXTURES, SAMPLES

PHP_CASES: list[dict[str, Any]] = json.loads(
    (FIXTURES / "php" / "parse_str.json").read_text()
)["cases"]
LIMITS = {"max_fields": 10_000, "max_nesting": 32}


@pytest.mark.parametrize("case", PHP_CASES, ids=[c["name"] for c in PHP_CASES])
def test_decodes_exactly_what_php_parse_str_decodes(case: dict[str, Any]) -> None:
    decoded = wire.parse_php_form(base64.b64decode(case["body_b64"]), **LIMITS)
    # json.dumps compares key order too: PHP arrays are ordered maps
    assert json.dumps(decoded) == json.dumps(case["php"])


@pytest.mark.parametrize("name", sorted(p.stem for p in SAMPLES.glob("*.json")))
def test_encodes_samples_exactly_as_php_http_build_query(name: str) -> None:
    document = json.loads((SAMPLES / f"{name}.json").read_text())
    assert wire.http_build_query(document) == (SAMPLES / f"{name}.form").read_bytes()


def test_too_many_fields_is_refused_not_truncated() -> None:
    body = "&".join(f"k{i}=v" for i in range(11)).encode()
    with pytest.raises(DeliveryRejected) as caught:
        wire.parse_php_form(body, max_fields=10, max_nesting=32)
    assert (caught.value.status, caught.value.code) == (413, "too_many_fields")


def test_nesting_past_the_cap_is_refused() -> None:
    with pytest.raises(DeliveryRejected) as caught:
        wire.parse_php_form(b"a" + b"[x]" * 5 + b"=1", max_fields=10, max_nesting=4)
    assert (caught.value.status, caught.value.code) == (400, "too_deep")


def test_invalid_utf8_is_refused() -> None:
    with pytest.raises(DeliveryRejected) as caught:
        wire.parse_php_form(b"m=%FF%FE", **LIMITS)
    assert caught.value.code == "invalid_utf8"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("application/json", b'{"event": "X"}'), ("application/json; charset=utf-8", b"{}")],
)
def test_json_bodies_decode_to_objects(content_type: str, body: bytes) -> None:
    assert isinstance(wire.decode_body(body, content_type, **LIMITS), dict)


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", b"a=1", 415),
        (None, b"a=1", 415),
        ("application/json", b"[1, 2]", 400),
        ("application/json", b"{not json", 400),
    ],
)
def test_other_bodies_are_refused(content_type: str | None, body: bytes, status: int) -> None:
    with pytest.raises(DeliveryRejected) as caught:
        wire.decode_body(body, content_type, **LIMITS)
    assert caught.value.status == status
