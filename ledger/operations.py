"""Operator actions on trust, shared by the CLI and anything else that performs them."""

from __future__ import annotations

import getpass
import socket
from collections.abc import Iterable
from datetime import UTC, datetime

from ledger import drafts
from ledger.errors import BadQuery, NotFound, OperatorActionRefused
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


async def resolve_portal(store: EventStore, portal: str | None) -> str | None:
    """A member_id, or the member_id of the portal with that domain (every `--portal` takes
    either), from what the service role sees of trust."""
    if portal is None or "." not in portal:
        return portal
    return portal_by_domain(portal, [(row.member_id, row.domain) for row in await store.portals()])


def portal_by_domain(portal: str, known: Iterable[tuple[str | None, str | None]]) -> str:
    """The member_id of the portal whose domain is `portal`; an unknown domain is an error
    rather than an empty answer, and so is a domain more than one portal has had (a portal
    renamed, another taking the old name): answering for the first would silently leave the
    other's rows out."""
    domain = portal.strip().lower()
    found = sorted({m for m, d in known if d == domain and m})
    if len(found) > 1:
        raise BadQuery(f"the domain {domain!r} names {len(found)} portals "
                       f"({', '.join(found)}); pass the member_id of the one you mean")
    if found:
        return found[0]
    raise NotFound(
        f"no portal with domain {domain!r} has a known member_id; see `ledger portals list`, "
        "or pass the member_id"
    )
