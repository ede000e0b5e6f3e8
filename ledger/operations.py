"""Operator actions on trust, shared by the CLI and anything else that performs them."""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime

from ledger import drafts
from ledger.errors import OperatorActionRefused
from ledger.models import Refusal, Stored
from ledger.storage.store import EventStore
from ledger.trust import TrustChange


def local_actor() -> str:
    """Who is acting, as far as this machine knows: recorded with the event."""
    return f"operator {getpass.getuser()}@{socket.gethostname()} via cli"


async def change_trust(
    store: EventStore,
    change: TrustChange,
    *,
    member_id: str | None = None,
    domain: str | None = None,
    token: str | None = None,
    actor: str | None = None,
) -> int:
    """Record one trust change as an event (and apply it); returns the event's position."""
    draft = drafts.operator_action(
        change,
        member_id=member_id,
        domain=domain,
        token=token,
        actor=actor or local_actor(),
        received_at=datetime.now(UTC),
    )
    (outcome,) = await store.append([draft])
    if isinstance(outcome, Refusal):
        raise OperatorActionRefused(outcome.message)
    assert isinstance(outcome, Stored)
    return outcome.position
