"""The fast decoding path is today's path, byte for byte: a differential test against the frozen
reference (`tests/reference/`) on a generated corpus (`tests/corpus.py`), plus the bounds of the
key caches.

Every case runs three times (a form's key sequence gets its `ledger.onepass` template when seen
again), then with its values shuffled against the template compiled. Every case is
compared on everything the intake hands on: the decoded document (with key order),
both scrubbed views and their redaction records, the draft (every `EventDraft` field; payload,
hashes, dedup key), the refusal of a trust-refused draft, and on a refusal the exception (class,
status, code, message) and the rejection record with its excerpt.

`ONEPASS_CORPUS=200000 ./run test tests/test_onepass.py -k corpus` runs a larger corpus
(`ONEPASS_SEED` picks another one); the default takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import drafts, intake, onepass, redaction, wire
from ledger.errors import DeliveryRejected
from ledger.identity import DELIVERY_SPECIFIC
from ledger.models import EventDraft, RejectionDraft
from ledger.settings import Settings
from tests.corpus import FORM, JSON, KEY_PIECES, VALUE_PIECES, Case, Corpus
from tests.reference import drafts as reference_drafts
from tests.reference import intake as reference
from tests.reference import redaction as reference_redaction
from tests.reference import wire as reference_wire

CORPUS = int(os.environ.get("ONEPASS_CORPUS", "6000"))
SEED = int(os.environ.get("ONEPASS_SEED", "15"))
RECEIVED = datetime(2026, 11, 26, 1, 2, 3, 456789, tzinfo=UTC)
_SETTINGS: dict[tuple[int, int, int], Settings] = {}


def _settings(case: Case) -> Settings:
    key = (case.max_body_bytes, case.max_fields, case.max_nesting)
    if key not in _SETTINGS:
        _SETTINGS[key] = Settings.model_construct(
            max_body_bytes=case.max_body_bytes, max_form_fields=case.max_fields,
            max_nesting=case.max_nesting,
        )
    return _SETTINGS[key]


def _outcome(run: Any) -> Any:
    try:
        return ("ok", run())
    except DeliveryRejected as exc:
        return ("refused", type(exc), exc.status, exc.code, exc.message)


def _json(value: Any) -> bytes:
    """Order-sensitive, type-exact bytes of a value (PHP arrays are ordered maps)."""
    return orjson.dumps(value, option=orjson.OPT_PASSTHROUGH_DATACLASS, default=repr)


def _draft_view(draft: EventDraft | None) -> Any:
    if draft is None:
        return None
    fields = {f.name: getattr(draft, f.name) for f in dataclasses.fields(draft)}
    fields["metadata"] = _json(draft.metadata)
    return fields


def _record_view(record: RejectionDraft | None) -> Any:
    return None if record is None else dataclasses.asdict(record)


def _scrub_view(scrubbed: Any) -> Any:
    return (_json(scrubbed.redacted), _json(scrubbed.stripped),
            [(r.path, r.fingerprint) for r in scrubbed.redactions], scrubbed.has_nul)


def check(case: Case) -> None:
    """Assert that the fast path and the reference agree on every output of `case`."""
    limits = reference.Limits(case.max_body_bytes, case.max_fields, case.max_nesting)
    delivery = intake.Delivery(case.body, case.content_type, case.query, "10.0.0.1")

    # the decoded document
    new_doc = _outcome(lambda: intake.decode(_settings(case), delivery))
    old_doc = _outcome(lambda: reference.decode(case.body, case.content_type, limits))
    assert _json(new_doc[1]) == _json(old_doc[1]) if new_doc[0] == "ok" else new_doc == old_doc
    assert new_doc[0] == old_doc[0]
    if new_doc[0] == "ok":
        document = old_doc[1]
        for strip in (DELIVERY_SPECIFIC, frozenset()):
            assert _scrub_view(redaction.scrub(document, strip)) == _scrub_view(
                reference_redaction.scrub(document, strip))
    query_new = _outcome(lambda: wire.parse_query(
        case.query, max_fields=case.max_fields, max_nesting=case.max_nesting))
    query_old = _outcome(lambda: reference_wire.parse_query(
        case.query, max_fields=case.max_fields, max_nesting=case.max_nesting))
    assert (_json(query_new[1]), query_new[0]) == (_json(query_old[1]), query_old[0]) if (
        query_new[0] == "ok") else query_new == query_old

    # the whole pure path of the intake: draft or refusal and its record; three times, since
    # a form's key sequence gets its template when it is seen again (`ledger.onepass`)
    old = reference.prepare(case.body, case.content_type, case.query, "10.0.0.1", RECEIVED,
                            case.excerpt_bytes, limits)
    for _ in range(3):
        _check_prepared(case, delivery, old)


def _check_prepared(case: Case, delivery: intake.Delivery, old: Any) -> None:
    new = intake.prepare(_settings(case), delivery, RECEIVED, case.excerpt_bytes)
    assert _draft_view(new.draft) == _draft_view(old.draft)
    assert new.access_token == old.access_token
    assert _record_view(new.record) == _record_view(old.record)
    if old.rejected is None:
        assert new.rejected is None
    else:
        assert new.rejected is not None
        assert (type(new.rejected), new.rejected.status, new.rejected.code,
                new.rejected.message) == (type(old.rejected), old.rejected.status,
                                          old.rejected.code, old.rejected.message)
    if new.draft is not None and old.draft is not None:
        refused = drafts.refusal(new.draft, status=403, reason="unknown_portal", detail="d")
        expected = reference_drafts.refusal(old.draft, status=403, reason="unknown_portal",
                                            detail="d")
        assert _record_view(refused) == _record_view(expected)


@pytest.mark.timeout(max(120, CORPUS // 40))  # ~2.5 ms a case on a busy machine
def test_a_generated_corpus_drafts_exactly_as_the_reference() -> None:
    """`CORPUS` cases (default 6000, ~10 s): simulated, sampled, mutated, hostile, near budgets."""
    outcomes: dict[str, int] = {}
    for n, case in enumerate(Corpus(SEED)):
        if n >= CORPUS:
            break
        try:
            check(case)
            _compile_templates()  # the other values meet the template compiled
            check(_other_values(case, n))
        except AssertionError:
            raise AssertionError(f"case {n} of seed {SEED} differs: {case!r}") from None
        prepared = intake.prepare(_settings(case), intake.Delivery(
            case.body, case.content_type, case.query, None), RECEIVED, None)
        kind = "draft" if prepared.rejected is None else prepared.rejected.code
        outcomes[kind] = outcomes.get(kind, 0) + 1
    # the corpus reaches drafts and the refusals the budgets and PHP's rules make
    for reached in ("draft", "too_many_fields", "too_complex", "too_deep", "invalid_utf8",
                    "body_too_large", "nul_character", "missing_event", "malformed_json"):
        assert outcomes.get(reached, 0) > 0, (reached, outcomes)


def _compile_templates() -> None:
    """Every template as it is after `onepass.COMPILE_AFTER` runs: compiled to a function."""
    for generation in (onepass._TEMPLATES.young, onepass._TEMPLATES.old):
        for template in generation.values():
            if template.code.build is None and template.steps:
                template.code.compile()


def _other_values(case: Case, seed: int) -> Case:
    """The case with its fields' values shuffled among them: a form with the same key sequence
    (so it meets the template its case made) and other values — a value's escapes, bytes and
    U+0000 must not leak into what the template decided."""
    pairs = case.body.split(b"&")
    values = [pair.partition(b"=")[2] for pair in pairs]
    random.Random(seed).shuffle(values)  # noqa: S311 - a test corpus, not secrets
    body = b"&".join(
        key + sep + value
        for (key, sep, _), value in zip((p.partition(b"=") for p in pairs), values, strict=True)
    )
    return dataclasses.replace(case, body=body)


def test_templates_replay_the_ordinary_path_with_other_values() -> None:
    """Bitrix24's own kinds of body, each sent again and again with new values: from the
    second body of a key sequence on, the template answers (`ledger.onepass`), and the drafts
    are the reference's."""
    traffic = Corpus(5)._traffic
    deliveries = [traffic.next() for _ in range(200)]
    for delivery in deliveries * 2:
        check(Case(wire.http_build_query(delivery.document), FORM, delivery.query))
    body = wire.http_build_query(deliveries[0].document)
    for _ in range(2):
        document, scrubbed = onepass.decode_form(body, max_fields=10_000, max_nesting=32)
        assert scrubbed is not None  # the template answered
        assert _scrub_view(scrubbed) == _scrub_view(
            reference_redaction.scrub(document, DELIVERY_SPECIFIC))
    # U+0000 in a value, or a value PHP keeps as it is: the ordinary path
    for odd in (b"%00", b"%zz", b"%FF"):
        same_keys = body.replace(b"=", b"=" + odd, 1)
        if odd != b"%FF":  # (that one is refused: not UTF-8)
            assert onepass.decode_form(same_keys, max_fields=10_000, max_nesting=32)[1] is None
        check(Case(same_keys, FORM, ""))


def test_a_template_is_compiled_after_its_runs_and_drafts_the_same() -> None:
    """After `COMPILE_AFTER` runs a template builds its containers with one generated function:
    the same documents, views and drafts; a key that is Python syntax is only a constant."""
    traffic = Corpus(7)._traffic
    delivery = traffic.next()
    document = dict(delivery.document)
    document["x'] + __import__('os').getcwd() + ['"] = "1"
    document["x1'] + __import__('os').getcwd() + ['"] = "2"  # a key with a digit: passed in
    body = wire.http_build_query(document)
    for _ in range(onepass.COMPILE_AFTER + 2):
        check(Case(body, FORM, delivery.query))
    cut = body.replace(b"=", b"&").split(b"&")
    template = onepass._TEMPLATES.young[tuple(cut[::2])]
    assert template.code.build is not None
    assert "x1']_+___import__('os')_getcwd()_+__'" in template.names  # (as PHP names it)


def _letters(number: int) -> bytes:
    """A key part without digits, one per number (so each makes its own shape)."""
    text = b""
    while True:
        number, rest = divmod(number, 26)
        text += bytes([97 + rest])
        if not number:
            return text


def test_sequences_that_differ_in_ids_share_one_compiled_function() -> None:
    """Key sequences that differ only in the digits of their keys (bot ids) have one shape:
    their runs count together, they share one compile, and each builds its own keys."""
    bodies = [b"event=X&auth%%5Bmember_id%%5D=m&data%%5BBOT%%5D%%5B%d%%5D%%5BBOT_ID%%5D=%d"
              b"&data%%5BBOT%%5D%%5B%d%%5D%%5BCODE%%5D=c" % (bot, bot, bot) for bot in range(
                  9_000_001, 9_000_001 + onepass.COMPILE_AFTER)]
    for body in bodies * 2:  # the second sighting makes (and runs) each one's template
        check(Case(body, FORM, ""))
    templates = [onepass._TEMPLATES.get(tuple(body.replace(b"=", b"&").split(b"&")[::2]))
                 for body in bodies]
    codes = {id(template.code) for template in templates}
    assert len(codes) == 1
    assert templates[0].code.build is not None  # compiled after COMPILE_AFTER runs in all
    assert len({template.names for template in templates}) == len(bodies)
    for body in bodies[:3]:  # each from the compiled function, with its own ids
        check(Case(body, FORM, ""))
        document, scrubbed = onepass.decode_form(body, max_fields=100, max_nesting=8)
        assert scrubbed is not None
        assert document == reference_wire.parse_php_form(body, max_fields=100, max_nesting=8)


def test_a_sender_inventing_shapes_compiles_nothing_and_the_shapes_stay_bounded() -> None:
    """Every new shape sent twice gets a template and a shape entry (bounded in weight like
    the templates) but no compile: a compile needs `COMPILE_AFTER` runs of one shape."""
    for generation in (onepass._CODES.young, onepass._CODES.old):
        generation.clear()
    wide = b"&".join(b"w" + _letters(i) + b"=1" for i in range(100))
    for i in range(3 * onepass._GENERATION // 100):
        body = b"q" + _letters(i) + b"=1&" + wide
        for _ in range(2):
            onepass.decode_form(body, max_fields=1000, max_nesting=4)
    codes = [code for generation in (onepass._CODES.young, onepass._CODES.old)
             for code in generation.values()]
    assert codes
    assert all(code.build is None and code.runs == 1 for code in codes)  # nothing compiled
    weight = sum(map(onepass._code_weight, codes))
    assert len(onepass._CODES) > onepass._GENERATION // 102  # shapes were kept, old ones dropped
    assert weight <= 2 * onepass._GENERATION


def test_the_template_cache_stays_bounded_whatever_keys_arrive() -> None:
    """A sender inventing a key sequence per body: no template (each sequence is seen once);
    sent twice each, the templates never weigh more than two generations."""
    before = onepass.cached_templates()
    for i in range(3000):
        onepass.decode_form(b"event=X&k%d=1" % i, max_fields=10, max_nesting=4)
    assert onepass.cached_templates() == before
    wide = b"&".join(b"w%d" % i + b"=1" for i in range(onepass.MAX_TEMPLATE_FIELDS - 1))
    sequences = 3 * onepass._GENERATION // onepass.MAX_TEMPLATE_FIELDS
    for i in range(sequences):
        for _ in range(2):
            onepass.decode_form(b"j%d=1&" % i + wide, max_fields=1000, max_nesting=4)
    held, weight = onepass.cached_templates()
    assert 0 < held < sequences  # templates were made, and the oldest dropped
    assert weight <= 2 * onepass._GENERATION
    big = b"&".join(b"k%d" % i + b"x" * 100 + b"=1" for i in range(100))
    for _ in range(3):
        assert onepass.decode_form(big, max_fields=1000, max_nesting=4)[1] is None


def test_the_fast_path_takes_ordinary_forms_and_leaves_odd_ones_to_the_exact_decoder() -> None:
    """Without this the differential test could pass with the fast path never taken."""
    traffic = Corpus(3)._traffic
    for _ in range(300):
        delivery = traffic.next()
        body = wire.http_build_query(delivery.document)
        fast = wire._parse_fast(body, 10_000, 32, 10_000)
        assert fast is not None
        assert _json(fast) == _json(reference_wire.parse_php_form(
            body, max_fields=10_000, max_nesting=32))
    for odd in (b"a[]=1", b"a=%zz", b"a=%FF", b"a[b]=1&a=2", b"a[b][c]=1", b"k" * 300 + b"=1"):
        expected = _outcome(lambda odd=odd: reference_wire.parse_php_form(
            odd, max_fields=10, max_nesting=1))
        assert _outcome(lambda odd=odd: wire.parse_php_form(
            odd, max_fields=10, max_nesting=1)) == expected
        if odd != b"k" * 300 + b"=1":
            assert wire._parse_fast(odd, 10, 1, 10) is None


def test_every_sample_and_php_fixture_drafts_exactly_as_the_reference() -> None:
    corpus = Corpus(1)
    for body, content_type in corpus._samples:
        for query in ("", "CLIENT_ID=abc"):
            check(Case(body, content_type, query))
            check(Case(body, content_type, query, max_nesting=2, max_fields=10))
        for other in (None, "text/plain", "APPLICATION/X-WWW-FORM-URLENCODED"):
            check(Case(body, other, ""))


_piece = st.sampled_from(KEY_PIECES) | st.text(string.printable, max_size=3)
_key = st.builds(
    lambda base, levels: base + "".join(f"{o}{i}{c}" for o, i, c in levels),
    st.lists(_piece, max_size=2).map("".join),
    st.lists(st.tuples(st.sampled_from(["[", "%5B", "%5b"]),
                       st.lists(_piece, max_size=2).map("".join),
                       st.sampled_from(["]", "%5D", ""])), max_size=6),
)
_value = st.lists(st.sampled_from(VALUE_PIECES) | st.text(max_size=3), max_size=3).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(_key, st.booleans(), _value), max_size=12),
       envelope=st.booleans(), max_nesting=st.sampled_from([2, 3, 32]))
def test_php_bracket_forms_draft_exactly_as_the_reference(
    pairs: list[tuple[str, bool, str]], envelope: bool, max_nesting: int
) -> None:
    text = "&".join(k + ("=" + v if sep else "") for k, sep, v in pairs)
    if envelope:
        text += "&event=X&auth[member_id]=m&auth[application_token]=t"
    body = text.encode("utf-8", "surrogatepass")
    check(Case(body, FORM, "", max_nesting=max_nesting))


_json_doc = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(KEY_PIECES) | st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(document=st.dictionaries(st.sampled_from(KEY_PIECES) | st.text(max_size=4), _json_doc,
                                max_size=6),
       envelope=st.booleans())
def test_json_bodies_draft_exactly_as_the_reference(document: dict[str, Any],
                                                    envelope: bool) -> None:
    if envelope:
        document = {"event": "ONIMBOTJOINCHAT",
                    "auth": {"member_id": "m", "application_token": "t"}, **document}
    check(Case(json.dumps(document).encode(), JSON, "", max_fields=10))


def test_keys_with_ids_are_planned_by_shape() -> None:
    """A new bot id is a cache miss on the raw key but a hit on its shape (digit runs out)."""
    wire.parse_php_form(b"data%5BBOT%5D%5B101%5D%5BBOT_ID%5D=101", max_fields=10, max_nesting=4)
    shapes = len(wire._SHAPES)
    for bot in range(102, 600):
        document = wire.parse_php_form(b"data%5BBOT%5D%5B" + str(bot).encode()
                                       + b"%5D%5BBOT_ID%5D=1", max_fields=10, max_nesting=4)
        assert document == {"data": {"BOT": {str(bot): {"BOT_ID": "1"}}}}
    assert len(wire._SHAPES) == shapes


def _text(value: Any) -> int:
    if isinstance(value, str | bytes):
        return len(value)
    return sum(map(_text, value)) if isinstance(value, tuple) else 0


def test_the_cached_key_bytes_bound_holds_for_nested_keys() -> None:
    """`wire.cached_key_bytes` is an upper bound of the key text in the plan caches (found by a
    break test: it counted 256 bytes an entry, while a plan of a nested 128-byte key holds
    ~400 characters — its raw key, its prefix, parents and full path)."""
    for cache in (wire._PLANS, wire._SHAPES):
        cache.young.clear()
        cache.old.clear()
    wire._decoded_short_key.cache_clear()
    wire._short_key_path.cache_clear()
    for i in range(3000):
        key = (b"k%d" % i + b"[ab]" * 40)[: wire._PLANNED_KEY_BYTES]
        wire.parse_php_form(key + b"=1", max_fields=100, max_nesting=64)
    held = sum(
        _text(key) + _text(plan)
        for cache in (wire._PLANS, wire._SHAPES)
        for generation in (cache.young, cache.old)
        for key, plan in generation.items()
    )
    assert len(wire._PLANS) >= 3000  # the keys were planned: the sum above means something
    assert held <= wire.cached_key_bytes()


def test_the_key_caches_stay_bounded_whatever_keys_arrive() -> None:
    """40k distinct keys (ids, names, lengths): entries never pass two generations, and only
    short keys are admitted (so the bytes are bounded too)."""
    for i in range(40_000):
        key = (b"k%d" % i) + b"x" * (i % 300) + b"%5Bq" + str(i * 7).encode() + b"%5D"
        wire.parse_php_form(key + b"=1", max_fields=10, max_nesting=4)
        wire.parse_php_form(b"z" + b"a" * (i % 50) + b"=1", max_fields=10, max_nesting=4)
    assert len(wire._PLANS) <= 2 * wire._PLANS.generation
    assert len(wire._SHAPES) <= 2 * wire._SHAPES.generation
    assert all(len(key) <= wire._PLANNED_KEY_BYTES for key in wire._PLANS.young)
    assert all(len(key) <= wire._PLANNED_KEY_BYTES for key in wire._SHAPES.young)
