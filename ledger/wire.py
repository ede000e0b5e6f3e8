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

import codecs
import re
from collections.abc import Mapping
from functools import lru_cache
from operator import itemgetter
from typing import Any, TypeAlias, cast
from urllib.parse import quote_plus, unquote_to_bytes

import orjson

from ledger.caches import KeyCache
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
    """An upper bound of the key text the caches hold (a test and the metrics read it): a
    decoded key or key path entry holds a key and its decoding (each at most
    `CACHED_KEY_BYTES`); a plan or shape entry its key and up to four copies of the key's
    text (prefix, parents, leaf, full path), each at most `_PLANNED_KEY_BYTES`."""
    decoded = _decoded_short_key.cache_info().currsize + _short_key_path.cache_info().currsize
    planned = len(_PLANS) + len(_SHAPES)
    return decoded * 2 * CACHED_KEY_BYTES + planned * 5 * _PLANNED_KEY_BYTES


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
    """Decode a form body exactly as PHP's `parse_str` would, into ordered string-keyed dicts.

    The fast path (`_parse_fast`) answers every ordinary body; whenever it is not sure — an
    excess, a malformed escape, text that is not UTF-8, `[]`, a value replacing an array — it
    hands the body to the exact, field-by-field decoder, which raises what PHP's rules and our
    budgets say, in the order they say it.
    """
    budget = max_fields if max_segments is None else max_segments
    document = _parse_fast(body, max_fields, max_nesting, budget)
    if document is None:
        document = _parse_exact(body, max_fields, max_nesting, budget)
    return document


def _parse_exact(body: bytes, max_fields: int, max_nesting: int, budget: int) -> Document:
    """PHP's algorithm field by field, every check in PHP's order (the reference behaviour)."""
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


# ---- the fast path ---------------------------------------------------------------------------
#
# A key's *plan* says where its value goes: (depth, brackets, prefix, parents, leaf, full)
# - depth: how deep the key counts against `max_nesting` — the larger of its `[` count and the
#   turns PHP's key parser takes; `_UNPLANNED` for a key with `[]` or `[ ]` (the next free
#   index is the exact decoder's business);
# - brackets: the key's `[` count (the segment budget);
# - prefix / full: the parent's and the value's path joined with NUL (no decoded key holds one),
#   naming the containers of one body; `_DROPPED` as the prefix of a key PHP drops (no name).
# Plans are cached by the raw key (a hit costs one dict lookup) and, behind that, by the key's
# *shape* (digit runs taken out), so the bot and message ids inside keys do not make every
# delivery a miss. Both caches are bounded in entries and, by admitting short keys only, bytes.

_Plan: TypeAlias = tuple[int, int, str, tuple[str, ...], str, str]
_UNPLANNED = 1 << 30
_DEPTH = itemgetter(0)
_BRACKETS = itemgetter(1)
_DROPPED = "\0"  # no container is named so: names are never empty here, so no id starts so
_DIGITS = re.compile(r"[0-9]+")
_SLOT = "\0"  # stands for a digit run in a shape; decoded keys are cut at their first NUL
_CACHE_GENERATION = 8192  # entries per generation; two generations per cache
_PLANNED_KEY_BYTES = 128  # Bitrix24's longest keys are ~60 bytes; a plan holds ~4x its key

_PLANS = KeyCache(_CACHE_GENERATION)  # raw key bytes -> plan
_SHAPES = KeyCache(_CACHE_GENERATION // 4)  # key with digit runs as _SLOT -> plan with slots


def _parse_fast(body: bytes, max_fields: int, max_nesting: int, budget: int) -> Document | None:
    """The whole body at C speed where PHP's rules allow it; None means "ask the exact decoder"."""
    planned = _planned(body, max_fields, max_nesting, budget)
    if planned is None:
        return None
    return _built(*planned)


def _planned(
    body: bytes, max_fields: int, max_nesting: int, budget: int
) -> tuple[list[_Plan], list[str]] | None:
    """Every field's plan and decoded value, or None when the exact decoder must decide.

    Keys: cached plans. Values: percent-decoded all at once (one `escape_decode` over the joined
    values) and checked as UTF-8 once. Every budget is checked on totals: they only grow, so a
    total within budget never passed it on the way.
    """
    pairs = body.split(b"&")
    if b"" in pairs:
        pairs = [pair for pair in pairs if pair]  # php_strtok_r skips empty tokens
    if len(pairs) > max_fields:
        return None
    parts = [pair.partition(b"=") for pair in pairs]
    # no promotion from the old generation: a plan in use there is made again once it ages out
    young, old = _PLANS.young.get, _PLANS.old.get
    found: list[_Plan | None] = [young(part[0]) or old(part[0]) for part in parts]
    if None in found:  # a key not planned lately: plan it, counting the budget on the way
        segments = 0
        for i, plan in enumerate(found):
            if plan is None:
                plan = _plan_of(parts[i][0], max_nesting, budget - segments)
                if plan is None:
                    return None
                found[i] = plan
            segments += min(plan[1], max_nesting + 1)
    plans = cast(list[_Plan], found)
    if not parts:
        return plans, []
    if max(map(_DEPTH, plans)) > max_nesting or sum(map(_BRACKETS, plans)) > budget:
        return None
    values = decoded_values([part[2] for part in parts])
    if values is None:
        return None
    return plans, values


def planned_form(
    body: bytes, *, max_fields: int, max_nesting: int
) -> tuple[list[tuple[int, int, str, tuple[str, ...], str, str]], list[str]] | None:
    """The fast path's plans and values of a form (None: only the exact decoder can say); with
    `built_form`, what `parse_php_form` does on its fast path (the one-pass decoder's templates
    are made from them)."""
    return _planned(body, max_fields, max_nesting, max_fields)


def built_form(
    plans: list[tuple[int, int, str, tuple[str, ...], str, str]], values: list[str]
) -> Document | None:
    """The document `planned_form`'s plans make of `values` (None: the exact decoder decides)."""
    return _built(plans, values)


def _built(plans: list[_Plan], values: list[str]) -> Document | None:
    """The document, in plain dicts, found by their path (None: a value replaces an array)."""
    root: Document = {}
    containers: dict[str, Document] = {"": root}
    for (_, _, prefix, parents, leaf, full), value in zip(plans, values, strict=True):
        parent = containers.get(prefix)
        if parent is None:
            if prefix == _DROPPED:
                continue
            parent = _open(root, containers, parents)
        if full in containers:
            return None  # a value replacing an array: PHP's order matters, ask the exact decoder
        parent[leaf] = value
    return root


def _open(root: Document, containers: dict[str, Document], parents: tuple[str, ...]) -> Document:
    """The container at `parents`, made as `_register` makes it (a scalar in the way is
    replaced in place, so the key keeps its first position)."""
    node = root
    for depth, name in enumerate(parents):
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
            containers[_SLOT.join(parents[: depth + 1])] = child
        node = child
    return node


def _plan_of(raw_key: bytes, max_nesting: int, budget_left: int) -> _Plan | None:
    """A key's plan, from the shape cache or worked out (None: the exact decoder decides)."""
    try:
        key = _decode_key(raw_key)
    except DeliveryRejected:
        return None
    brackets = key.count("[")
    if min(brackets, max_nesting + 1) > budget_left:
        return None  # past the segment budget: parse nothing more
    numbers = _DIGITS.findall(key)
    shape = _DIGITS.sub(_SLOT, key) if numbers else key
    template: _Plan | None = _SHAPES.get(shape) if len(shape) <= _PLANNED_KEY_BYTES else None
    if template is None:
        template = _parse_plan(shape, brackets, max_nesting)
        if template is None:
            return None
        if len(shape) <= _PLANNED_KEY_BYTES:
            _SHAPES.put(shape, template)
    plan = _filled(template, numbers) if numbers else template
    if len(raw_key) <= _PLANNED_KEY_BYTES:
        _PLANS.put(raw_key, plan)
    return plan


def _parse_plan(key: str, brackets: int, max_nesting: int) -> _Plan | None:
    """`_find_key_path` without raising: the same walk, counting its turns (None: too deep)."""
    key = key.lstrip(" ")
    bracket = key.find("[")
    base = key if bracket < 0 else key[:bracket]
    base = base.replace(" ", "_").replace(".", "_")
    if not base:
        return (brackets, brackets, _DROPPED, (), "", "")
    if bracket < 0:
        return _plan(False, brackets, 0, (base,))
    names: list[str] = [base]
    append = False
    levels = 0
    rest = key[bracket:]
    while True:
        levels += 1
        if levels > max_nesting:
            return None
        close = rest.find("]", 1)
        if close < 0:
            if len(names) == 1:
                return _plan(False, brackets, levels,
                             (base + "_" + re.sub(r"[ .\[]", "_", rest[1:]),))
            break
        index = rest[1:close]
        if index in _APPEND_INDICES:
            append = True
        names.append(index)
        rest = rest[close + 1 :]
        if not rest.startswith("["):
            break
    return _plan(append, brackets, levels, tuple(names))


def _plan(append: bool, brackets: int, levels: int, names: tuple[str, ...]) -> _Plan:
    return _made(_UNPLANNED if append else max(brackets, levels), brackets, names)


def _made(depth: int, brackets: int, names: tuple[str, ...]) -> _Plan:
    parents = names[:-1]
    return (depth, brackets, _SLOT.join(parents), parents, names[-1], _SLOT.join(names))


def _filled(template: _Plan, numbers: list[str]) -> _Plan:
    """A shape's plan with the key's own digit runs put back, in key order."""
    depth, brackets, _, parents, leaf, _ = template
    if not leaf:  # a dropped key (every other plan has a leaf name)
        return template
    taken = iter(numbers)
    names = tuple(
        name if _SLOT not in name
        else "".join(part if i == 0 else next(taken) + part
                     for i, part in enumerate(name.split(_SLOT)))
        for name in (*parents, leaf)
    )
    return _made(depth, brackets, names)


def decoded_values(raw: list[bytes]) -> list[str] | None:
    """`urldecode` and UTF-8 of every value at once: joined by U+0000, decoded, split again.
    None when the exact decoder must decide: a `%` without two hex digits (PHP keeps it as it
    is), text that is not UTF-8 — or U+0000 in a value (raw or `%00`: the split then gives
    more values than went in), which no delivery may carry anyway (the one-pass decoder's
    templates rely on this: a value they place never holds one)."""
    if not raw:
        return []
    joined = b"\0".join(raw)
    if b"+" in joined:
        joined = joined.replace(b"+", b" ")
    if b"%" in joined:
        if b"\\" in joined:
            joined = joined.replace(b"\\", b"\\\\")
        try:
            joined = codecs.escape_decode(joined.replace(b"%", b"\\x"))[0]
        except ValueError:  # `%` without two hex digits, which PHP keeps as it is: so does
            return None  # the exact decoder (only backslashes and `\x` can be escapes here)
    try:
        values = joined.decode("utf-8").split("\0")
    except UnicodeDecodeError:
        return None
    return values if len(values) == len(raw) else None


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
    if not query:
        return {}  # what the decoder makes of no fields (most deliveries have no query)
    try:
        raw = query.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise DeliveryRejected(400, "invalid_utf8", "the query string is not valid UTF-8") from exc
    return parse_php_form(raw, max_fields=max_fields, max_nesting=max_nesting)


_UNSAFE = re.compile(r"[\x00\ud800-\udfff]")  # escapes: mypyc refuses surrogate literals
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
    elif value.isascii() and "\0" not in value:  # a peer, Bitrix24's content type: as it is
        return value
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
