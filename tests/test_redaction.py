"""Secrets leave no trace but a fingerprint; everything else is kept as PHP decoded it."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from ledger import wire
from ledger.identity import SECRET_KEYS
from ledger.redaction import fingerprint, redact, scrub_text
from tests.conftest import FIXTURES, TOKEN, sample, sample_names

PHP = {
    c["name"]: c["php"]
    for c in json.loads((FIXTURES / "php" / "parse_str.json").read_text())["cases"]
}


def secret_values(node: Any) -> set[str]:
    if isinstance(node, dict):
        found: set[str] = set()
        for key, value in node.items():
            if key.lower() in SECRET_KEYS and isinstance(value, str):
                found.add(value)
            found |= secret_values(value)
        return found
    return set()


def without_secrets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_secrets(v) for k, v in node.items() if k.lower() not in SECRET_KEYS}
    return node


@pytest.mark.parametrize("name", sample_names())
def test_no_secret_value_survives_redaction(name: str) -> None:
    document = wire.parse_php_form(sample(name), max_fields=10_000, max_nesting=32)
    secrets = secret_values(document)
    assert TOKEN in secrets
    redacted, removed = redact(document)
    text = json.dumps(redacted)
    assert not [s for s in secrets if s in text]
    assert {r.fingerprint for r in removed} == {fingerprint(s) for s in secrets}


@pytest.mark.parametrize("name", sample_names())
def test_redacted_document_is_php_parse_str_minus_secrets(name: str) -> None:
    document = wire.parse_php_form(sample(name), max_fields=10_000, max_nesting=32)
    redacted, _ = redact(document)
    assert json.dumps(redacted) == json.dumps(without_secrets(PHP[f"sample {name}"]))


def test_removed_secrets_are_located_by_path() -> None:
    document = wire.parse_php_form(
        sample("onimbotmessageadd-1"), max_fields=10_000, max_nesting=32
    )
    _, removed = redact(document)
    paths = {r.path for r in removed}
    assert ("data", "BOT", "567", "AUTH", "refresh_token") in paths
    assert ("auth", "application_token") in paths


def test_a_fingerprint_is_the_sha256_prefix_an_investigator_can_recompute() -> None:
    assert fingerprint("a" * 32) != fingerprint("b" * 32)
    # the documented definition, computed here independently: 12 hex digits of SHA-256
    assert fingerprint(TOKEN) == "9ad7bcee3d6e" == hashlib.sha256(TOKEN.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    "raw",
    [
        "auth%5Bapplication_token%5D=" + TOKEN + "&x=1",
        "auth[application_token]=" + TOKEN,
        '{"auth": {"application_token": "' + TOKEN + '"}}',
    ],
)
def test_undecodable_bodies_are_scrubbed_textually(raw: str) -> None:
    assert TOKEN not in scrub_text(raw)


def test_base64_fixture_bodies_are_intact() -> None:
    # guards the fixture file itself: a sample body must decode to the committed sample
    case = next(c for c in json.loads((FIXTURES / "php" / "parse_str.json").read_text())[
        "cases"] if c["name"] == "sample onimbotdelete-1")
    assert base64.b64decode(case["body_b64"]) == sample("onimbotdelete-1")


def test_a_key_naming_two_secrets_is_recorded_by_the_same_name_in_every_process() -> None:
    """The name a removal is recorded by goes into the stored metadata: it must not depend on
    the process's string hash seed (it did — the secret names were tried in a set's order, so
    two workers stored different metadata for one delivery, and the differential test of the
    draft flaked under some seeds)."""
    import subprocess
    import sys

    probe = ("from ledger.identity import normal_key, secret_name_in; print([secret_name_in("
             "normal_key(k)) for k in ('APPLICATION_TOKENACCESS.TOKEN', "
             "'%%client_secretAccess-Token', 'refresh_tokensessid')])")
    seen = {subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(seed)}).stdout
            for seed in (0, 1, 12, 25)}
    assert seen == {"['access_token', 'access_token', 'refresh_token']\n"}, seen
