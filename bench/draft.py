"""CPU per draft: the decoding path before the fast path (frozen in `tests/reference/`)
against the one the intake takes now (`ledger.onepass` templates over `ledger.wire`'s fast path
and `redaction.scrub`; a body without a template is decoded, then scrubbed).

`python -m bench.draft [--bodies 5000] [--rounds 5]`: builds the drafts of simulated deliveries
(mean ~2 KB, ~40 form fields) with both paths, interleaved round by round in one process, and
prints CPU µs per draft (process time, so other processes on the machine count little) for
decode (body and query), redact (both scrubs), draft (envelope, hashes, identity) and total, and
the ratio new/old; then the total again, timed a whole round at a time ("whole": without the
four clock calls a draft that the stages need). The first round of each path starts with cold
key caches (and no templates: a key sequence gets one when seen again, its shape's function is
compiled after 64 runs); the table is the median of the warm rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from ledger import drafts, envelope, identity, onepass, redaction, wire
from ledger.simulation import Traffic
from tests.reference import drafts as old_drafts
from tests.reference import envelope as old_envelope
from tests.reference import identity as old_identity
from tests.reference import redaction as old_redaction
from tests.reference import wire as old_wire

MAX_FIELDS = 10_000
MAX_NESTING = 32
Stages = tuple[float, float, float]


def _fused(body: bytes, content_type: str, *, max_fields: int,
           max_nesting: int) -> tuple[Any, Any]:
    """The intake's decoding: a form by `ledger.onepass` (document and, mostly, its scrub)."""
    assert content_type == wire.FORM
    return onepass.decode_form(body, max_fields=max_fields, max_nesting=max_nesting)


def _separate(decode_body: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    def decode(body: bytes, content_type: str, *, max_fields: int,
               max_nesting: int) -> tuple[Any, Any]:
        return decode_body(body, content_type, max_fields=max_fields,
                           max_nesting=max_nesting), None
    return decode


Run = Callable[[list[tuple[bytes, str]]], Stages]


def _path(w: ModuleType, r: ModuleType, e: ModuleType, d: ModuleType,
          i: ModuleType, fused: bool) -> tuple[Run, Callable[[list[tuple[bytes, str]]], float]]:
    decode_body: Callable[..., tuple[Any, Any]] = _fused if fused else _separate(w.decode_body)
    parse_query: Callable[..., Any] = w.parse_query
    scrub: Callable[..., Any] = r.scrub
    read_envelope: Callable[..., Any] = e.read_envelope
    delivery_draft: Callable[..., Any] = d.delivery_draft
    strip = i.DELIVERY_SPECIFIC
    received_at = datetime.now(UTC)
    no_query = redaction.Scrubbed({}, (), {}, False)

    def run(bodies: list[tuple[bytes, str]]) -> Stages:
        clock = time.process_time
        decoding = redacting = drafting = 0.0
        for body, query in bodies:
            t0 = clock()
            document, scrubbed = decode_body(body, wire.FORM, max_fields=MAX_FIELDS,
                                             max_nesting=MAX_NESTING)
            parsed = parse_query(query, max_fields=MAX_FIELDS, max_nesting=MAX_NESTING)
            t1 = clock()
            if scrubbed is None:
                scrubbed = scrub(document, strip)
            # as `intake.draft_of` does: most deliveries have no query (the old path scrubbed it)
            in_query = scrub(parsed) if parsed or not fused else no_query
            t2 = clock()
            envelope = read_envelope(document, scrubbed.token_sha256) if fused \
                else read_envelope(document)
            delivery_draft(scrubbed, envelope, query=in_query, raw_body=body,
                           received_at=received_at, peer="10.0.0.1", content_type=wire.FORM,
                           rejection_excerpt_bytes=None)
            t3 = clock()
            decoding += t1 - t0
            redacting += t2 - t1
            drafting += t3 - t2
        scale = 1e6 / len(bodies)
        return decoding * scale, redacting * scale, drafting * scale

    def whole(bodies: list[tuple[bytes, str]]) -> float:
        """`run` without its clocks (four a draft, ~0.6 µs each, partly inside the stages)."""
        t0 = time.process_time()
        for body, query in bodies:
            document, scrubbed = decode_body(body, wire.FORM, max_fields=MAX_FIELDS,
                                             max_nesting=MAX_NESTING)
            parsed = parse_query(query, max_fields=MAX_FIELDS, max_nesting=MAX_NESTING)
            if scrubbed is None:
                scrubbed = scrub(document, strip)
            in_query = scrub(parsed) if parsed or not fused else no_query
            envelope = read_envelope(document, scrubbed.token_sha256) if fused \
                else read_envelope(document)
            delivery_draft(scrubbed, envelope, query=in_query, raw_body=body,
                           received_at=received_at, peer="10.0.0.1", content_type=wire.FORM,
                           rejection_excerpt_bytes=None)
        return (time.process_time() - t0) * 1e6 / len(bodies)

    return run, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    traffic = Traffic(seed=args.seed, churn=False)
    bodies = []
    for _ in range(args.bodies):
        delivery = traffic.next()
        bodies.append((wire.http_build_query(delivery.document), delivery.query))
    fields = sum(body.count(b"&") + 1 for body, _ in bodies) / len(bodies)
    size = sum(len(body) for body, _ in bodies) / len(bodies)
    keys = len({p.partition(b"=")[0] for body, _ in bodies for p in body.split(b"&")})
    print(f"{len(bodies)} simulated bodies: mean {size:.0f} bytes, {fields:.1f} fields, "
          f"{keys} distinct keys")

    old = _path(old_wire, old_redaction, old_envelope, old_drafts, old_identity, False)
    new = _path(wire, redaction, envelope, drafts, identity, True)
    results: dict[str, list[Stages]] = {"old": [], "new": []}
    wholes: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        results["old"].append(old[0](bodies))
        results["new"].append(new[0](bodies))
        wholes["old"].append(old[1](bodies))
        wholes["new"].append(new[1](bodies))

    def row(name: str, stages: Stages) -> str:
        cells = "".join(f"{v:>9.1f}" for v in stages)
        return f"| {name:<22}{cells}{sum(stages):>9.1f} |"

    print(f"| {'µs per draft (CPU)':<22}{'decode':>9}{'redact':>9}{'draft':>9}{'total':>9} |")
    for name in ("old", "new"):
        print(row(f"{name}, cold caches", results[name][0]))
        warm = results[name][1:] or results[name]
        median: Stages = (
            statistics.median(s[0] for s in warm), statistics.median(s[1] for s in warm),
            statistics.median(s[2] for s in warm),
        )
        results[name] = [median]
        print(row(f"{name}, warm (median)", median))
    (o,), (n,) = results["old"], results["new"]
    ratios = "".join(f"{b / a:>9.2f}" for a, b in zip((*o, sum(o)), (*n, sum(n)), strict=True))
    print(f"| {'new / old':<22}{ratios} |")
    # the same drafts timed a round at a time: no clock calls inside (the stages above carry
    # ~2 µs of them a draft)
    whole = {name: statistics.median(wholes[name][1:] or wholes[name]) for name in wholes}
    for name in ("old", "new"):
        print(f"| {name + ', whole, warm (median)':<49}{whole[name]:>9.1f} |")
    print(f"| {'new / old':<49}{whole['new'] / whole['old']:>9.2f} |")


if __name__ == "__main__":
    main()
