"""What a delivery *is*: which keys are secret, which are delivery-specific, and one occurrence.

Pure code, and the one place these definitions live (redaction, the envelope and the drafts all
read them from here):

- `SECRET_KEYS`: values never stored, logged or spooled (matched after `normal_key`, as a part of
  the key, so `auth_application_token` — PHP's mangling of `auth.application_token` — counts too).
- `AUTH_KEY` and `AUTH_PUBLIC`: an `auth` block at any depth keeps only these fields (scalars);
  anything else in it may be a token under a name we do not know, so it goes.
- `DELIVERY_SPECIFIC`: keys that differ between two deliveries of one occurrence.
- `occurrence` / `dedup_key`: the permanent de-duplication identity, over the *canonical form*.

The canonical form is the value as PHP's `parse_str` would see it after `http_build_query`, so an
occurrence has one identity whether it came as a form (Bitrix24) or as JSON (some SDKs): scalars
become strings (`true` → "1", `false` → "0", integers in decimal), `null` and empty containers
vanish, lists become maps keyed "0".."n-1".
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ledger.caches import KeyCache
from ledger.hashing import canonical_json

SECRET_KEYS = frozenset(
    {"access_token", "refresh_token", "application_token", "client_secret", "sessid"}
)
AUTH_KEY = "auth"
# what an `auth` block may keep: the portal, who acted, the app's public client id, endpoints,
# expiry — never a credential
AUTH_PUBLIC = frozenset(
    {"domain", "member_id", "user_id", "status", "scope", "server_endpoint", "client_endpoint",
     "client_id", "expires", "expires_in"}
)
# differ between two deliveries of one occurrence: tokens, their expiry, the whole `auth` block
DELIVERY_SPECIFIC = frozenset({*SECRET_KEYS, "expires", "expires_in", AUTH_KEY})
# the application lifecycle: who installed and with which token tells two occurrences apart
LIFECYCLE = frozenset({"ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL"})

DEDUP_VERSION = 2  # part of the hashed identity; 1 was {event, data, ts, query} without it

_NOT_WORD = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What redaction needs to know about a key, worked out once per distinct short key."""

    normal: str
    secret: bool  # a secret name is part of it
    auth: bool  # it is `auth` (any case, any mangling)
    public: bool  # one of `AUTH_PUBLIC`
    plain: bool  # neither secret nor `auth`, no U+0000: outside `auth`, a text value stays
    shown: str  # how a removal under this key is recorded (see `redaction.scrub`)


def key_facts(key: str) -> KeyFacts:
    """The facts of a key; short keys' are cached (a bounded cache: senders feed it)."""
    facts: KeyFacts | None = KEY_FACTS.get(key)
    if facts is None:
        facts = _facts(key)
        if len(key) <= _CACHED_KEY:
            KEY_FACTS.put(key, facts)
    return facts


def _facts(key: str) -> KeyFacts:
    normal = normal_key(key)
    secret = is_secret_normal(normal)
    auth = normal == AUTH_KEY
    # a key of a sender's own making may carry the secret itself: a removal is recorded by the
    # secret name it contains instead
    shown = key if known_name(key) else (secret_name_in(normal) or ("auth" if auth else "(key)"))
    return KeyFacts(normal, secret, auth, normal in AUTH_PUBLIC,
                    not secret and not auth and "\0" not in key, shown)


def normal_key(key: str) -> str:
    """A key as every decoder might read it: compatibility-folded, lower case, and every run of
    other characters (PHP turns ` `, `.` and `[` into `_`) as one `_`.

    Runs for every key of every delivery: short keys (all of Bitrix24's) are cached, so the
    cache stays bounded in bytes whatever senders invent.
    """
    return _normal_short_key(key) if len(key) <= _CACHED_KEY else _normalise(key)


def _normalise(key: str) -> str:
    if not key.isascii():
        key = unicodedata.normalize("NFKC", key)
    return _NOT_WORD.sub("_", key.casefold()).strip("_")


_CACHED_KEY = 64
_normal_short_key = lru_cache(maxsize=4096)(_normalise)
# str -> KeyFacts; redaction reads `.young` directly, its hot loop saves a call per key
KEY_FACTS = KeyCache(2048)


def is_secret_key(key: str) -> bool:
    """A key whose value is a credential (a secret name anywhere inside the normalised key)."""
    return is_secret_normal(normal_key(key))


# the secret names without their separators: `accessToken`, `ACCESS-TOKEN`, `access.token`
_COMPACT_SECRETS = {name.replace("_", ""): name for name in sorted(SECRET_KEYS)}


def is_secret_normal(normal: str) -> bool:
    """`is_secret_key` for a key already passed through `normal_key`."""
    return secret_name_in(normal) is not None


def secret_name_in(normal: str) -> str | None:
    """The secret name a normalised key contains (separators ignored), if any."""
    compact = normal.replace("_", "")
    return next((name for c, name in _COMPACT_SECRETS.items() if c in compact), None)


def known_name(key: str) -> bool:
    """A key exactly as Bitrix24 names its secrets or its public `auth` fields."""
    folded = key.casefold()
    return folded in SECRET_KEYS or folded in AUTH_PUBLIC or folded == AUTH_KEY


def is_auth_key(key: str) -> bool:
    return normal_key(key) == AUTH_KEY


def canonical(value: Any) -> Any:
    """The value as PHP's `parse_str(http_build_query(value))` gives it (None when it vanishes)."""
    if type(value) is str:
        return value
    if type(value) is dict:
        out: dict[str, Any] = {}
        for key, item in value.items():
            kept = item if type(item) is str else canonical(item)
            if kept is not None:
                out[str(key)] = kept
        return out or None
    return _canonical(value)


def _canonical(value: Any) -> Any:
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = ((str(i), v) for i, v in enumerate(value))
    elif value is None:
        return None
    elif isinstance(value, bool):
        return "1" if value else "0"
    elif isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    else:
        return str(value)
    out: dict[str, Any] = {}
    for key, item in items:
        kept = canonical(item)
        if kept is not None:
            out[str(key)] = kept
    return out or None


def occurrence(
    stripped: Mapping[str, Any],
    query: Mapping[str, Any],
    *,
    event_type: str,
    user_id: str | None,
    token_sha256: bytes,
    stripped_is_canonical: bool = False,
) -> dict[str, Any]:
    """What identifies one occurrence, from a document stripped of `DELIVERY_SPECIFIC` keys.

    The event, its data, its `ts` and the query string (in canonical form); for the application
    lifecycle also who triggered it and the application token's digest — a reinstall by another
    user (with a new token) in the same second is a new occurrence, a redelivery is not.
    `stripped_is_canonical`: `stripped` holds only text in non-empty objects (no copy needed).
    """
    data = stripped.get("data")
    ts = stripped.get("ts")
    identity: dict[str, Any] = {
        "v": DEDUP_VERSION,
        "event": event_type,
        "data": data if stripped_is_canonical else canonical(data),
        "ts": ts if stripped_is_canonical else canonical(ts),
        "query": canonical(query),
    }
    if event_type in LIFECYCLE:
        identity["user_id"] = user_id
        identity["token_sha256"] = token_sha256.hex()
    return identity


def dedup_key(occurrence_: Mapping[str, Any]) -> bytes:
    """SHA-256 of the occurrence's canonical JSON: unique per portal, forever."""
    return hashlib.sha256(canonical_json(occurrence_)).digest()
