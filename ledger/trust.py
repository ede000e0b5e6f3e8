"""Who may write to the ledger: the per-portal trust decision, as pure functions.

The store calls `judge` inside the append transaction, with the portal's trust row read under the
store's single serialisation point, so two concurrent installs cannot both win. Tokens are only
ever compared as SHA-256 digests, in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum

from ledger.envelope import INSTALL, UNINSTALL
from ledger.settings import TrustPolicy


class TrustState(StrEnum):
    TRUSTED = "trusted"
    ENDED = "ended"


class TrustChange(StrEnum):
    """Every way trust changes; each is recorded as a ledger event of its own."""

    ALLOWED = "allowed"  # operator allowed a portal's future install
    ESTABLISHED = "established"  # an ONAPPINSTALL set the token
    PROVISIONED = "provisioned"  # operator supplied the token of an existing installation
    ENDED = "ended"  # ONAPPUNINSTALL or operator revocation


@dataclass(frozen=True, slots=True)
class PortalTrust:
    member_id: str
    domain: str | None
    state: TrustState
    token_sha256: bytes | None


@dataclass(frozen=True, slots=True)
class Accepted:
    change: TrustChange | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    status: int
    code: str
    message: str


Verdict = Accepted | Refused


def token_matches(presented_sha256: bytes, trust: PortalTrust | None) -> bool:
    if trust is None or trust.state is not TrustState.TRUSTED or trust.token_sha256 is None:
        return False
    return hmac.compare_digest(presented_sha256, trust.token_sha256)


def judge(
    event_type: str,
    presented_sha256: bytes,
    trust: PortalTrust | None,
    *,
    allowed: bool,
    policy: TrustPolicy,
) -> Verdict:
    """Decide one verified-or-not delivery against the portal's current trust."""
    if event_type == INSTALL:
        return _judge_install(presented_sha256, trust, allowed=allowed, policy=policy)
    if trust is None:
        return Refused(403, "unknown_portal", "no trusted application token for this portal")
    if trust.state is TrustState.ENDED:
        return Refused(403, "portal_uninstalled", "the application was uninstalled on this portal")
    if not token_matches(presented_sha256, trust):
        # ONAPPUPDATE included: a new token cannot vouch for itself, see README "Trust model"
        return Refused(401, "invalid_application_token", "application_token does not match")
    if event_type == UNINSTALL:
        return Accepted(TrustChange.ENDED)
    return Accepted()


def _judge_install(
    presented_sha256: bytes, trust: PortalTrust | None, *, allowed: bool, policy: TrustPolicy
) -> Verdict:
    if trust is not None and trust.state is TrustState.TRUSTED:
        if token_matches(presented_sha256, trust):
            return Accepted()  # the same installation announcing itself again
        return Refused(
            403,
            "token_replacement_refused",
            "the portal already has a trusted token; uninstall first or re-provision it "
            "with `ledger portals trust`",
        )
    if allowed or policy is TrustPolicy.TOFU:
        return Accepted(TrustChange.ESTABLISHED)
    return Refused(
        403,
        "portal_not_allowed",
        "this portal is not allowed to install; an operator runs `ledger portals allow`",
    )
