"""Building the drafts the store appends: deliveries, trust changes, rejections.

Pure code: redaction, canonical encodings and hashes happen here, once, before the store sees
anything — the store only assigns positions and chains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ledger import foldrecord, identity
from ledger.envelope import Envelope
from ledger.errors import OperatorActionRefused
from ledger.hashing import canonical_json, document_json, sha256
from ledger.models import (
    ORIGIN_BITRIX24,
    ORIGIN_LEDGER,
    ORIGIN_OPERATOR,
    TRUST_EVENT,
    EventDraft,
    RejectionDraft,
)
from ledger.redaction import Scrubbed, rejection_view, scrub_text
from ledger.trust import TrustChange, TrustEffect, normalise_domain
from ledger.wire import safe_text

NO_PORTAL = ""  # member_id of operator events that name only a domain


def delivery_draft(
    body: Scrubbed,
    envelope: Envelope,
    *,
    query: Scrubbed,
    raw_body: bytes,
    received_at: datetime,
    peer: str | None,
    content_type: str | None,
    rejection_excerpt_bytes: int | None,
) -> EventDraft:
    """A verified-or-not Bitrix24 delivery, from its scrubbed body and query string.

    `rejection_excerpt_bytes` None means: if trust refuses it, do not log it (rate limit).
    """
    payload = document_json(body.redacted)
    redactions = [{"path": list(r.path), "fingerprint": r.fingerprint} for r in body.redactions]
    if query.redactions:
        redactions += [r.under("query").as_json() for r in query.redactions]
    occurrence = identity.occurrence(
        body.stripped, query.redacted, event_type=envelope.event_type,
        user_id=envelope.user_id, token_sha256=envelope.token_digest,
        stripped_is_canonical=body.canonical,
    )
    return EventDraft(
        event_type=envelope.event_type,
        member_id=envelope.member_id,
        domain=envelope.domain,
        origin=ORIGIN_BITRIX24,
        bot_ids=envelope.bot_ids,
        occurred_at=envelope.occurred_at,
        received_at=received_at,
        payload=payload,
        payload_sha256=sha256(payload),
        dedup_key=identity.dedup_key(occurrence),
        body_sha256=sha256(raw_body),
        metadata={
            "query": query.redacted,
            "redactions": redactions,
            "peer": safe_text(peer),
            "content_type": safe_text(content_type),
        },
        presented_sha256=envelope.token_digest,
        user_id=envelope.user_id,
        body_size=len(raw_body),
        refusal_excerpt_bytes=rejection_excerpt_bytes,
        fold_record=foldrecord.stored(envelope.event_type, ORIGIN_BITRIX24, body.redacted),
    )


def refusal(draft: EventDraft, *, status: int, reason: str, detail: str) -> RejectionDraft | None:
    """The rejection record of a delivery trust refused (None when it is not to be logged).

    Built only on refusal: the accepted majority never pays for it.
    """
    if draft.refusal_excerpt_bytes is None or draft.body_sha256 is None:
        return None
    claim = claim_of_document(orjson.loads(draft.payload), draft.refusal_excerpt_bytes)
    return RejectionDraft(
        received_at=draft.received_at,
        status=status,
        reason=reason,
        detail=detail[:500],
        member_id=draft.member_id[:200],
        event_type=draft.event_type[:100],
        peer=draft.metadata.get("peer"),
        content_type=(draft.metadata.get("content_type") or "")[:200] or None,
        body_size=draft.body_size,
        body_sha256=draft.body_sha256,
        excerpt=claim.excerpt,
    )


def trust_event(
    effect: TrustEffect,
    *,
    actor: str,
    origin: str,
    received_at: datetime,
    cause_position: int | None = None,
) -> EventDraft:
    """The LEDGER.TRUST_CHANGED event recording one trust change: its effect, who, when.

    The payload holds the whole effect (`ledger.trust.effect_of` reads it back), so trust is a
    fold of the store: the token's SHA-256 digest (never the token), the allowance an install
    consumed, the normalised domain.
    """
    payload_doc: dict[str, Any] = {
        "change": effect.change.value,
        "member_id": effect.member_id or None,
        "domain": effect.domain,
        "token_fingerprint": effect.token_sha256.hex()[:12] if effect.token_sha256 else None,
        "token_sha256": effect.token_sha256.hex() if effect.token_sha256 else None,
        "allowance_position": effect.allowance_position,
        "actor": actor,
        "cause_position": cause_position,
    }
    payload = document_json(payload_doc)
    # a follow-up of a stored delivery is unique by its cause; an operator action by itself
    identity = (
        canonical_json({"trust_change_of": cause_position})
        if cause_position is not None
        else os.urandom(32)
    )
    return EventDraft(
        event_type=TRUST_EVENT,
        member_id=effect.member_id,
        domain=effect.domain,
        origin=origin,
        bot_ids=(),
        occurred_at=received_at,
        received_at=received_at,
        payload=payload,
        payload_sha256=sha256(payload),
        dedup_key=sha256(identity),
        body_sha256=None,
        metadata={},
        trust_change=effect.change,
        new_token_sha256=effect.token_sha256,
        allow_domain=effect.domain
        if effect.change is TrustChange.ALLOWED and not effect.member_id
        else None,
        fold_record=foldrecord.stored(TRUST_EVENT, origin, payload_doc),
    )


def effect_of_draft(draft: EventDraft) -> TrustEffect | None:
    """The trust effect an operator's trust event draft records (what its payload says)."""
    if draft.trust_change is None:
        return None
    return TrustEffect(draft.trust_change, draft.member_id, normalise_domain(draft.domain),
                       draft.new_token_sha256)


def operator_action(
    change: TrustChange,
    *,
    member_id: str | None,
    domain: str | None,
    token: str | None,
    actor: str,
    received_at: datetime,
) -> EventDraft:
    """An operator's trust command, as the event that records it.

    The domain is normalised as deliveries' domains are (`ledger.trust.normalise_domain`); one
    that is no host name is refused here rather than recorded as an allowance nothing matches.
    """
    normalised = normalise_domain(domain) if domain else None
    if domain and normalised is None:
        raise OperatorActionRefused(f"{domain!r} is not a portal domain (e.g. x.bitrix24.com)")
    return trust_event(
        TrustEffect(
            change,
            member_id or NO_PORTAL,
            normalised,
            sha256(token.encode()) if token else None,
        ),
        actor=actor,
        origin=ORIGIN_OPERATOR,
        received_at=received_at,
    )


def follow_up(
    change: TrustChange,
    cause: EventDraft,
    cause_position: int,
    *,
    allowance_position: int | None = None,
) -> EventDraft:
    """The trust event a stored Bitrix24 delivery caused (install established, uninstall ended)."""
    return trust_event(
        TrustEffect(
            change,
            cause.member_id,
            normalise_domain(cause.domain),
            cause.presented_sha256 if change is TrustChange.ESTABLISHED else None,
            allowance_position,
        ),
        actor=f"bitrix24 user {cause.user_id}" if cause.user_id else "bitrix24",
        origin=ORIGIN_LEDGER,
        received_at=cause.received_at,
        cause_position=cause_position,
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """What a refused body says about itself, as far as the rejection log may keep it."""

    excerpt: str  # redacted, at most the excerpt size in UTF-8 bytes
    member_id: str | None = None
    event_type: str | None = None


def _capped(text: str, size: int) -> str:
    return text.encode()[:size].decode("utf-8", "ignore")


def claim_of_document(document: dict[str, Any], excerpt_bytes: int) -> Claim:
    """A decoded body: the excerpt is built from its redacted structure only
    (`redaction.rejection_view`), the claimed portal and event read from it as given."""
    view = rejection_view(document, budget=excerpt_bytes)
    auth = document.get("auth")
    member_id = auth.get("member_id") if isinstance(auth, dict) else None
    event = document.get("event")
    return Claim(
        excerpt=_capped(document_json(view).decode(), excerpt_bytes),
        member_id=safe_text(member_id, 200) if isinstance(member_id, str) else None,
        event_type=safe_text(event, 100) if isinstance(event, str) else None,
    )


def claim_of_text(body: bytes, excerpt_bytes: int) -> Claim:
    """A body that did not decode: structure-free, the text up to its first byte that is not
    UTF-8, cut where a secret name could begin (`redaction.scrub_text`)."""
    window = body[: excerpt_bytes * 2]
    try:
        text = window.decode()
    except UnicodeDecodeError as exc:
        # a multi-byte character cut by the window is fine; any other bad byte ends the text
        text = window[: exc.start].decode()
    return Claim(excerpt=_capped(safe_text(scrub_text(text), len(text)) or "", excerpt_bytes))


def rejection_draft(
    *,
    received_at: datetime,
    status: int,
    reason: str,
    detail: str,
    peer: str | None,
    content_type: str | None,
    body: bytes,
    claim: Claim,
) -> RejectionDraft:
    """A rejection record: the body's hash and size, and the claim's redacted excerpt."""
    return RejectionDraft(
        received_at=received_at,
        status=status,
        reason=reason,
        detail=safe_text(detail, 500) or "",
        member_id=claim.member_id,
        event_type=claim.event_type,
        peer=safe_text(peer),
        content_type=safe_text(content_type, 200),
        body_size=len(body),
        body_sha256=sha256(body),
        excerpt=claim.excerpt,
    )
