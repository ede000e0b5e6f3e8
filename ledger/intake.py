"""The one path a delivery takes: decode → envelope → redact → draft → append (verify) → answer.

No I/O of its own: the store is reached through the group committer. Everything refused before the
append is written to the rejection log here (rate-limited); refusals by trust are written by the
store in the append transaction itself.

Decoding runs before anyone is authenticated, so it is bounded (`ledger.wire`) and, for bodies
larger than `INLINE_BODY_BYTES`, runs on a small thread pool of its own: a hostile body then
costs the event loop a few GIL switches, not its whole decoding time, and a flood of them queues
on that pool instead of on every other request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ledger import drafts, onepass, wire
from ledger.committer import GroupCommitter
from ledger.confirmation import Confirmer
from ledger.envelope import INSTALL, read_envelope
from ledger.errors import CommitterClosed, DeliveryRejected, LedgerError
from ledger.gateway.routes import AHEAD, SPOOLED, STORED, VOID, Accepted
from ledger.identity import DELIVERY_SPECIFIC
from ledger.metrics import Metrics
from ledger.models import (
    ConfirmationNeeded,
    Duplicate,
    EventDraft,
    Outcome,
    Refusal,
    RejectionDraft,
    RejectionLogged,
    Spooled,
    Stored,
)
from ledger.redaction import Scrubbed, scrub
from ledger.settings import Settings

log = logging.getLogger(__name__)

INLINE_BODY_BYTES = 16 * 1024  # Bitrix24's bodies are a few KiB: decoded on the loop, no hop
DECODE_THREADS = 1  # one: more threads would only take more GIL turns from the loop


@dataclass(slots=True)  # one per delivery, never changed (frozen costs more to build)
class Receipt:
    """What the sender is told once its delivery is durable."""

    position: int | None  # None while spooled: the position is assigned when it drains
    duplicate: bool
    event_type: str
    spooled: bool = False


@dataclass(slots=True)  # one per delivery, never changed (frozen costs more to build)
class Delivery:
    """A request as the intake sees it; every text field already made safe (`wire.safe_text`)."""

    body: bytes
    content_type: str | None
    raw_query: str
    peer: str | None


@dataclass(slots=True)  # one per delivery, never changed (frozen costs more to build)
class _Prepared:
    """The outcome of the pure part: a draft, or the refusal and what the log may keep of it."""

    draft: EventDraft | None
    rejected: DeliveryRejected | None = None
    record: RejectionDraft | None = None  # None: not to be logged (rate limit)
    access_token: str | None = None  # an install's, held in memory only, for confirming it


class RejectionBudget:
    """Token bucket bounding what a flood of rejected deliveries can write."""

    def __init__(self, per_second: float) -> None:
        self._rate = per_second
        self._capacity = per_second * 2
        self._tokens = self._capacity
        self._last = time.monotonic()

    def available(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        return self._tokens >= 1

    def spend(self) -> None:
        self._tokens -= 1


class IntakeService:
    def __init__(
        self,
        settings: Settings,
        committer: GroupCommitter,
        metrics: Metrics | None = None,
        *,
        confirmer: Confirmer | None = None,
        forward: Callable[[Accepted], Awaitable[None]] | None = None,
        forwards: Callable[[str, str], bool] | None = None,
        vouches: Callable[[str, bytes | None], bool] | None = None,
    ) -> None:
        """`forward` (gateway mode, `Handoff.accept`) is handed every delivery that
        `forwards(member_id, event_type)` says some route takes (None: every delivery) — asked
        first, as most deliveries match no route and building their handoff costs ~1 µs:
        ahead of its commit (waited for: the answer's one outbox write), then spooled or void
        (not waited for). What it returns never raises and need not be awaited (a future).

        Only a delivery whose token the portal's trust, as this process last read it, accepts
        (`vouches(member_id, presented_sha256)`) is sealed ahead: the forwarder pairs a record
        with its stored event by dedup key, which leaves the tokens out, so a forged copy
        sealed ahead and refused had its body — the sender's tokens — forwarded in the stored
        event's place, and a flood of refused deliveries pushed genuine records out of the
        forwarder's bounded list. Any other delivery (a portal not known here yet, an
        install) is sealed after its commit, once stored, as before the write-ahead record."""
        self._settings = settings
        self._committer = committer
        self._confirmer = confirmer
        self._metrics = metrics or Metrics()
        self._budget = RejectionBudget(settings.rejections_per_second)
        self._forward = forward
        self._forwards = forwards
        self._vouches = vouches or (lambda member_id, presented: False)
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="ledger-decode")
        self._tally: Counter[str] = Counter()  # outcomes since the last summary line

    def close(self) -> None:
        self._decoder.shutdown(wait=True, cancel_futures=True)

    async def receive(self, delivery: Delivery) -> Receipt:
        """Store one delivery durably, or raise `DeliveryRejected` after logging why."""
        received_at = datetime.now(UTC)
        self._metrics.received.inc()
        excerpt_bytes = (
            self._settings.rejection_excerpt_bytes if self._budget.available() else None
        )
        if len(delivery.body) <= INLINE_BODY_BYTES:
            prepared = self._prepare(delivery, received_at, excerpt_bytes)
        else:
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._decoder, self._prepare, delivery, received_at, excerpt_bytes
            )
        if prepared.rejected is not None:
            await self._log_refusal(delivery, prepared.rejected, prepared.record)
            raise prepared.rejected
        draft = prepared.draft
        assert draft is not None
        forwarding = self._forward is not None and (
            self._forwards is None or self._forwards(draft.member_id, draft.event_type))
        ahead = forwarding and self._vouches(draft.member_id, draft.presented_sha256)
        if ahead:
            # gateway mode: sealed into the outbox *before* the commit (write-ahead), so no
            # crash or cancellation between the COMMIT and the answer leaves a stored event
            # unforwarded; the forwarder sends it once it finds the event stored
            await self._handed(delivery, draft, AHEAD)
        try:
            outcome = await self._committer.submit(draft)
        except CommitterClosed:
            if ahead:  # never stored: the record ahead is void
                self._handed(delivery, draft, VOID)
            raise
        if type(outcome) is Stored:  # nearly every delivery: spared the checks below
            if forwarding and not ahead:
                await self._handed(delivery, draft, STORED, outcome)
            return self._stored(draft, outcome)
        if isinstance(outcome, ConfirmationNeeded):
            outcome = await self._confirmed(draft, outcome.domain, prepared.access_token)
        if isinstance(outcome, Refusal):
            if ahead:  # never stored: the record ahead is void (not waited for)
                self._handed(delivery, draft, VOID)
            self._tally[f"rejected:{outcome.code}"] += 1
            self._metrics.rejected.labels(outcome.code).inc()
            if not outcome.rejection_position:  # the store logs a refusal only within budget
                self._metrics.rejections_suppressed.inc()
            self._budget.spend()
            log.warning(
                "rejected %s from %s for portal %s: %s",
                draft.event_type, delivery.peer, draft.member_id, outcome.code,
            )
            raise DeliveryRejected(outcome.status, outcome.code, outcome.message)
        if isinstance(outcome, Spooled):
            self._metrics.spooled.inc()
            self._tally["spooled"] += 1
            log.debug("spooled %s portal=%s", draft.event_type, draft.member_id)
            if forwarding:
                # forwarded at once, known by its spool id; not waited for when a record ahead
                # of it is the guarantee (forwarded once drained, if this one is lost)
                handed = self._handed(delivery, draft, SPOOLED)
                if not ahead:
                    await handed
            return Receipt(None, False, draft.event_type, spooled=True)
        if isinstance(outcome, Stored):
            if forwarding and not ahead:
                await self._handed(delivery, draft, STORED, outcome)
            return self._stored(draft, outcome)
        assert isinstance(outcome, Duplicate)
        self._metrics.duplicates.inc()
        self._metrics.seen(draft.member_id)
        self._tally["duplicate"] += 1
        log.debug("duplicate %s portal=%s position=%d", draft.event_type, draft.member_id,
                  outcome.position)
        # a redelivery's record ahead names the stored event: the forwarder sends an event
        # once, whatever number of records name it (and so also when the first delivery's
        # handler never got as far as its own record)
        return Receipt(outcome.position, True, draft.event_type)

    def _stored(self, draft: EventDraft, outcome: Stored) -> Receipt:
        self._metrics.accepted.inc()
        self._metrics.seen(draft.member_id)
        self._tally["stored"] += 1
        # one line per delivery costs ~10 µs at INFO (a tenth of the budget): DEBUG, and a
        # summary at INFO (`summarize_forever`)
        log.debug("stored %s portal=%s position=%d", draft.event_type, draft.member_id,
                  outcome.position)
        return Receipt(outcome.position, False, draft.event_type)

    def summary(self) -> str | None:
        """The outcomes since the last call, as one log line (None: there were none)."""
        if not self._tally:
            return None
        tally, self._tally = self._tally, Counter()
        rejected = {k.split(":", 1)[1]: n for k, n in tally.items() if k.startswith("rejected:")}
        parts = [f"{k}={tally[k]}" for k in ("stored", "duplicate", "spooled") if tally[k]]
        if rejected:
            parts.append(f"rejected={sum(rejected.values())} ("
                         + ", ".join(f"{k}={n}" for k, n in sorted(rejected.items())) + ")")
        return "deliveries: " + " ".join(parts)

    async def summarize_forever(self, every: float) -> None:
        """Log `summary()` at INFO every `every` seconds while there is something to say."""
        while True:
            await asyncio.sleep(every)  # pacing the summary, not waiting for a result
            line = self.summary()
            if line is not None:
                log.info("%s in the last %gs", line, every)

    async def _confirmed(
        self, draft: EventDraft, domain: str, access_token: str | None
    ) -> Outcome:
        """An install a domain allowance would admit, confirmed by the portal first (outside
        the append); submitted again with the answer, so trust decides as always."""
        if access_token is None:
            reason: str | None = "the install carries no auth.access_token"
        elif self._confirmer is None:
            reason = "no way to ask the portal is configured"
        else:
            reason = await self._confirmer.confirm(domain, draft.member_id, access_token,
                                                   sender=draft.metadata.get("peer"))
        answered = dataclasses.replace(
            draft,
            confirmed_domain=domain if reason is None else None,
            confirmation_refused=reason,
        )
        outcome = await self._committer.submit(answered)
        if isinstance(outcome, ConfirmationNeeded):  # another allowance appeared meanwhile
            raise DeliveryRejected(403, "install_not_confirmed", "try the install again")
        return outcome

    def _handed(
        self, delivery: Delivery, draft: EventDraft, stage: str, stored: Stored | None = None
    ) -> Awaitable[None]:
        """Gateway mode: hand the delivery, as received, to the outbox at `stage` (`AHEAD`
        of its commit, `SPOOLED`, `VOID`, or `STORED` at `stored`'s position); what it returns
        is done once the outbox holds it (or its forward was given up, recorded) — never an
        error."""
        assert self._forward is not None
        return self._forward(Accepted(
            body=b"" if stage == VOID else delivery.body, content_type=delivery.content_type,
            raw_query=delivery.raw_query, member_id=draft.member_id,
            event_type=draft.event_type,
            position=stored.position if stored is not None else None,
            event_hash=stored.hash if stored is not None else None,
            dedup_key=draft.dedup_key, received_at=draft.received_at, stage=stage,
        ))

    def draft(self, delivery: Delivery, received_at: datetime) -> EventDraft:
        """The draft of one delivery, without appending it (benchmarks build stores with it);
        raises `DeliveryRejected` as `receive` would."""
        document, body = decoded(self._settings, delivery)
        return draft_of(self._settings, delivery, document, received_at, None, body)

    def _prepare(
        self, delivery: Delivery, received_at: datetime, excerpt_bytes: int | None
    ) -> _Prepared:
        return prepare(self._settings, delivery, received_at, excerpt_bytes)

    async def refuse(
        self, delivery: Delivery, rejected: DeliveryRejected, received_at: datetime | None = None
    ) -> None:
        """Record a delivery the HTTP layer refused itself (an oversized or late body,
        `delivery.body` then holding only the part that was read)."""
        received_at = received_at or datetime.now(UTC)
        claim = drafts.claim_of_text(delivery.body, self._settings.rejection_excerpt_bytes)
        if len(delivery.body) <= INLINE_BODY_BYTES:
            record = _record(delivery, rejected, received_at, claim)
        else:  # hashing a large body is work for the pool too
            record = await asyncio.get_running_loop().run_in_executor(
                self._decoder, _record, delivery, rejected, received_at, claim
            )
        await self._log_refusal(delivery, rejected, record)

    async def _log_refusal(
        self, delivery: Delivery, rejected: DeliveryRejected, record: RejectionDraft | None
    ) -> None:
        """The rejection log record (unless a flood exhausted the budget) and one log line."""
        self._metrics.rejected.labels(rejected.code).inc()
        self._tally[f"rejected:{rejected.code}"] += 1
        log.warning("rejected delivery from %s: %s", delivery.peer, rejected)
        if record is None or not self._budget.available():
            self._metrics.rejections_suppressed.inc()
            return
        self._budget.spend()
        try:
            outcome = await self._committer.submit(record)
        except LedgerError as exc:
            # the sender still deserves the real reason, not a 503 about our log
            log.error("rejection of a delivery from %s not logged: %s", delivery.peer, exc)
            self._metrics.rejections_suppressed.inc()
            return
        assert isinstance(outcome, RejectionLogged | Spooled)


def prepare(
    settings: Settings, delivery: Delivery, received_at: datetime, excerpt_bytes: int | None
) -> _Prepared:
    """Decode, check, redact and draft (pure; may run on the decoding pool). The differential
    test holds it to the frozen reference of today's path (`tests/reference/intake.py`)."""
    document: dict[str, Any] | None = None
    try:
        document, body = decoded(settings, delivery)
        draft = draft_of(settings, delivery, document, received_at, excerpt_bytes, body)
        return _Prepared(draft, access_token=_install_access_token(draft, document))
    except DeliveryRejected as rejected:
        if excerpt_bytes is None:
            return _Prepared(None, rejected)
        claim = (
            drafts.claim_of_text(delivery.body, excerpt_bytes) if document is None
            else drafts.claim_of_document(document, excerpt_bytes)
        )
        return _Prepared(None, rejected, _record(delivery, rejected, received_at, claim))


def decode(settings: Settings, delivery: Delivery) -> dict[str, Any]:
    return decoded(settings, delivery)[0]


def decoded(settings: Settings, delivery: Delivery) -> tuple[dict[str, Any], Scrubbed | None]:
    """The decoded body and, for most forms, already its scrubbed views (`ledger.onepass`;
    None: `draft_of` scrubs)."""
    if len(delivery.body) > settings.max_body_bytes:
        raise DeliveryRejected(
            413, "body_too_large", f"body exceeds {settings.max_body_bytes} bytes"
        )
    content_type = delivery.content_type
    if content_type == wire.FORM or wire.media_type(content_type) == wire.FORM:
        return onepass.decode_form(
            delivery.body, max_fields=settings.max_form_fields,
            max_nesting=settings.max_nesting,
        )
    document = wire.decode_body(
        delivery.body, delivery.content_type,
        max_fields=settings.max_form_fields, max_nesting=settings.max_nesting,
    )
    return document, None


def draft_of(
    settings: Settings,
    delivery: Delivery,
    document: dict[str, Any],
    received_at: datetime,
    excerpt_bytes: int | None,
    body: Scrubbed | None = None,
) -> EventDraft:
    """The draft of a decoded delivery; `body` is the document's scrubbed views if the decoder
    made them already (`scrub(document, DELIVERY_SPECIFIC)`)."""
    query = wire.parse_query(
        delivery.raw_query, max_fields=settings.max_form_fields, max_nesting=settings.max_nesting,
    )
    if body is None:
        body = scrub(document, DELIVERY_SPECIFIC)
    in_query = scrub(query) if query else Scrubbed({}, (), {}, False)  # most have none
    if body.has_nul or in_query.has_nul:
        # PostgreSQL text cannot hold U+0000: refused rather than mangled
        raise DeliveryRejected(400, "nul_character", "the delivery contains U+0000")
    envelope = read_envelope(document, body.token_sha256)
    return drafts.delivery_draft(
        body,
        envelope,
        query=in_query,
        raw_body=delivery.body,
        received_at=received_at,
        peer=delivery.peer,
        content_type=delivery.content_type,
        rejection_excerpt_bytes=excerpt_bytes,
    )


def _install_access_token(draft: EventDraft, document: dict[str, Any]) -> str | None:
    """An install's `auth.access_token` (to confirm it with the portal), else None."""
    auth = document.get("auth")
    token = auth.get("access_token") if isinstance(auth, dict) else None
    return token if draft.event_type == INSTALL and isinstance(token, str) and token else None


def _record(
    delivery: Delivery, rejected: DeliveryRejected, received_at: datetime, claim: drafts.Claim
) -> RejectionDraft:
    return drafts.rejection_draft(
        received_at=received_at,
        status=rejected.status,
        reason=rejected.code,
        detail=rejected.message,
        peer=delivery.peer,
        content_type=delivery.content_type,
        body=delivery.body,
        claim=claim,
    )
