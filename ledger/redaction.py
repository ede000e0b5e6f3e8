"""Secrets out before anything is written anywhere: store, rejection log, spool, log lines.

Pure code. Which keys are secret is defined once, in `ledger.identity`. Three views:

- `scrub`: what a *stored* delivery keeps. Secret keys go at any depth (Bitrix24 repeats its
  tokens inside `data.BOT[*]`, `data.BOT[*].AUTH`, `data.COMMAND[*]`, `data.bot.auth`); an `auth`
  block keeps only its public scalar fields (`identity.AUTH_PUBLIC`), and an `auth` that is not an
  object goes whole. A removed value leaves its path and a short fingerprint behind.
- `rejection_view`: what the rejection log keeps of a body that decoded but was refused: as
  `scrub`, and every key that so much as contains `auth` goes whole, and string values are cut
  by `scrub_text` (a token may hide anywhere in a body nobody vouched for).
- `scrub_text`: a body that could not be decoded. Structure-free: the text is kept only up to the
  first place where a decoder (percent escapes, `\\u`/`\\x` escapes, `+`, case, Unicode folding,
  PHP's name mangling) could read a secret name or `auth`; everything after it is dropped.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ledger.hashing import canonical_json
from ledger.identity import (
    AUTH_KEY,
    KEY_FACTS,
    SECRET_KEYS,
    KeyFacts,
    key_facts,
    normal_key,
)

FINGERPRINT_HEX = 12  # 48 bits: tells tokens apart, reveals nothing usable about a 128-bit token
REDACTED = "[redacted]"
_SUSPICIOUS = (*sorted(SECRET_KEYS), AUTH_KEY)


def fingerprint(secret: str) -> str:
    """A short, stable fingerprint of a secret value (hex prefix of its SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX]


def fingerprint_of(value: Any) -> str:
    """The fingerprint of a removed value: a text's own, a container's of its canonical JSON."""
    return _value_fingerprint(value)


def _value_fingerprint(value: Any) -> str:
    if isinstance(value, str):
        return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX]
    return fingerprint(canonical_json(value).decode())


@dataclass(slots=True)
class Redaction:
    """One removed secret: where it was (path of keys from the top) and its fingerprint.

    Never changed once made (not frozen: a delivery makes several, and frozen costs more)."""

    path: tuple[str, ...]
    fingerprint: str

    def under(self, root: str) -> Redaction:
        return Redaction((root, *self.path), self.fingerprint)

    def as_json(self) -> dict[str, Any]:
        return {"path": list(self.path), "fingerprint": self.fingerprint}


@dataclass(slots=True)  # two per delivery (body and query), never changed: frozen costs more
class Scrubbed:
    """One pass over a document: what may be stored, what was removed, and two facts about it."""

    redacted: dict[str, Any]  # secrets removed, order kept
    redactions: tuple[Redaction, ...]
    stripped: dict[str, Any]  # also without `strip` keys (for identities that ignore them)
    has_nul: bool  # U+0000 anywhere, keys included
    # `stripped` holds only text in non-empty objects: it is its own canonical form
    # (`identity.canonical`), as the one-pass decoder knows of a form's views
    canonical: bool = False
    # SHA-256 of the document's `auth.application_token`, where the one-pass decoder hashed it
    # for its fingerprint already: `envelope.read_envelope` takes it instead of hashing again
    token_sha256: bytes | None = None


def scrub(document: dict[str, Any], strip: frozenset[str] = frozenset()) -> Scrubbed:
    """Remove secrets (keeping fingerprints), and in a second copy also the `strip` keys.

    `strip` holds normalised key names (`identity.normal_key`). One walk does all of it because
    this runs for every delivery on the intake's hot path; it builds a path only for what it
    removes (the keys above are on a stack), and reads key facts from the cache directly.
    """
    redacted, stripped, nul, removed = walk(document, strip)
    return Scrubbed(redacted, fingerprinted(removed), stripped, nul)


Removed = tuple[tuple[str, ...], Any]  # a removed value (as found) and its path


def walk(
    document: dict[str, Any], strip: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], dict[str, Any], bool, list[Removed]]:
    """`scrub`'s walk: both views, the U+0000 fact, and every removed value with its path, in
    document order (the one-pass decoder replays it per key sequence, `ledger.onepass`)."""
    removed: list[Removed] = []
    redacted, stripped, nul = _scrub_dict(document, [], False, strip, removed)
    return redacted, stripped, nul, removed


def fingerprinted(removed: list[Removed]) -> tuple[Redaction, ...]:
    """The redaction records of removed values (a token recurs in a delivery — bot entry, its
    AUTH copy, `auth` — so each text is hashed once)."""
    texts: dict[str, str] = {}
    records: list[Redaction] = []
    for path, value in removed:
        if isinstance(value, str):
            known = texts.get(value)
            if known is None:
                known = texts[value] = _value_fingerprint(value)
        else:
            known = _value_fingerprint(value)
        records.append(Redaction(path, known))
    return tuple(records)


def _scrub_dict(
    node: dict[str, Any], path: list[str], in_auth: bool, strip: frozenset[str],
    removed: list[Removed],
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    kept: dict[str, Any] = {}
    stripped: dict[str, Any] = {}
    nul = False
    cached = KEY_FACTS.young
    for key, value in node.items():
        facts: KeyFacts | None = cached.get(key)
        if facts is None:
            facts = key_facts(key)
        if facts.plain and not in_auth and isinstance(value, str):  # most keys of a delivery
            if "\0" in value:
                nul = True
            kept[key] = value
            if facts.normal not in strip:
                stripped[key] = value
            continue
        if "\0" in key:
            nul = True
        is_text = isinstance(value, str)
        if (
            facts.secret
            or (in_auth and not (facts.public and is_text))
            or (facts.auth and not isinstance(value, dict))
        ):
            removed.append(((*path, facts.shown), value))
            continue
        if is_text:  # most values: no call, no path to build
            if "\0" in value:
                nul = True
            kept[key] = value
            if facts.normal not in strip:
                stripped[key] = value
            continue
        path.append(key)
        kept_value, stripped_value, inner_nul = (
            _scrub_dict(value, path, facts.auth, strip, removed)
            if isinstance(value, dict)
            else _scrub_value(value, path, facts.auth, strip, removed)
        )
        path.pop()
        nul = nul or inner_nul
        kept[key] = kept_value
        if facts.normal not in strip:
            stripped[key] = stripped_value
    return kept, stripped, nul


def _scrub_value(
    node: Any, path: list[str], in_auth: bool, strip: frozenset[str], removed: list[Removed],
) -> tuple[Any, Any, bool]:
    if isinstance(node, dict):
        return _scrub_dict(node, path, in_auth, strip, removed)
    if isinstance(node, list):
        kept: list[Any] = []
        stripped: list[Any] = []
        nul = False
        for i, item in enumerate(node):
            path.append(str(i))
            kept_item, stripped_item, inner_nul = _scrub_value(
                item, path, False, strip, removed)
            path.pop()
            nul = nul or inner_nul
            kept.append(kept_item)
            stripped.append(stripped_item)
        return kept, stripped, nul
    return node, node, isinstance(node, str) and "\0" in node


def redact(document: dict[str, Any]) -> tuple[dict[str, Any], tuple[Redaction, ...]]:
    """A copy without secret keys (order otherwise kept), and what was removed."""
    scrubbed = scrub(document)
    return scrubbed.redacted, scrubbed.redactions


def rejection_view(document: Any, *, budget: int = 2048) -> Any:
    """What the rejection log may keep of a decoded body: no secret key, nothing under any key
    that contains `auth`, and string values cut where a secret name could begin.

    Walks only until about `budget` characters are kept (the excerpt is capped anyway), so a
    huge refused body costs no more than a small one.
    """
    left = budget

    def view(node: Any) -> Any:
        nonlocal left
        if isinstance(node, dict):
            kept: dict[str, Any] = {}
            for key, value in node.items():
                if left <= 0:
                    break
                left -= len(key) + 4
                normal = normal_key(key)
                if any(name in normal for name in _SUSPICIOUS):
                    kept[scrub_text(key[:budget])] = REDACTED
                else:
                    kept[key] = view(value)
            return kept
        if isinstance(node, list):
            items: list[Any] = []
            for item in node:
                if left <= 0:
                    break
                items.append(view(item))
            return items
        if isinstance(node, str):
            text = scrub_text(node[: max(left, 0)])
            left -= len(text) + 2
            return text
        left -= 8
        return node

    return view(document)


_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2})|U([0-9a-fA-F]{8}))")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


def _unescape(match: re.Match[str]) -> str:
    code = int(next(g for g in match.groups() if g is not None), 16)
    return chr(code) if code <= 0x10FFFF else "_"


def skeleton(text: str) -> str:
    """The text as any decoder could read its keys: escapes undone (three times over, for
    double encodings), folded, lower-cased, every other run of characters one `_`."""
    for _ in range(3):
        decoded = _ESCAPE.sub(_unescape, unquote(text.replace("+", " "), errors="replace"))
        if decoded == text:
            break
        text = decoded
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return _NOT_WORD.sub("_", text.casefold())


def _suspicious(text: str) -> bool:
    shape = skeleton(text)
    return any(name in shape for name in _SUSPICIOUS)


def scrub_text(text: str) -> str:
    """Structure-free redaction: `text` up to just before a secret name or `auth` could be read.

    The longest prefix whose `skeleton` contains no such name is kept (found by bisection, then
    checked as a whole: if the check fails, nothing is kept); the rest is replaced by a marker.
    """
    if not _suspicious(text):
        return text
    low, high = 0, len(text)  # skeleton(text[:low]) is clean, skeleton(text[:high]) is not
    while high - low > 1:
        middle = (low + high) // 2
        if _suspicious(text[:middle]):
            high = middle
        else:
            low = middle
    kept = text[:low]
    if _suspicious(kept):  # a prefix that reads differently from the whole: keep nothing
        return REDACTED
    return kept + REDACTED
