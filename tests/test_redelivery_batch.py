"""A redelivery that shares a group-commit batch with the trust change that would refuse it.

Group commit puts whatever arrived meanwhile into one transaction: a portal's uninstall (or an
operator's re-provisioning) and a redelivery of one of its stored events can be planned
together. The redelivery is then judged after the change, so it must prove itself by the token
its original was accepted with — the facts must hold that token although, when they were read,
today's trust still accepted it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger import drafts, intake
from ledger.models import Duplicate, Stored
from ledger.operations import change_trust
from ledger.settings import Settings, TrustPolicy
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange
from tests.conftest import Database, sample

FORM = "application/x-www-form-urlencoded"
MEMBER_ID = "bac1cd5c8940947a75e0d71b1a84e348"


def _draft(settings: Settings, name: str, at: datetime) -> Any:
    delivery = intake.Delivery(sample(name), FORM, "", "127.0.0.1")
    return intake.draft_of(settings, delivery, intake.decode(settings, delivery), at, 1000)


@pytest.mark.parametrize("change", ["uninstall", "re-provisioning"])
async def test_a_redelivery_batched_after_the_change_that_refuses_it_is_still_a_duplicate(
    database: Database, settings: Settings, change: str
) -> None:
    pool = await create_pool(database.service_dsn, size=2)
    store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    try:
        now = datetime.now(UTC)
        await change_trust(store, TrustChange.ALLOWED, member_id=MEMBER_ID, actor="test")
        install, message = (_draft(settings, n, now)
                            for n in ("onappinstall-1", "onimbotmessageadd-1"))
        outcomes = await store.append([install, message])
        assert all(isinstance(o, Stored) for o in outcomes), outcomes
        original = outcomes[1]
        assert isinstance(original, Stored)
        later = now + timedelta(seconds=1)
        ending = (_draft(settings, "onappuninstall-1", later) if change == "uninstall"
                  else drafts.operator_action(
                      TrustChange.PROVISIONED, member_id=MEMBER_ID,
                      domain="some-domain.bitrix24.com", token="f" * 32, actor="test",
                      received_at=later))
        # one batch: the change, then a redelivery of the message under the original token
        first = await store.append([ending, _draft(settings, "onimbotmessageadd-1", later)])
        assert isinstance(first[0], Stored), first
        assert first[1] == Duplicate(original.position), first[1]
    finally:
        await pool.close()

