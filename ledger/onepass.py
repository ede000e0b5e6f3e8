"""One pass over a form body: the document, its scrubbed views and its redactions, by template.

Pure code. Bitrix24 sends a few dozen kinds of body, each with the same keys in the same order
(the bot ids inside keys make a few hundred key sequences per installation). Everything that
depends only on the keys — where each value goes (PHP's `parse_str`, `ledger.wire`), which values
`redaction.scrub` removes and under which path, what the identity view strips, which containers
the views can share — is worked out once per key sequence by running the ordinary decoder and
scrub over placeholder values, and kept as a *template*: one C-level dict construction per
container, or one generated function with a dict display per container. The function is the
*shape*'s (`_Code`: the steps with the keys that hold a digit taken out and passed in), compiled
after `COMPILE_AFTER` runs of all the sequences of that shape — the few hundred sequences bot
ids make are a dozen shapes, so nearly every body meets a compiled one. A body whose key
sequence has a template costs a split, one decoding call over all its values and a dict per
container (its application token hashed once, for its fingerprint and the envelope); everything
else (a sequence seen for the first time, U+0000 in a value, whatever the fast decoder hands to
the exact one) takes the ordinary path, whose result the template only replays (the
differential test, `tests/test_onepass.py`, holds both to the frozen reference).

The templates live as long as the process and are fed by senders, so they are bounded: a sequence
gets one only when it is seen a second time (a sender inventing keys pays the ordinary path, not a
template per body), only short sequences get one (`MAX_TEMPLATE_FIELDS`,
`MAX_TEMPLATE_KEY_BYTES`), and the cache holds at most two generations of `_GENERATION` in
weight (fields and containers: a measure of a template's memory); the shapes likewise (one per
template at most). A compile needs `COMPILE_AFTER` runs of one shape: at most one per 64
bodies, whatever keys a sender invents.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from hashlib import sha256
from operator import itemgetter
from typing import Any, cast

from ledger import redaction, wire
from ledger.caches import KeyCache
from ledger.identity import DELIVERY_SPECIFIC
from ledger.redaction import FINGERPRINT_HEX, Redaction, Scrubbed

Document = dict[str, Any]

MAX_TEMPLATE_FIELDS = 128
MAX_TEMPLATE_KEY_BYTES = 4096  # the raw keys of one sequence (Bitrix24's: ~1.5 KiB)
# A template weighs its fields and containers (Bitrix24's ~60: ~5 KB); a generation holds
# templates of this much weight: ~1000 of Bitrix24's (a busy installation's key sequences
# stay), and both generations at most ~20 MB whatever senders invent (measured with
# tracemalloc: <= ~130 bytes a unit compiled, the worst being 128 one-field containers)
_GENERATION = 65536
COMPILE_AFTER = 64  # runs of a template before it is compiled (~0.5 ms; then ~15% less a draft)

_NOT_SEPARATORS = bytes(b for b in range(256) if b not in b"&=")
_ALTERNATING = b"=&" * MAX_TEMPLATE_FIELDS
_KEY = itemgetter(0)
_VALUE = itemgetter(2)
# a container: its keys, and what picks its values from the slots (at least as many: `zip`
# stops at the last key — `itemgetter` of one index would not make a tuple, so it gets two)
_Step = tuple[tuple[str, ...], Callable[[list[Any]], tuple[Any, ...]]]


class _Code:
    """How the templates of one *shape* build their containers: the steps' structure with the
    keys that hold a digit (bot and message ids: `data[BOT][567]`) left out. Every key sequence
    of a shape (Bitrix24's few hundred sequences are a dozen shapes) counts its runs here and,
    after `COMPILE_AFTER` of them, shares one compiled function, to which each template passes
    its own keys with digits."""

    __slots__ = ("build", "runs", "shape", "values")

    def __init__(self, values: int, shape: tuple[tuple[tuple[str | None, ...], tuple[int, ...]],
                                                 ...]) -> None:
        self.values = values
        self.shape = shape  # per step: its keys (None: a key of the template's `names`), sources
        self.runs = 0
        self.build: Callable[[list[Any], tuple[str, ...]], tuple[Any, ...]] | None = None

    def compile(self) -> None:
        """From now on, build the containers with one function (`_compiled`)."""
        self.build = _compiled(self.shape, self.values)


class _Template:
    """What a key sequence makes of its values.

    `steps` build the containers bottom-up: each appends one dict to the slots (the values
    first, then every container built so far), made of its keys and the slots it names.
    `document`, `redacted` and `stripped` are the slots of the three roots; `removed` the
    redactions, as a path and the slot of the removed value. `code` is its shape's (shared
    with the sequences that differ only in the digits of their keys), `names` the keys the
    compiled function takes from the template.
    """

    __slots__ = ("brackets", "canonical", "code", "depth", "document", "names", "redacted",
                 "removed", "steps", "stripped", "token", "values")

    def __init__(
        self,
        values: int,
        steps: list[_Step],
        code: _Code,
        names: tuple[str, ...],
        roots: tuple[int, int, int],
        removed: list[tuple[tuple[str, ...], int]],
        token: int,
        depth: int,
        brackets: int,
        canonical: bool,
    ) -> None:
        self.canonical = canonical
        self.token = token  # the slot of `auth.application_token` (-1: none, or not text)
        self.steps = steps
        self.code = code
        self.names = names
        self.document, self.redacted, self.stripped = roots
        self.removed = removed
        self.depth = depth
        self.brackets = brackets
        self.values = values  # the slots before the containers: one per field

    def run(self, slots: list[Any]) -> tuple[Document, Scrubbed]:
        code = self.code
        build = code.build
        if build is not None:
            slots.extend(build(slots, self.names))
        else:
            append = slots.append
            for keys, getter in self.steps:
                append(dict(zip(keys, getter(slots), strict=False)))  # (see `_Step`)
            code.runs += 1
            if code.runs == COMPILE_AFTER:
                code.compile()
        texts: dict[str, str] = {}
        token_sha256: bytes | None = None
        if self.token >= 0:  # hashed for its fingerprint and for the envelope at once
            token = slots[self.token]
            token_sha256 = sha256(token.encode()).digest()
            texts[token] = token_sha256.hex()[:FINGERPRINT_HEX]
        records: list[Redaction] = []
        for path, slot in self.removed:
            value = slots[slot]
            if type(value) is str:  # decoded from UTF-8: no surrogates, plain `encode`
                known = texts.get(value)
                if known is None:
                    known = texts[value] = sha256(value.encode()).hexdigest()[:FINGERPRINT_HEX]
            else:
                known = redaction.fingerprint_of(value)
            records.append(Redaction(path, known))
        return slots[self.document], Scrubbed(
            slots[self.redacted], tuple(records), slots[self.stripped], False, self.canonical,
            token_sha256,
        )


_Shape = tuple[tuple[tuple[str | None, ...], tuple[int, ...]], ...]


def _compiled(
    shape: _Shape, values: int
) -> Callable[[list[Any], tuple[str, ...]], tuple[Any, ...]]:
    """The steps as one Python function of the values and the template's keys with digits
    (one dict display per container, the other keys as constants: about twice as fast as the
    steps), returning every container in step order. Made from syntax trees, not source text:
    a sender's key is only ever a constant or an item of the keys passed in."""
    def name(text: str, context: ast.expr_context) -> ast.Name:
        return ast.Name(text, context)

    named = iter(range(1 << 30))

    def key(text: str | None) -> ast.expr:
        return ast.Constant(text) if text is not None else name(f"k{next(named)}", ast.Load())

    function = ast.parse("def build(v, k):\n    pass\n")
    definition = cast(ast.FunctionDef, function.body[0])
    definition.body = [
        ast.Assign([ast.Name(f"s{values + i}", ast.Store())],
                   ast.Dict([key(text) for text in keys],
                            [name(f"s{source}", ast.Load()) for source in sources]))
        for i, (keys, sources) in enumerate(shape)
    ]
    # the values and the keys with digits as locals, each tuple unpacked in one step
    digits = sum(text is None for keys, _ in shape for text in keys)
    for prefix, count, source in (("s", values, "v"), ("k", digits, "k")):
        if count:
            definition.body.insert(0, ast.Assign(
                [ast.Tuple([name(f"{prefix}{i}", ast.Store()) for i in range(count)],
                           ast.Store())],
                name(source, ast.Load())))
    definition.body.append(ast.Return(ast.Tuple(
        [ast.Name(f"s{values + i}", ast.Load()) for i in range(len(shape))], ast.Load())))
    namespace: dict[str, Any] = {}
    code = compile(ast.fix_missing_locations(function), "<onepass template>", "exec")
    exec(code, namespace)  # noqa: S102 - syntax trees of our own; a sender's keys are constants
    return cast(Callable[[list[Any], tuple[str, ...]], tuple[Any, ...]], namespace["build"])


# a key sequence no template can replay (`depth` above every budget: the ordinary path decides)
_NONE = _Template(0, [], _Code(0, ()), (), (0, 0, 0), [], -1, 1 << 62, 0, False)


def _weight(template: _Template) -> int:
    return 1 + template.values + len(template.steps)


def _code_weight(code: _Code) -> int:
    return 1 + code.values + len(code.shape)


_TEMPLATES = KeyCache(_GENERATION, _weight)  # key sequence (tuple of raw keys) -> _Template
# shape -> _Code: as many shapes as templates at most, each weighing what its template does
_CODES = KeyCache(_GENERATION, _code_weight)
_DIGIT = re.compile(r"[0-9]")
_SEEN = KeyCache(2048)  # hash of a key sequence seen once -> True


def decode_form(
    body: bytes, *, max_fields: int, max_nesting: int
) -> tuple[Document, Scrubbed | None]:
    """`wire.parse_php_form` of a form body, and — when a template made it — the body's
    `redaction.scrub(document, DELIVERY_SPECIFIC)` too (None: the caller scrubs).

    Raises exactly what `wire.parse_php_form` raises (it decides every body without a template).
    """
    # `=` and `&` strictly alternating (every field `key=value`, no empty field: Bitrix24's
    # bodies) lets one split cut keys and values apart; anything else is cut field by field
    separators = body.translate(None, _NOT_SEPARATORS)
    fields = (len(separators) + 1) >> 1
    if separators == _ALTERNATING[: 2 * fields - 1] and 0 < fields <= MAX_TEMPLATE_FIELDS:
        cut = body.replace(b"=", b"&").split(b"&")
        keys = tuple(cut[::2])
        raw_values = cut[1::2]
    else:
        pairs = body.split(b"&")
        if b"" in pairs:
            pairs = [pair for pair in pairs if pair]  # php_strtok_r skips empty tokens
        fields = len(pairs)
        if not 0 < fields <= MAX_TEMPLATE_FIELDS:
            return wire.parse_php_form(body, max_fields=max_fields, max_nesting=max_nesting), None
        parts = [pair.partition(b"=") for pair in pairs]
        keys = tuple(map(_KEY, parts))
        raw_values = list(map(_VALUE, parts))
    if fields <= max_fields:
        # one in use moves to the young generation: a busy sequence keeps its template
        template: _Template | None = _TEMPLATES.young.get(keys) or _TEMPLATES.get(keys)
        if template is None:
            made = _made(body, keys, max_fields, max_nesting)
            if made is not None:
                return made
        elif template.depth <= max_nesting and template.brackets <= max_fields:
            values = wire.decoded_values(raw_values)  # (None: U+0000 in a value, or odd)
            if values is not None:
                return template.run(values)
    return wire.parse_php_form(body, max_fields=max_fields, max_nesting=max_nesting), None


def _made(
    body: bytes, keys: tuple[bytes, ...], max_fields: int, max_nesting: int
) -> tuple[Document, Scrubbed | None] | None:
    """A key sequence without a template: the second time it is seen, make one (and use it);
    None means the ordinary path decides."""
    seen = hash(keys)
    if _SEEN.get(seen) is None:
        _SEEN.put(seen, True)
        return None
    if sum(map(len, keys)) > MAX_TEMPLATE_KEY_BYTES:
        return None
    planned = wire.planned_form(body, max_fields=max_fields, max_nesting=max_nesting)
    if planned is None:
        return None
    plans, values = planned
    if any("\0" in value for value in values):
        return None
    template = _template(plans)
    _TEMPLATES.put(keys, template or _NONE)  # decided by the keys alone: not tried again
    return None if template is None else template.run(values)


def _template(
    plans: list[tuple[int, int, str, tuple[str, ...], str, str]],
) -> _Template | None:
    """The template of a key sequence, made by decoding and scrubbing placeholders (distinct
    texts without U+0000) and noting where each placeholder went (None: no template — the
    ordinary path then decides every body of this sequence)."""
    placeholders = [f"\x01{i}" for i in range(len(plans))]
    document = wire.built_form(plans, placeholders)
    if document is None or not document:
        return None
    redacted, stripped, nul, removed = redaction.walk(document, DELIVERY_SPECIFIC)
    if nul:
        return None
    maker = _Maker({text: i for i, text in enumerate(placeholders)})
    roots = (maker.slot(document), maker.slot(redacted), maker.slot(stripped))
    if -1 in roots:
        return None
    removals: list[tuple[tuple[str, ...], int]] = []
    for path, value in removed:
        slot = maker.slot_of_object.get(id(value), -1) if isinstance(value, dict) else (
            maker.values.get(value, -1) if isinstance(value, str) else -1)
        if slot == -1:
            return None
        removals.append((path, slot))
    depth = max(plan[0] for plan in plans)
    brackets = sum(plan[1] for plan in plans)
    names: list[str] = []
    shaped: list[tuple[tuple[str | None, ...], tuple[int, ...]]] = []
    for (keys, _), sources in zip(maker.steps, maker.sources, strict=True):
        names += [key for key in keys if _DIGIT.search(key)]
        shaped.append((tuple(None if _DIGIT.search(key) else key for key in keys), sources))
    shape = (len(plans), tuple(shaped))
    code: _Code | None = _CODES.get(shape)
    if code is None:
        code = _Code(len(plans), shape[1])
        _CODES.put(shape, code)
    auth = document.get("auth")
    token = auth.get("application_token") if isinstance(auth, dict) else None
    return _Template(len(plans), maker.steps, code, tuple(names), roots, removals,
                     maker.values.get(token, -1) if isinstance(token, str) else -1, depth,
                     brackets, _is_canonical(stripped))


def _is_canonical(node: Any) -> bool:
    """Only text in non-empty objects below the top: `identity.canonical` copies it as it is."""
    return all(
        isinstance(child, str) or (isinstance(child, dict) and child and _is_canonical(child))
        for child in node.values()
    )


class _Maker:
    """Turns decoded placeholder trees into template steps; containers with the same keys and
    the same slots (a view's unchanged container and the document's) are built once and shared
    by the views (nothing downstream changes a decoded document in place)."""

    def __init__(self, values: dict[str, int]) -> None:
        self.values = values
        self.steps: list[_Step] = []
        self.sources: list[tuple[int, ...]] = []
        self.slot_of_shape: dict[tuple[tuple[str, int], ...], int] = {}
        self.slot_of_object: dict[int, int] = {}

    def slot(self, node: Any) -> int:
        """The slot of a placeholder or container (-1: something no form decodes to)."""
        if isinstance(node, str):
            return self.values.get(node, -1)
        if not isinstance(node, dict):
            return -1
        keys = tuple(node)
        sources = tuple(self.slot(child) for child in node.values())
        if -1 in sources:
            return -1
        shape = tuple(zip(keys, sources, strict=True))
        slot = self.slot_of_shape.get(shape)
        if slot is None:
            slot = len(self.values) + len(self.steps)
            picked = sources if len(sources) > 1 else (*sources, 0, 0)[:2]
            self.steps.append((keys, itemgetter(*picked)))
            self.sources.append(sources)
            self.slot_of_shape[shape] = slot
        self.slot_of_object.setdefault(id(node), slot)
        return slot


def cached_templates() -> tuple[int, int]:
    """How many templates are held, and their weight (at most `2 * _GENERATION`)."""
    return len(_TEMPLATES), sum(
        _weight(t) for generation in (_TEMPLATES.young, _TEMPLATES.old)
        for t in generation.values())
