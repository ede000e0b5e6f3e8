"""`IntakeService._prepare` as it was, on the frozen modules: decode, check, redact, draft."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ledger.errors import DeliveryRejected
from ledger.models import EventDraft, RejectionDraft
from tests.reference import drafts, wire
from tests.reference.envelope import read_envelope
from tests.reference.identity import DELIVERY_SPECIFIC
from tests.reference.redaction import scrub


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_fields: int
    max_nesting: int


@dataclass(frozen=True)
class Prepared:
    draft: EventDraft | None
    rejected: DeliveryRejected | None = None
    record: RejectionDraft | None = None
    access_token: str | None = None


def prepare(
    body: bytes, content_type: str | None, raw_query: str, peer: str | None,
    received_at: datetime, excerpt_bytes: int | None, limits: Limits,
) -> Prepared:
    document: dict[str, Any] | None = None
    try:
        document = decode(body, content_type, limits)
        draft = _draft(body, content_type, raw_query, peer, document, received_at,
                       excerpt_bytes, limits)
        return Prepared(draft, access_token=_install_access_token(draft, document))
    except DeliveryRejected as rejected:
        if excerpt_bytes is None:
            return Prepared(None, rejected)
        claim = (
            drafts.claim_of_text(body, excerpt_bytes) if document is None
            else drafts.claim_of_document(document, excerpt_bytes)
        )
        record = drafts.rejection_draft(
            received_at=received_at, status=rejected.status, reason=rejected.code,
            detail=rejected.message, peer=peer, content_type=content_type, body=body,
            claim=claim,
        )
        return Prepared(None, rejected, record)


def decode(body: bytes, content_type: str | None, limits: Limits) -> dict[str, Any]:
    if len(body) > limits.max_body_bytes:
        raise DeliveryRejected(
            413, "body_too_large", f"body exceeds {limits.max_body_bytes} bytes"
        )
    return wire.decode_body(body, content_type, max_fields=limits.max_fields,
                            max_nesting=limits.max_nesting)


def _draft(
    raw_body: bytes, content_type: str | None, raw_query: str, peer: str | None,
    document: dict[str, Any], received_at: datetime, excerpt_bytes: int | None, limits: Limits,
) -> EventDraft:
    query = wire.parse_query(raw_query, max_fields=limits.max_fields,
                             max_nesting=limits.max_nesting)
    body = scrub(document, DELIVERY_SPECIFIC)
    in_query = scrub(query)
    if body.has_nul or in_query.has_nul:
        raise DeliveryRejected(400, "nul_character", "the delivery contains U+0000")
    envelope = read_envelope(document)
    return drafts.delivery_draft(
        body, envelope, query=in_query, raw_body=raw_body, received_at=received_at, peer=peer,
        content_type=content_type, rejection_excerpt_bytes=excerpt_bytes,
    )


def _install_access_token(draft: EventDraft, document: dict[str, Any]) -> str | None:
    auth = document.get("auth")
    token = auth.get("access_token") if isinstance(auth, dict) else None
    install = draft.event_type == "ONAPPINSTALL"
    return token if install and isinstance(token, str) and token else None
