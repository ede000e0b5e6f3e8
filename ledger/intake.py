"""The one path a delivery takes: decode → envelope → redact → draft → append (verify) → answer.

No I/O of its own: the store is reached through the group committer. Everything refused before the
append is written to the rejection log here (rate-limited); refusals by trust are written by the
store in the append transaction itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ledger import drafts, wire
from ledger.committer import GroupCommitter
from ledger.confirmation import Confirmer
from ledger.envelope import DELIVERY_SPECIFIC, INSTALL, read_envelope
from ledger.errors import DeliveryRejected, LedgerError
from ledger.gateway.routes import Accepted
from ledger.hashing import document_json
from ledger.metrics import Metrics
from ledger.models import (
    ConfirmationNeeded,
    Duplicate,
    EventDraft,
    Outcome,
    Refusal,
    RejectionLogged,
    Spooled,
    Stored,
)
from ledger.redaction import redact, scrub
from ledger.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the sender is told once its delivery is durable."""

    position: int | None  # None while spooled: the position is assigned when it drains
    duplicate: bool
    event_type: str
    spooled: bool = False


@dataclass(frozen=True, slots=True)
class Delivery:
    body: bytes
    content_type: str | None
    raw_query: str
    peer: str | None


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
    ) -> None:
        """`forward` (gateway mode) is handed every delivery once it is durable."""
        self._settings = settings
        self._committer = committer
        self._confirmer = confirmer
        self._metrics = metrics or Metrics()
        self._budget = RejectionBudget(settings.rejections_per_second)
        self._forward = forward

    async def receive(self, delivery: Delivery) -> Receipt:
        """Store one delivery durably, or raise `DeliveryRejected` after logging why."""
        received_at = datetime.now(UTC)
        self._metrics.received.inc()
        try:
            draft, access_token = self._draft_and_token(delivery, received_at)
        except DeliveryRejected as rejected:
            await self.refuse(delivery, rejected, received_at)
            raise
        outcome = await self._committer.submit(draft)
        if isinstance(outcome, ConfirmationNeeded):
            outcome = await self._confirmed(draft, outcome.domain, access_token)
        if isinstance(outcome, Refusal):
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
            log.info("spooled %s portal=%s", draft.event_type, draft.member_id)
            await self._forwarded(delivery, draft, outcome)
            return Receipt(None, False, draft.event_type, spooled=True)
        assert isinstance(outcome, Stored | Duplicate)
        duplicate = isinstance(outcome, Duplicate)
        (self._metrics.duplicates if duplicate else self._metrics.accepted).inc()
        self._metrics.seen(draft.member_id)
        log.info(
            "%s %s portal=%s position=%d",
            "duplicate" if duplicate else "stored", draft.event_type, draft.member_id,
            outcome.position,
        )
        if isinstance(outcome, Stored):  # a redelivery was forwarded when first stored
            await self._forwarded(delivery, draft, outcome)
        return Receipt(outcome.position, duplicate, draft.event_type)

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
            reason = await self._confirmer.confirm(domain, draft.member_id, access_token)
        answered = dataclasses.replace(
            draft,
            confirmed_domain=domain if reason is None else None,
            confirmation_refused=reason,
        )
        outcome = await self._committer.submit(answered)
        if isinstance(outcome, ConfirmationNeeded):  # another allowance appeared meanwhile
            raise DeliveryRejected(403, "install_not_confirmed", "try the install again")
        return outcome

    async def _forwarded(
        self, delivery: Delivery, draft: EventDraft, outcome: Stored | Spooled
    ) -> None:
        """Gateway mode: hand the durable delivery, as received, to the forwarder."""
        if self._forward is None:
            return
        position, event_hash = (
            (outcome.position, outcome.hash) if isinstance(outcome, Stored) else (None, None)
        )
        await self._forward(Accepted(
            body=delivery.body, content_type=delivery.content_type,
            raw_query=delivery.raw_query, member_id=draft.member_id,
            event_type=draft.event_type, position=position, event_hash=event_hash,
            dedup_key=draft.dedup_key, received_at=draft.received_at,
        ))

    def _draft(self, delivery: Delivery, received_at: datetime) -> EventDraft:
        return self._draft_and_token(delivery, received_at)[0]

    def _draft_and_token(
        self, delivery: Delivery, received_at: datetime
    ) -> tuple[EventDraft, str | None]:
        """The draft, and an install's access token — kept only in memory, for confirming."""
        limits = {
            "max_fields": self._settings.max_form_fields,
            "max_nesting": self._settings.max_nesting,
        }
        if len(delivery.body) > self._settings.max_body_bytes:
            raise DeliveryRejected(
                413, "body_too_large", f"body exceeds {self._settings.max_body_bytes} bytes"
            )
        document = wire.decode_body(delivery.body, delivery.content_type, **limits)
        query = wire.parse_query(delivery.raw_query, **limits)
        body = scrub(document, DELIVERY_SPECIFIC)
        in_query = scrub(query)
        if body.has_nul or in_query.has_nul:
            # PostgreSQL text cannot hold U+0000: refused rather than mangled
            raise DeliveryRejected(400, "nul_character", "the delivery contains U+0000")
        envelope = read_envelope(document)
        auth = document.get("auth")
        token = auth.get("access_token") if isinstance(auth, dict) else None
        access_token = (
            token if envelope.event_type == INSTALL and isinstance(token, str) and token else None
        )
        return drafts.delivery_draft(
            body,
            envelope,
            query=in_query,
            raw_body=delivery.body,
            received_at=received_at,
            peer=delivery.peer,
            content_type=delivery.content_type,
            rejection_excerpt_bytes=self._settings.rejection_excerpt_bytes
            if self._budget.available()
            else None,
        ), access_token

    async def refuse(
        self, delivery: Delivery, rejected: DeliveryRejected, received_at: datetime | None = None
    ) -> None:
        """Record a refused delivery in the rejection log (unless a flood exhausted the budget).

        The HTTP layer calls this for what it refuses itself (an oversized body, `delivery.body`
        then holding only the part that was read).
        """
        received_at = received_at or datetime.now(UTC)
        self._metrics.rejected.labels(rejected.code).inc()
        log.warning("rejected delivery from %s: %s", delivery.peer, rejected)
        if not self._budget.available():
            self._metrics.rejections_suppressed.inc()
            return
        self._budget.spend()
        excerpt, member_id, event_type = _best_effort_excerpt(delivery, self._settings)
        draft = drafts.rejection_draft(
            received_at=received_at,
            status=rejected.status,
            reason=rejected.code,
            detail=rejected.message,
            member_id=member_id,
            event_type=event_type,
            peer=delivery.peer,
            content_type=delivery.content_type,
            body=delivery.body,
            excerpt_source=excerpt,
            excerpt_bytes=self._settings.rejection_excerpt_bytes,
        )
        try:
            outcome = await self._committer.submit(draft)
        except LedgerError as exc:
            # the sender still deserves the real reason, not a 503 about our log
            log.error("rejection of a delivery from %s not logged: %s", delivery.peer, exc)
            self._metrics.rejections_suppressed.inc()
            return
        assert isinstance(outcome, RejectionLogged | Spooled)


def _best_effort_excerpt(
    delivery: Delivery, settings: Settings
) -> tuple[str | None, str | None, str | None]:
    """A structurally redacted excerpt and the claimed portal/event, when the body decodes."""
    try:
        document = wire.decode_body(
            delivery.body[: settings.max_body_bytes],
            delivery.content_type,
            max_fields=settings.max_form_fields,
            max_nesting=settings.max_nesting,
        )
    except DeliveryRejected:
        return None, None, None
    redacted, _ = redact(document)
    auth = redacted.get("auth")
    member_id = auth.get("member_id") if isinstance(auth, dict) else None
    event = redacted.get("event")
    return (
        document_json(redacted).decode(),
        member_id if isinstance(member_id, str) else None,
        event if isinstance(event, str) else None,
    )
