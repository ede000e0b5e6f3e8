"""Bitrix24's wire format: PHP `http_build_query` form bodies and JSON bodies.

Pure code, no I/O. The decoder reproduces PHP's `parse_str` (php_default_treat_data +
php_register_variable_ex) because that is the decoder Bitrix24's own bodies are written for; the
committed fixtures under `tests/fixtures/php/` hold what PHP itself produced. PHP arrays are ordered
maps, so every bracketed level decodes to a `dict` with string keys in arrival order — numeric keys
(`BOT[567]`, `departments[0]`) stay string keys; guessing lists would lose information.

Deliberate differences from PHP, all of which turn silent loss into a clear rejection:
- PHP silently drops fields past `max_input_vars` (1000) or nesting past 64; we reject (413/400).
- PHP accepts invalid UTF-8; we reject it, because the store keeps text, not bytes.

Decoding is bounded before it costs much, because it runs before anyone is authenticated: fields
(`max_fields`), depth (`max_nesting`) and the total number of bracket levels over all keys
(`max_segments`, default `max_fields`: each level is a container to find or build) are
counted as the body is read and refused at the first excess; JSON depth and size are measured
without recursion. The decoded-key caches hold only short keys, so their size is bounded in bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, TypeAlias
from urllib.parse import quote_plus, unquote_to_bytes

import orjson

from ledger.errors import DeliveryRejected

JsonValue: TypeAlias = Any
Document: TypeAlias = dict[str, Any]

_PHP_INT_KEY = re.compile(r"^(0|-?[1-9][0-9]*)\Z")
_PHP_LONG_MAX = 2**63 - 1

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


class _PhpArray(dict[str, Any]):
    """An ordered PHP array under construction; remembers the next `[]` index like PHP does.

    PHP starts `nNextFreeElement` at LONG_MIN (so the first append is 0) and moves it past every
    integer key inserted at or above it — negative ones included (`[-5]` then `[]` gives -4).
    """

    __slots__ = ("next_index",)

    def __init__(self) -> None:
        super().__init__()
        self.next_index: int | None = None

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        if _PHP_INT_KEY.match(key):
            number = int(key)
            if -_PHP_LONG_MAX - 1 <= number <= _PHP_LONG_MAX and (
                self.next_index is None or number >= self.next_index
            ):
                self.next_index = min(number + 1, _PHP_LONG_MAX)

    def append(self, value: Any) -> bool:
        """Add at the next free index; False (nothing added) where PHP's append fails: the next
        index is stuck at PHP_INT_MAX and that key is taken."""
        key = str(self.next_index if self.next_index is not None else 0)
        if key in self:
            return False
        self.put(key, value)
        return True


def _url_decode(raw: bytes) -> bytes:
    """PHP `urldecode`: `+` is a space, `%XX` is a byte, a malformed `%` stays as it is."""
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" in raw:
        raw = unquote_to_bytes(raw)  # keeps malformed escapes, exactly like PHP
    return raw


CACHED_KEY_BYTES = 256  # longer keys are decoded every time: caches stay below ~8192 x 1 KiB
_CACHE_ENTRIES = 8192


def _decoded_key(raw: bytes) -> str:
    """A key as PHP sees it: URL-decoded, cut at the first NUL (C strings).

    Bitrix24 repeats the same few hundred short keys in every body, so short keys are cached;
    a long key (only a hostile sender makes one) is never kept.
    """
    if len(raw) <= CACHED_KEY_BYTES:
        return _decoded_short_key(raw)
    return _decode_key(raw)


def _decode_key(raw: bytes) -> str:
    return _text(_url_decode(raw).split(b"\0", 1)[0], "a form key")


_decoded_short_key = lru_cache(maxsize=_CACHE_ENTRIES)(_decode_key)


def cached_key_bytes() -> int:
    """An upper bound of the key bytes the caches hold (a test and the metrics read it)."""
    entries = _decoded_short_key.cache_info().currsize + _short_key_path.cache_info().currsize
    return entries * CACHED_KEY_BYTES


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeliveryRejected(
            400, "invalid_utf8", f"{what} is not valid UTF-8 (byte {exc.start})"
        ) from exc


def parse_php_form(
    body: bytes, *, max_fields: int, max_nesting: int, max_segments: int | None = None
) -> Document:
    """Decode a form body exactly as PHP's `parse_str` would, into ordered string-keyed dicts."""
    budget = max_fields if max_segments is None else max_segments
    root = _PhpArray()
    fields = 0
    segments = 0
    for pair in body.split(b"&"):
        if not pair:
            continue  # php_strtok_r skips empty tokens
        fields += 1
        if fields > max_fields:
            raise DeliveryRejected(
                413, "too_many_fields", f"more than {max_fields} form fields in one body"
            )
        raw_key, sep, raw_value = pair.partition(b"=")
        key = _decoded_key(raw_key)
        segments += min(key.count("["), max_nesting + 1)
        if segments > budget:
            raise DeliveryRejected(
                413, "too_complex", f"more than {budget} bracket levels over all form keys"
            )
        value = _text(_url_decode(raw_value), "a form value") if sep else ""
        _register(root, key, value, max_nesting)
    document: Document = _freeze(root)
    return document


def _key_path(key: str, max_nesting: int) -> tuple[str, tuple[str | None, ...]] | None:
    """Where a (decoded) key puts its value: the base name and the bracket indices (None for `[]`).

    Short keys repeat in every body: cached (long ones are not kept).
    """
    if len(key) <= CACHED_KEY_BYTES:
        return _short_key_path(key, max_nesting)
    return _find_key_path(key, max_nesting)


# PHP skips one isspace() byte after `[` before looking for `]`: `a[ ]` appends like `a[]`
_APPEND_INDICES = frozenset({"", " ", "\t", "\n", "\r", "\v", "\f"})


def _find_key_path(key: str, max_nesting: int) -> tuple[str, tuple[str | None, ...]] | None:
    key = key.lstrip(" ")
    bracket = key.find("[")
    base = key if bracket < 0 else key[:bracket]
    base = base.replace(" ", "_").replace(".", "_")
    if not base:
        return None
    if bracket < 0:
        return base, ()
    indices: list[str | None] = []
    rest = key[bracket:]  # starts with '['
    while True:
        if len(indices) >= max_nesting:
            raise DeliveryRejected(
                400, "too_deep", f"form key nests deeper than {max_nesting} levels"
            )
        close = rest.find("]", 1)
        if close < 0:
            if not indices:
                # no closing bracket: PHP un-terminates the name and mangles the remainder
                return base + "_" + re.sub(r"[ .\[]", "_", rest[1:]), ()
            break  # deeper unterminated index: PHP ignores the rest of the key
        index = rest[1:close]
        indices.append(None if index in _APPEND_INDICES else index)
        rest = rest[close + 1 :]
        if not rest.startswith("["):
            break  # anything after `]` that is not `[` is ignored, as PHP does
    return base, tuple(indices)


_short_key_path = lru_cache(maxsize=_CACHE_ENTRIES)(_find_key_path)


def _register(root: _PhpArray, key: str, value: str, max_nesting: int) -> None:
    """php_register_variable_ex, for a result array (no globals, no `this` special cases)."""
    path = _key_path(key, max_nesting)
    if path is None:
        return
    base, indices = path
    container = root
    name: str | None = base
    for next_name in indices:
        if name is None:
            child = _PhpArray()
            if not container.append(child):
                return  # PHP drops the whole field when an append on its path fails
        else:
            existing = container.get(name)
            if isinstance(existing, _PhpArray):
                child = existing
            else:
                child = _PhpArray()
                container.put(name, child)
        container = child
        name = next_name
    if name is None:
        container.append(value)
    else:
        container.put(name, value)


def _freeze(value: Any) -> Any:
    if isinstance(value, _PhpArray):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def parse_json(body: bytes, *, max_nesting: int, max_fields: int | None = None) -> Document:
    """Decode a JSON body; it must be an object, no deeper than `max_nesting` below the top and
    with at most `2 * max_fields` values in all (as a form of `max_fields` fields could be)."""
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc):  # orjson stops at 1024 levels
            raise DeliveryRejected(
                400, "too_deep", f"JSON nests deeper than {max_nesting} levels"
            ) from exc
        raise DeliveryRejected(400, "malformed_json", f"body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise DeliveryRejected(400, "malformed_json", "a JSON body must be an object")
    _check_shape(document, max_nesting + 1, None if max_fields is None else 2 * max_fields)
    return document


def _check_shape(document: Any, max_depth: int, max_values: int | None) -> None:
    """Depth and size of a decoded JSON document, measured with a stack (no recursion)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    values = 0
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise DeliveryRejected(
                400, "too_deep", f"JSON nests deeper than {max_depth - 1} levels"
            )
        children = node.values() if isinstance(node, dict) else node
        values += len(children)
        if max_values is not None and values > max_values:
            raise DeliveryRejected(
                413, "too_many_fields", f"more than {max_values} values in one JSON body"
            )
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lower-cased."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(
    body: bytes, content_type: str | None, *, max_fields: int, max_nesting: int
) -> Document:
    """Decode a delivery body by its media type; anything but form or JSON is refused."""
    kind = media_type(content_type)
    if kind == FORM:
        return parse_php_form(body, max_fields=max_fields, max_nesting=max_nesting)
    if kind == JSON:
        return parse_json(body, max_nesting=max_nesting, max_fields=max_fields)
    raise DeliveryRejected(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not accepted; send {FORM} or {JSON}",
    )


def parse_query(query: str, *, max_fields: int, max_nesting: int) -> Document:
    """The handler URL's raw query string (Bitrix24 appends `CLIENT_ID`), decoded like a form.

    The HTTP server hands raw bytes over as surrogate escapes; they go back to bytes here, so a
    query that is not UTF-8 is refused like a body that is not.
    """
    try:
        raw = query.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise DeliveryRejected(400, "invalid_utf8", "the query string is not valid UTF-8") from exc
    return parse_php_form(raw, max_fields=max_fields, max_nesting=max_nesting)


_UNSAFE = re.compile("[\x00\ud800-\udfff]")
MAX_HEADER_TEXT = 256


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte the HTTP server could not decode (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: str | None, limit: int = MAX_HEADER_TEXT) -> str | None:
    """A header (or other wire text) made safe to record: at most `limit` characters (a longer
    one is cut and marked with `…`), every undecodable byte, lone surrogate and U+0000 written
    as a `\\xNN` / `\\uNNNN` escape — JSON and PostgreSQL text can hold the result."""
    if value is None:
        return None
    if len(value) > limit:
        value = value[:limit] + "…"
    return _UNSAFE.sub(_escaped, value)


def http_build_query(document: Mapping[str, JsonValue]) -> bytes:
    """PHP `http_build_query` (RFC 1738 flavour) — what Bitrix24 sends. Used by the simulator.

    `None` values and empty containers vanish, booleans become "1"/"0", as in PHP.
    """
    parts: list[str] = []

    def encode(prefix: str, value: JsonValue) -> None:
        if value is None:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                encode(f"{prefix}[{k}]", v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                encode(f"{prefix}[{i}]", v)
        else:
            text = ("1" if value else "0") if isinstance(value, bool) else str(value)
            parts.append(f"{_php_urlencode(prefix)}={_php_urlencode(text)}")

    for key, value in document.items():
        encode(str(key), value)
    return "&".join(parts).encode("ascii")


def _php_urlencode(text: str) -> str:
    # PHP urlencode keeps only [A-Za-z0-9_.-]; Python's quote_plus also keeps '~'
    return quote_plus(text, safe="").replace("~", "%7E")
