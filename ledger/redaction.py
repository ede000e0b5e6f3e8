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


@dataclass(frozen=True, slots=True)
class Scrubbed:
    """One pass over a document: what may be stored, what was removed, and two facts about it."""

    redacted: dict[str, Any]  # secrets removed, order kept
    redactions: tuple[Redaction, ...]
    stripped: dict[str, Any]  # also without `strip` keys (for identities that ignore them)
    has_nul: bool  # U+0000 anywhere, keys included


def scrub(document: dict[str, Any], strip: frozenset[str] = frozenset()) -> Scrubbed:
    """Remove secrets (keeping fingerprints), and in a second copy also the `strip` keys.

    One walk does all of it because this runs for every delivery on the intake's hot path.
    """
    removed: list[Redaction] = []
    nul = False

    def walk(node: Any, path: tuple[str, ...]) -> tuple[Any, Any]:
        nonlocal nul
        if isinstance(node, dict):
            kept: dict[str, Any] = {}
            stripped: dict[str, Any] = {}
            for key, value in node.items():
                lowered = key.lower()
                if "\0" in key:
                    nul = True
                if lowered in SECRET_KEYS:
                    text = value if isinstance(value, str) else repr(value)
                    removed.append(Redaction((*path, key), fingerprint(text)))
                    continue
                kept_value, stripped_value = walk(value, (*path, key))
                kept[key] = kept_value
                if lowered not in strip:
                    stripped[key] = stripped_value
            return kept, stripped
        if isinstance(node, list):
            pairs = [walk(item, (*path, str(i))) for i, item in enumerate(node)]
            return [k for k, _ in pairs], [s for _, s in pairs]
        if isinstance(node, str) and "\0" in node:
            nul = True
        return node, node

    redacted, stripped = walk(document, ())
    return Scrubbed(redacted, tuple(removed), stripped, nul)


def redact(document: dict[str, Any]) -> tuple[dict[str, Any], tuple[Redaction, ...]]:
    """A copy without secret keys (order otherwise kept), and what was removed."""
    scrubbed = scrub(document)
    return scrubbed.redacted, scrubbed.redactions


def scrub_text(text: str) -> str:
    """Best-effort redaction of a body that could not be decoded (for the rejection excerpt)."""
    return _RAW_SECRET.sub(lambda m: m.group(1) + "[redacted]", text)
