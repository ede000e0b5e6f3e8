"""A refusal drained again after a crash is logged once (migration 0016's arrival key)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger import drafts
from ledger.hashing import sha256
from ledger.models import EventDraft, Refusal, RejectionDraft, RejectionLogged
from ledger.settings import TrustPolicy
from ledger.spool import decode, encode
from ledger.storage.store import EventStore, create_pool
from tests.conftest import Database

Admin: TypeAlias = "asyncpg.Connection[Any]"


@pytest.fixture
async def store(database: Database) -> Any:
    pool = await create_pool(database.service_dsn, size=4)
    yield EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    await pool.close()


def knock(at: datetime) -> RejectionDraft:
    return drafts.rejection_draft(
        received_at=at, status=401, reason="missing_auth", detail="x", peer="1.2.3.4",
        content_type="text/plain", body=b"a=1", claim=drafts.claim_of_text(b"a=1", 100),
    )


def unknown_portals_delivery(at: datetime) -> EventDraft:
    """A delivery for a portal nobody allowed: trust refuses it, and the refusal is logged."""
    payload = b'{"event":"ONIMBOTMESSAGEADD","ts":"1"}'
    return EventDraft(
        event_type="ONIMBOTMESSAGEADD", member_id="nobody", domain="nobody.example",
        origin="bitrix24", bot_ids=(), occurred_at=None, received_at=at, payload=payload,
        payload_sha256=sha256(payload), dedup_key=sha256(b"nobody-1"),
        body_sha256=sha256(payload), metadata={"peer": "1.2.3.4"},
        presented_sha256=sha256(b"t" * 32), refusal_excerpt_bytes=100, body_size=len(payload),
    )


async def rejections(admin: Admin) -> list[Any]:
    return list(await admin.fetch(
        "SELECT position, reason, arrival_sha256 FROM ledger.rejections ORDER BY position"))


def spooled(draft: Any) -> Any:
    """The copy a drain reads back from the spool."""
    return decode(encode(draft))


async def test_a_spooled_rejection_drained_twice_is_logged_once(
    store: EventStore, admin: Admin
) -> None:
    """A crash after the drain's COMMIT and before the drained marker drains it again."""
    record = knock(datetime.now(UTC))
    (first,) = await store.append([spooled(record)], draining=True)
    (again,) = await store.append([spooled(record)], draining=True)
    assert isinstance(first, RejectionLogged)
    assert again == first
    rows = await rejections(admin)
    assert [r["position"] for r in rows] == [first.position]
    assert rows[0]["arrival_sha256"] is not None


async def test_a_delivery_refused_on_drain_and_drained_again_is_logged_once(
    store: EventStore, admin: Admin
) -> None:
    delivery = unknown_portals_delivery(datetime.now(UTC))
    (first,) = await store.append([spooled(delivery)], draining=True)
    (again,) = await store.append([spooled(delivery)], draining=True)
    assert isinstance(first, Refusal)
    assert isinstance(again, Refusal)
    assert again.rejection_position == first.rejection_position
    assert [r["position"] for r in await rejections(admin)] == [first.rejection_position]
    # the next one chains on as usual: no gap, the head moved once
    later = knock(datetime.now(UTC) + timedelta(seconds=1))
    (logged,) = await store.append([later], draining=True)
    assert isinstance(logged, RejectionLogged)
    assert [r["position"] for r in await rejections(admin)] == [1, 2]


async def test_an_online_rejection_drained_after_its_append_was_given_up_is_logged_once(
    store: EventStore, admin: Admin
) -> None:
    """The append timed out but committed; its batch was spooled and drains."""
    record = knock(datetime.now(UTC))
    (online,) = await store.append([record])
    (drained,) = await store.append([spooled(record)], draining=True)
    assert drained == online
    assert len(await rejections(admin)) == 1


async def test_a_batch_mixing_logged_and_new_refusals_writes_only_the_new_ones(
    store: EventStore, admin: Admin
) -> None:
    now = datetime.now(UTC)
    old, new = knock(now), knock(now + timedelta(seconds=1))
    (first,) = await store.append([spooled(old)], draining=True)
    again, fresh = await store.append([spooled(old), spooled(new)], draining=True)
    assert isinstance(first, RejectionLogged)
    assert again == first
    assert isinstance(fresh, RejectionLogged)
    assert fresh.position == first.position + 1
    assert [r["position"] for r in await rejections(admin)] == [1, 2]


async def test_online_rejections_are_never_refused_as_duplicates(
    store: EventStore, admin: Admin
) -> None:
    """Two online knocks alike to the microsecond are two knocks: no look-up, no failure."""
    record = knock(datetime.now(UTC))
    await store.append([record])
    await store.append([dataclasses.replace(record)])
    rows = await rejections(admin)
    assert len(rows) == 2
    assert rows[0]["arrival_sha256"] == rows[1]["arrival_sha256"]
