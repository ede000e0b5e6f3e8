"""What a decoded Bitrix24 delivery means: its envelope, its portal, the bots it names.

Pure code. Bitrix24 sends every scalar as a string and drops empty values, so every field here is
optional until proven otherwise, and ids are parsed leniently (a non-numeric id is no bot id).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ledger.errors import DeliveryRejected
from ledger.identity import canonical

# Bitrix24's event names are letters, digits and underscores; the dotted namespace (`LEDGER.…`)
# is the ledger's own (trust and route changes), so no sender can name an event into it.
_EVENT_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,99}")
MAX_MEMBER_ID = 128  # Bitrix24's are 32 hex digits; longer ones would not fit an index entry
MAX_DOMAIN = 253  # the longest DNS name

INSTALL = "ONAPPINSTALL"
UPDATE = "ONAPPUPDATE"
UNINSTALL = "ONAPPUNINSTALL"

@dataclass(slots=True)
class Envelope:
    """The parts of a delivery the ledger acts on; the whole document is kept separately.

    Never changed once read (not frozen: one is built per delivery, and frozen costs more)."""

    event_type: str
    member_id: str
    domain: str | None
    user_id: str | None
    token_digest: bytes  # SHA-256 of the presented token; the token itself goes no further
    occurred_at: datetime | None
    bot_ids: tuple[int, ...]


def read_envelope(document: dict[str, Any], token_sha256: bytes | None = None) -> Envelope:
    """Validate the envelope and extract what verification and indexing need.

    `token_sha256`: the SHA-256 of this document's `auth.application_token` if the caller has
    it (`Scrubbed.token_sha256`, from the same decoding), else it is computed here."""
    event = document.get("event")
    if not isinstance(event, str) or not event.strip():
        raise DeliveryRejected(400, "missing_event", "the delivery has no `event` field")
    # ASCII first: Unicode case mapping would let a long s (U+017F) spell an S
    event_type = event.strip().upper() if event.isascii() else ""
    if not _EVENT_NAME.fullmatch(event_type):
        raise DeliveryRejected(400, "invalid_event", "`event` is not an event name")
    auth = document.get("auth")
    if not isinstance(auth, dict):
        raise DeliveryRejected(401, "missing_auth", "the delivery carries no top-level `auth`")
    member_id = auth.get("member_id")
    if not isinstance(member_id, str) or not member_id:
        raise DeliveryRejected(401, "missing_member_id", "`auth.member_id` is missing")
    if len(member_id) > MAX_MEMBER_ID:
        raise DeliveryRejected(
            400, "invalid_member_id", f"`auth.member_id` is longer than {MAX_MEMBER_ID} characters"
        )
    token = auth.get("application_token")
    if not isinstance(token, str) or not token:
        raise DeliveryRejected(
            401, "missing_application_token", "`auth.application_token` is missing"
        )
    domain = auth.get("domain")
    if isinstance(domain, str) and len(domain) > MAX_DOMAIN:
        raise DeliveryRejected(
            400, "invalid_domain", f"`auth.domain` is longer than {MAX_DOMAIN} characters"
        )
    user_id = auth.get("user_id")
    return Envelope(
        event_type=event_type,
        member_id=member_id,
        domain=domain.lower() if isinstance(domain, str) and domain else None,
        user_id=(user_id or None) if type(user_id) is str else _scalar(user_id),
        token_digest=hashlib.sha256(token.encode()).digest() if token_sha256 is None
        else token_sha256,
        occurred_at=_parse_ts(document.get("ts")),
        bot_ids=bot_ids(document.get("data")),
    )


def _scalar(value: Any) -> str | None:
    """A scalar as the form encoding would carry it (JSON senders may send numbers)."""
    text = canonical(value)
    return text if isinstance(text, str) and text else None


def _parse_ts(value: Any) -> datetime | None:
    text = str(value) if isinstance(value, str | int) else ""
    if not _is_number(text):
        return None
    seconds = int(text)
    if seconds > 253402300799:  # past 9999-12-31: not a time anyone meant
        return None
    return datetime.fromtimestamp(seconds, UTC)


def _as_bot_id(value: Any) -> int | None:
    if type(value) is str:  # nearly always (forms carry text): `_is_number` inline
        return int(value) if len(value) <= 18 and value.isascii() and value.isdigit() else None
    if value is None:
        return None
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    return int(text) if _is_number(text) else None


def _is_number(text: str) -> bool:
    """1 to 18 ASCII digits (`isdigit` alone would take any script's digits)."""
    return len(text) <= 18 and text.isascii() and text.isdigit()


def bot_ids(data: Any) -> tuple[int, ...]:
    """Every bot a delivery names, in first-mention order.

    v1: `data.BOT_ID`, the keys and `BOT_ID`s of `data.BOT`, `data.COMMAND[*].BOT_ID`,
    `data.PARAMS.BOT_ID` (joins); v2: `data.bot.id`.
    """
    if not isinstance(data, dict):
        return ()
    found: list[int] = []  # runs for every delivery: no id-less lookups are called
    value = data.get("BOT_ID")
    if value is not None and (number := _as_bot_id(value)) is not None:
        found.append(number)
    bots = data.get("BOT")
    if isinstance(bots, dict):
        for key, entry in bots.items():
            if (number := _as_bot_id(key)) is not None:
                found.append(number)
            if isinstance(entry, dict) and (value := entry.get("BOT_ID")) is not None \
                    and (number := _as_bot_id(value)) is not None:
                found.append(number)
    commands = data.get("COMMAND")
    if isinstance(commands, dict):
        for entry in commands.values():
            if isinstance(entry, dict) and (value := entry.get("BOT_ID")) is not None \
                    and (number := _as_bot_id(value)) is not None:
                found.append(number)
    params = data.get("PARAMS")
    if isinstance(params, dict) and (value := params.get("BOT_ID")) is not None \
            and (number := _as_bot_id(value)) is not None:
        found.append(number)
    bot = data.get("bot")
    if isinstance(bot, dict) and (value := bot.get("id")) is not None \
            and (number := _as_bot_id(value)) is not None:
        found.append(number)
    if len(found) == 2 and found[0] == found[1]:  # a bot's key and its BOT_ID: most deliveries
        return (found[0],)
    return tuple(dict.fromkeys(found))
