"""What the fold reads of one event's payload — its fold record — computed once, at intake.

The fold (`ledger.projections.fold`) needs a handful of facts from a payload: the portal's
domain, the acting user, the application version, a trust change, the bot codes by bot id,
and notes on whatever it could not use. Reading them means parsing the whole payload, which was
most of a rebuild's cost; so the draft builder computes them here, once, from the document it
already holds, and the store keeps them beside the event (`ledger.events.fold_record`, migration
0011). A rebuild and `as_of` then read the record and never parse the payload — except for
events stored before the record existed (or with a record of another `VERSION`), which fall
back to `fold_record(payload)`: the same function, so the two paths cannot disagree.

The record is derived, not history: it is outside the chain hash, like the projections, and
`ledger verify --projections` recomputes it from the payload for every event and names the
first position whose stored record differs (docs/spec/chain.md, "Fold records").

Pure code, total: whatever a payload holds, `fold_record` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from ledger.asof import INT64_MAX, strict_int64
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.models import ORIGIN_BITRIX24, TRUST_EVENT

VERSION = 1  # bump when what the fold reads changes: records of another version are not used

_MAX_SHOWN = 40  # characters of a sender's key or type name quoted in a note
_LIFECYCLE = (INSTALL, UPDATE, UNINSTALL)


_NO_CODES: Mapping[int, str] = MappingProxyType({})


class FoldRecord(NamedTuple):
    """The facts of one payload the fold uses, and notes on what it set aside.

    A named tuple, not a dataclass: a rebuild makes one per event, and this is several times
    cheaper to build. `codes` is never changed once the record is made."""

    domain: str | None = None  # lower-cased
    actor: str | None = None  # auth.user_id
    version: str | None = None  # data.VERSION of lifecycle events
    change: str | None = None  # of the ledger's own trust events
    codes: Mapping[int, str] = _NO_CODES  # bot code by bot id
    notes: tuple[str, ...] = ()


def fold_record(event_type: str, origin: str, payload: Any) -> FoldRecord:
    """The record of one event (`payload`: the parsed JSON document, any value)."""
    reader = _Reader()
    return reader.read(event_type, origin, payload)


def stored(event_type: str, origin: str, payload: Any) -> str:
    """`fold_record` as the text the store keeps (what the draft carries)."""
    text = _ordinary(event_type, origin, payload)
    return encode(fold_record(event_type, origin, payload)) if text is None else text


_Unusual = ValueError  # raised inside `_ordinary`: the reader (and its notes) decides


def _text_of(value: Any) -> str | None:
    """`_Reader.text` of a value that makes no note (`_Unusual` for any other)."""
    if value is None or value == "":
        return None
    if type(value) is str and "\x00" not in value:
        return value
    raise _Unusual


def _ordinary(event_type: str, origin: str, payload: Any) -> str | None:
    """`stored` of a payload whose record has no notes, read in one go — nearly every
    delivery's, at intake (the reader took ~5 µs of a draft); None for anything else, which
    the reader then reads (tests/test_fold_records.py holds both to the same text)."""
    if type(payload) is not dict or (event_type == TRUST_EVENT and origin != ORIGIN_BITRIX24):
        return None
    try:
        auth = payload.get("auth")
        if auth is not None and type(auth) is not dict:
            return None
        domain = _text_of(auth.get("domain")) if auth else None
        if domain is None and (auth is None or "domain" not in auth):
            domain = _text_of(payload.get("domain"))
        actor = None if auth is None else _text_of(auth.get("user_id"))
        version = None
        codes: dict[int, str] = {}
        data = payload.get("data")
        if data is not None:
            if type(data) is not dict:
                return None
            if event_type in _LIFECYCLE:
                version = _text_of(data.get("VERSION"))
            _ordinary_codes(data, codes)
    except _Unusual:
        return None
    flat: list[int | str] = []
    for bot_id, code in codes.items():
        flat += (bot_id, code)
    return orjson.dumps([VERSION, domain.lower() if domain else None, actor, version, None,
                         flat, []]).decode()


def _bot_id(value: Any) -> int:
    """`strict_int64` of a value that makes no note (`_Unusual` for any other)."""
    if type(value) is str and len(value) <= 19 and value.isascii() and value.isdigit():
        number = int(value)  # (1 to 19 ASCII digits: what `strict_int64` takes of a text)
        if number <= INT64_MAX:
            return number
        raise _Unusual
    parsed = strict_int64(value)
    if parsed is None:
        raise _Unusual
    return parsed


def _ordinary_code(bot_id: Any, code: Any, codes: dict[int, str]) -> None:
    text = _text_of(code)
    if bot_id is None or bot_id == "":
        return
    parsed = _bot_id(bot_id)
    if text and parsed not in codes:
        codes[parsed] = text


def _ordinary_codes(data: dict[str, Any], codes: dict[int, str]) -> None:
    """`_Reader.bot_codes` where it makes no note (`_Unusual` where it would)."""
    if "BOT_ID" in data:
        _ordinary_code(data.get("BOT_ID"), data.get("BOT_CODE"), codes)
    entries = data.get("BOT")
    if entries is not None:
        if type(entries) is not dict:
            raise _Unusual
        for key, item in entries.items():
            key_id = _bot_id(key)
            if item is None:
                continue
            if type(item) is not dict:
                raise _Unusual
            if "BOT_ID" in item:
                _ordinary_code(item.get("BOT_ID"), item.get("BOT_CODE"), codes)
            else:
                _ordinary_code(key_id, item.get("BOT_CODE"), codes)
    entries = data.get("COMMAND")
    if entries is not None:
        if type(entries) is not dict:
            raise _Unusual
        for item in entries.values():
            if item is None:
                continue
            if type(item) is not dict:
                raise _Unusual
            if "BOT_ID" in item:
                _ordinary_code(item.get("BOT_ID"), item.get("BOT_CODE"), codes)
    bot = data.get("bot")
    if bot is not None:
        if type(bot) is not dict:
            raise _Unusual
        _ordinary_code(bot.get("id"), bot.get("code"), codes)


def encode(record: FoldRecord) -> str:
    """Compact JSON: `[VERSION, domain, actor, version, change, codes, notes]`, the codes as
    one flat list `[bot_id, code, …]` — an array, because a rebuild decodes one per event and
    an array is the cheapest JSON to read back (`decode`)."""
    codes: list[int | str] = []
    for bot_id, code in record.codes.items():
        codes += (bot_id, code)
    return orjson.dumps([VERSION, record.domain, record.actor, record.version, record.change,
                         codes, list(record.notes)]).decode()


def decode(text: str) -> FoldRecord | None:
    """The record `encode` wrote — or None for anything else (another version, or a text that
    is not a well-formed record): the caller then reads the payload instead.

    Written for speed (a rebuild decodes one per event): type checks inline, no helpers."""
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if type(items) is not list or len(items) != 7:
        return None
    v, domain, actor, version, change, pairs, notes = items
    if type(v) is not int or v != VERSION or type(pairs) is not list \
            or type(notes) is not list:
        return None
    if not ((domain is None or (type(domain) is str and domain))
            and (actor is None or (type(actor) is str and actor))
            and (version is None or (type(version) is str and version))
            and (change is None or (type(change) is str and change))):
        return None
    codes: Mapping[int, str] = _NO_CODES
    if len(pairs) == 2:  # one bot: nearly every event
        if type(pairs[0]) is not int or type(pairs[1]) is not str:
            return None
        codes = {pairs[0]: pairs[1]}
    elif pairs:
        found: dict[int, str] = {}
        for index in range(0, len(pairs) - 1, 2):
            bot_id, code = pairs[index], pairs[index + 1]
            if type(bot_id) is not int or type(code) is not str or bot_id in found:
                return None
            found[bot_id] = code
        if len(found) * 2 != len(pairs):
            return None
        codes = found
    if notes:
        for note in notes:
            if type(note) is not str:
                return None
        notes_ = tuple(notes)
    else:
        notes_ = ()
    # tuple.__new__ skips the named tuple's generated __new__ (a Python frame per event)
    return tuple.__new__(FoldRecord, (domain, actor, version, change, codes, notes_))


# ---- reading a payload, defensively ---------------------------------------------------------


def _shown(key: Any) -> str:
    text = ascii(key)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean",
            type(None): "null", float: "a number", int: "a number"}.get(type(value), "a value")


# where in the payload a value was: a fixed path, or (prefix, sender's key, suffix) — formatted
# only when a note needs it (`_shown` of every key of every delivery would cost the intake)
_Path = str | tuple[str, Any, str]


def _render(path: _Path, suffix: str = "") -> str:
    if isinstance(path, str):
        return path + suffix
    return f"{path[0]}.{_shown(path[1])}{path[2]}{suffix}"


class _Reader:
    """One payload's facts, with a note for each thing it could not use."""

    __slots__ = ("codes", "notes")

    def __init__(self) -> None:
        self.codes: dict[int, str] = {}
        self.notes: list[str] = []

    def note(self, path: _Path, problem: str, suffix: str = "") -> None:
        self.notes.append(f"{_render(path, suffix)}: {problem}")

    def text(
        self, path: _Path, value: Any, *, numbers: bool = False, suffix: str = ""
    ) -> str | None:
        """Text fit for a text column: a non-empty string without NUL (or, where Bitrix24
        sends numbers, an integer); anything else present is noted."""
        if value is None or value == "":
            return None
        if numbers and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and "\x00" not in value:
            return value
        self.note(path, f"{_kind(value)} where text belongs" if not isinstance(value, str)
                  else "text with a NUL character", suffix)
        return None

    def object(self, path: _Path, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if isinstance(value, dict):
            return value
        self.note(path, f"{_kind(value)} where an object belongs")
        return None

    def read(self, event_type: str, origin: str, payload: Any) -> FoldRecord:
        if not isinstance(payload, dict):
            self.note("payload", f"{_kind(payload)} where an object belongs")
            return FoldRecord(notes=tuple(self.notes))
        auth = self.object("auth", payload.get("auth"))
        domain = self.text("auth.domain", auth.get("domain")) if auth else None
        if domain is None and (auth is None or "domain" not in auth):
            domain = self.text("domain", payload.get("domain"))
        actor = self.text("auth.user_id", auth.get("user_id"), numbers=True) \
            if auth is not None else None
        change = self.text("change", payload.get("change")) \
            if event_type == TRUST_EVENT and origin != ORIGIN_BITRIX24 else None
        version = None
        data = self.object("data", payload.get("data"))
        if data is not None:
            if event_type in _LIFECYCLE:
                version = self.text("data.VERSION", data.get("VERSION"), numbers=True)
            self.bot_codes(data)
        return FoldRecord(domain.lower() if domain else None, actor, version, change,
                          self.codes or _NO_CODES,
                          tuple(self.notes))

    def bot_code(self, path: _Path, bot_id: Any, code: Any) -> None:
        text = self.text(path, code, suffix=".code")
        if bot_id is None or bot_id == "":
            return
        parsed = strict_int64(bot_id)
        if parsed is None:
            self.note(path, f"{_shown(bot_id)} is not a bot id (ASCII digits, int64)")
        elif text:
            self.codes.setdefault(parsed, text)

    def bot_codes(self, data: dict[str, Any]) -> None:
        """Bot codes by bot id, from every place a v1 or v2 payload names a bot."""
        if "BOT_ID" in data:
            self.bot_code("data.BOT_ID", data.get("BOT_ID"), data.get("BOT_CODE"))
        for group, prefix in (("BOT", "data.BOT"), ("COMMAND", "data.COMMAND")):
            entries = self.object(prefix, data.get(group))
            for key, entry in (entries or {}).items():
                path = (prefix, key, "")
                item = self.object(path, entry)
                key_id = strict_int64(key) if group == "BOT" else None
                if group == "BOT" and key_id is None:
                    self.note(path, f"key {_shown(key)} is not a bot id (ASCII digits, int64)")
                if item is None:
                    continue
                if "BOT_ID" in item:
                    self.bot_code((prefix, key, ".BOT_ID"), item.get("BOT_ID"),
                                  item.get("BOT_CODE"))
                elif key_id is not None:
                    self.bot_code(path, key, item.get("BOT_CODE"))
        bot = self.object("data.bot", data.get("bot"))
        if bot is not None:
            self.bot_code("data.bot.id", bot.get("id"), bot.get("code"))
