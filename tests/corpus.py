"""A generated corpus of deliveries for the differential test of the decoding path.

Deterministic for a seed. Every case is a (body, content type, query, limits) the intake could be
handed: simulated traffic (form and JSON), the shared Bitrix24 samples and the PHP fixtures,
and hostile variants of them — keys with brackets, dots, spaces, NULs, secret names in odd
spellings, malformed escapes, invalid UTF-8, duplicate and conflicting keys, deep nesting — with
limits set near what each body needs, so every budget is met exactly, missed by one, or passed.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from ledger import wire
from ledger.simulation import Traffic

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_SAMPLES = Path("/work/shared/bitrix24/samples")
FORM = wire.FORM
JSON = wire.JSON


@dataclass(frozen=True)
class Case:
    body: bytes
    content_type: str | None
    query: str
    max_body_bytes: int = 1024 * 1024
    max_fields: int = 10_000
    max_nesting: int = 32
    excerpt_bytes: int | None = 2048


# pieces hostile keys and values are made of
KEY_PIECES = [
    "a", "data", "BOT", "567", "0", "-5", "01", "9223372036854775808", "auth", "AUTH", "Auth",
    "access_token", "Access-Token", "accessToken", "ACCESS.TOKEN", "refresh_token",
    "application_token", "application.token", "APPLICATION_TOKEN", "client_secret", "sessid",
    "SESSID", "expires", "expires_in", "domain", "member_id", "user_id", "scope", "status",
    "event", "ts", "PARAMS", "MESSAGE", "BOT_ID", "bot", "id", "COMMAND", "[", "]", "[]", "][",
    "[x]", "[0]", "[auth]", "[access_token]", ".", " ", "  ", "_", "+", "%5B", "%5D", "%5b",
    "%5d", "%00", "%20", "%2E", "%2e", "%FF", "%C3%A9", "%", "%4", "%zz", "%%", "%25", "%26",
    "%3D", "=", "%1F", "\x1f", "\\", "\\x41", "%5Cx41", "\u017f", "%C5%BF",
    "%EF%BC%A1%EF%BC%B5%EF%BC%B4%EF%BC%A8", "\uff41\uff55\uff54\uff48", "%D0%B0uth",
    "%E2%80%8B", "\u00e9", "x" * 70, "7" * 40,
]
VALUE_PIECES = [
    "", "x", "1", "0", "%00", "%26", "%1F", "%1f", "\x1f", "%FF", "%C3", "+", "%2B", "a%3Db",
    "%D0%9F%D1%80", "\\", "\\x41", "%5Cx41", "%", "%4", "%G1", "%%41", "%2541", "ok", "=", "==",
    "%E2%82%AC", "%F0%9F%98%80", "\u00fc", "%ED%A0%80", "%C0%AF", "access_token", "[b]", "%5B",
    "y" * 300,
]


def _escape(text: str) -> str:
    return quote(text, safe="")


class Corpus:
    """An endless, seeded stream of cases (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)  # noqa: S311 - a test corpus, not secrets
        self._traffic = Traffic(seed=seed, portals=4)
        self._samples = _samples()

    def __iter__(self) -> Iterator[Case]:
        makers = [
            (30, self._simulated),
            (10, self._simulated_json),
            (5, self._sample),
            (25, self._mutated),
            (15, self._hostile_form),
            (8, self._hostile_json),
            (7, self._near_budgets),
        ]
        weights = [w for w, _ in makers]
        while True:
            maker = self._random.choices([m for _, m in makers], weights)[0]
            yield maker()

    # ---- cases --------------------------------------------------------------------------

    def _simulated(self) -> Case:
        delivery = self._traffic.next()
        return Case(wire.http_build_query(delivery.document), FORM, delivery.query)

    def _simulated_json(self) -> Case:
        delivery = self._traffic.next()
        return Case(orjson.dumps(delivery.document), "application/json; charset=utf-8",
                    delivery.query)

    def _sample(self) -> Case:
        body, content_type = self._random.choice(self._samples)
        return Case(body, content_type, self._query())

    def _mutated(self) -> Case:
        """A real body with hostile edits: pairs inserted, duplicated, moved, cut, re-keyed."""
        case = self._simulated() if self._random.random() < 0.8 else self._sample()
        if case.content_type != FORM:
            return case
        pairs = case.body.split(b"&")
        r = self._random
        for _ in range(r.randint(1, 4)):
            edit = r.randrange(8)
            at = r.randrange(len(pairs) + 1)
            if edit == 0:
                pairs.insert(at, self._pair())
            elif edit == 1 and pairs:
                pairs.insert(at, r.choice(pairs))
            elif edit == 2 and pairs:
                pairs.insert(at, pairs.pop(r.randrange(len(pairs))))
            elif edit == 3 and pairs:
                i = r.randrange(len(pairs))
                pairs[i] = pairs[i][: r.randrange(len(pairs[i]) + 1)]
            elif edit == 4 and pairs:  # a key of the body reused as a prefix or a leaf
                key = r.choice(pairs).partition(b"=")[0]
                suffix = r.choice([b"%5Bx%5D", b"", b"%5B%5D", b"[auth]", b"%5Baccess_token%5D"])
                pairs.insert(at, key + suffix + b"=" + self._value().encode())
            elif edit == 5:
                pairs.insert(at, b"")
            elif edit == 6 and pairs:
                i = r.randrange(len(pairs))
                key, _, value = pairs[i].partition(b"=")
                pairs[i] = key + b"=" + value + self._value().encode()
            elif pairs:
                i = r.randrange(len(pairs))
                key, sep, value = pairs[i].partition(b"=")
                cut = r.randrange(len(key) + 1)
                pairs[i] = key[:cut] + self._key_piece().encode() + key[cut:] + sep + value
        return Case(b"&".join(pairs), FORM, case.query, excerpt_bytes=self._excerpt())

    def _hostile_form(self) -> Case:
        r = self._random
        pairs = [self._pair() for _ in range(r.randint(0, 12))]
        if r.random() < 0.6:  # an envelope, so that some of them reach the draft
            pairs[r.randrange(len(pairs) + 1):0] = [
                b"event=ONIMBOTMESSAGEADD", b"auth%5Bmember_id%5D=m1",
                b"auth%5Bapplication_token%5D=t1", b"ts=1760000000",
            ]
            r.shuffle(pairs)
        body = b"&".join(pairs)
        if r.random() < 0.1:
            body = b"&" * r.randint(1, 3) + body + b"&" * r.randint(0, 2)
        if r.random() < 0.05:
            body += b"\xff" if r.random() < 0.5 else b"\x00"
        return Case(body, r.choice([FORM, FORM, FORM, "application/x-www-form-urlencoded; x=1"]),
                    self._query(), excerpt_bytes=self._excerpt(),
                    max_nesting=r.choice([2, 3, 4, 32]))

    def _hostile_json(self) -> Case:
        r = self._random
        document: dict[str, Any] = {}
        if r.random() < 0.6:
            document = {"event": r.choice(["ONIMBOTMESSAGEADD", " x ", "\u017f", 5, None]),
                        "auth": {"member_id": "m1", "application_token": "t1",
                                 "domain": r.choice(["A.B", "", 3])}}
        for _ in range(r.randint(0, 6)):
            document[self._json_key()] = self._json_value(r.randint(0, 4))
        keys = list(document)
        r.shuffle(keys)
        body = orjson.dumps({k: document[k] for k in keys})
        if r.random() < 0.1:
            body = body[: r.randrange(len(body) + 1)]
        return Case(body, JSON, self._query(), excerpt_bytes=self._excerpt(),
                    max_nesting=r.choice([2, 3, 32]), max_fields=r.choice([10, 20, 10_000]))

    def _near_budgets(self) -> Case:
        """A body with limits at, one under and one over what it needs."""
        r = self._random
        case = self._simulated() if r.random() < 0.7 else self._hostile_form()
        fields = len([p for p in case.body.split(b"&") if p])
        depth = max((p.partition(b"=")[0].replace(b"%5B", b"[").count(b"[")
                     for p in case.body.split(b"&")), default=0)
        return Case(
            case.body, case.content_type, case.query,
            max_body_bytes=max(1024, len(case.body) + r.choice([-1, 0, 1])),
            max_fields=max(10, fields + r.choice([-1, 0, 1, 1000])),
            max_nesting=max(2, depth + r.choice([-1, 0, 1])),
            excerpt_bytes=self._excerpt(),
        )

    # ---- pieces -------------------------------------------------------------------------

    def _key_piece(self) -> str:
        return self._random.choice(KEY_PIECES)

    def _key(self) -> str:
        r = self._random
        base = "".join(self._key_piece() for _ in range(r.randint(0, 2)))
        levels = r.choice([0, 0, 1, 2, 3, r.randint(4, 40)])
        for _ in range(levels):
            inner = "".join(self._key_piece() for _ in range(r.randint(0, 2)))
            base += r.choice(["[", "%5B", "%5b"]) + inner + r.choice(["]", "%5D", "]", ""])
        return base

    def _value(self) -> str:
        r = self._random
        return "".join(r.choice(VALUE_PIECES) for _ in range(r.randint(0, 3)))

    def _pair(self) -> bytes:
        r = self._random
        key = self._key()
        if r.random() < 0.2:
            key = _escape(key)
        text = key if r.random() < 0.08 else key + "=" + self._value()
        return text.encode("utf-8", "surrogatepass")

    def _json_key(self) -> str:
        r = self._random
        return "".join(r.choice([*KEY_PIECES, "\x00", "k"]) for _ in range(r.randint(1, 3)))

    def _json_value(self, depth: int) -> Any:
        r = self._random
        if depth <= 0 or r.random() < 0.4:
            return r.choice(["v", "", "\x00", 1, 0, -2, 1.5, 2.0, True, False, None, "tok" * 5,
                             "\u00e9\ud7ff"])
        if r.random() < 0.5:
            return [self._json_value(depth - 1) for _ in range(r.randint(0, 3))]
        return {self._json_key(): self._json_value(depth - 1) for _ in range(r.randint(0, 4))}

    def _query(self) -> str:
        r = self._random
        roll = r.random()
        if roll < 0.6:
            return ""
        if roll < 0.8:
            return "CLIENT_ID=abc123"
        if roll < 0.9:
            return b"&".join(self._pair() for _ in range(r.randint(1, 3))).decode(
                "utf-8", "surrogateescape")
        return r.choice(["a[b]=1&a[b][c]=2", "access_token=x", "auth[x]=%00", "x=%FF", "%zz=1"])

    def _excerpt(self) -> int | None:
        return self._random.choice([None, 0, 40, 2048])


def _samples() -> list[tuple[bytes, str]]:
    found: list[tuple[bytes, str]] = []
    for folder in (SHARED_SAMPLES, FIXTURES / "bitrix24"):
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix == ".form":
                found.append((path.read_bytes(), FORM))
            elif path.suffix == ".json":
                found.append((path.read_bytes(), JSON))
    for case in json.loads((FIXTURES / "php" / "parse_str.json").read_text())["cases"]:
        found.append((base64.b64decode(case["body_b64"]), FORM))
    return found
