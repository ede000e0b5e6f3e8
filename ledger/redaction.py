"""Secrets out before anything is written anywhere: store, rejection log, log lines.

Pure code. Secrets are recognised by key name at any depth (Bitrix24 repeats its tokens inside
`data.BOT[*]`, `data.BOT[*].AUTH`, `data.COMMAND[*]` and `data.bot.auth`). A removed value leaves a
short fingerprint behind, so an investigator can tell two tokens apart without holding either.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

SECRET_KEYS = frozenset(
    {"access_token", "refresh_token", "application_token", "client_secret", "sessid"}
)
FINGERPRINT_HEX = 12  # 48 bits: tells tokens apart, reveals nothing usable about a 128-bit token

_RAW_SECRET = re.compile(
    r"(?i)((?:access_token|refresh_token|application_token|client_secret|sessid)"
    r"(?:%5D|\])*\"?\s*(?:=|:\s*\"?))([^&\"\s,}]*)"
)


def fingerprint(secret: str) -> str:
    """A short, stable fingerprint of a secret value (hex prefix of its SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:FINGERPRINT_HEX]


def is_secret_key(key: str) -> bool:
    return key.lower() in SECRET_KEYS


@dataclass(frozen=True, slots=True)
class Redaction:
    """One removed secret: where it was (path of keys from the top) and its fingerprint."""

    path: tuple[str, ...]
    fingerprint: str

    def under(self, root: str) -> Redaction:
        return Redaction((root, *self.path), self.fingerprint)

    def as_json(self) -> dict[str, Any]:
        return {"path": list(self.path), "fingerprint": self.fingerprint}


def redact(document: dict[str, Any]) -> tuple[dict[str, Any], tuple[Redaction, ...]]:
    """Return a copy without secret keys (order otherwise kept) and what was removed."""
    removed: list[Redaction] = []

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            kept: dict[str, Any] = {}
            for key, value in node.items():
                if is_secret_key(key) and not isinstance(value, dict | list):
                    removed.append(Redaction((*path, key), fingerprint(str(value))))
                elif is_secret_key(key):
                    # a secret-named container: drop it whole, fingerprint its canonical text
                    removed.append(Redaction((*path, key), fingerprint(repr(value))))
                else:
                    kept[key] = walk(value, (*path, key))
            return kept
        if isinstance(node, list):
            return [walk(item, (*path, str(i))) for i, item in enumerate(node)]
        return node

    return walk(document, ()), tuple(removed)


def scrub_text(text: str) -> str:
    """Best-effort redaction of a body that could not be decoded (for the rejection excerpt)."""
    return _RAW_SECRET.sub(lambda m: m.group(1) + "[redacted]", text)
