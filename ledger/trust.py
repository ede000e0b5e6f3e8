"""Who may write to the ledger: the trust state, the one fold that builds it, the one judge.

Pure code, and the only place trust is decided. Trust is a fold of the store: every change is a
`LEDGER.TRUST_CHANGED` event recording its *effect* (`TrustEffect`: new state, token digest, the
allowance it consumed), and `apply` is the one function that moves the state by an effect. It is
used

- by the append planner (`ledger.planner`) under the store's head lock, on facts loaded for the
  batch, for each trust event it plans;
- by the offline judge (`ledger.offline`), on the last known state plus the effects of lifecycle
  deliveries spooled while PostgreSQL is away, so what is judged offline is judged on drain;
- by `fold_trust`, which rebuilds the whole state from the trust events (verification);
- and mirrored by the trigger that maintains `ledger.portal_trust` / `ledger.portal_allowances`
  (migration 0005), which applies the same recorded effects and decides nothing.

Tokens are only ever compared as SHA-256 digests, in constant time.
"""

from __future__ import annotations

import hmac
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ledger.envelope import INSTALL, UNINSTALL
from ledger.settings import TrustPolicy

TRUST_EVENT = "LEDGER.TRUST_CHANGED"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                       r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


class TrustState(StrEnum):
    TRUSTED = "trusted"
    ENDED = "ended"


class TrustChange(StrEnum):
    """Every way trust changes; each is recorded as a ledger event of its own."""

    ALLOWED = "allowed"  # operator allowed one portal's next install
    ESTABLISHED = "established"  # an ONAPPINSTALL set the token
    PROVISIONED = "provisioned"  # operator supplied the token of an existing installation
    ENDED = "ended"  # ONAPPUNINSTALL or operator revocation


def normalise_domain(value: str | None) -> str | None:
    """A portal domain as compared everywhere: lower case, no trailing dot, IDNA (punycode).

    None for anything that is not a host name (such a delivery can match no domain allowance).
    """
    if not isinstance(value, str):
        return None
    # one trailing dot (the DNS root) is the same name; anything else a sender adds — spaces,
    # controls, invisible or compatibility characters, empty labels — is another spelling
    text = value[:-1] if value.endswith(".") else value
    if not text.isascii():
        if any(dot in text for dot in "\u3002\uff0e\uff61") or unicodedata.normalize(
            "NFC", text
        ) != text or any(
            unicodedata.category(c)[0] in "CZ" or unicodedata.normalize("NFKC", c) != c
            for c in text
        ):
            return None
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    text = text.lower()
    return text if _HOSTNAME.fullmatch(text) else None


@dataclass(frozen=True, slots=True)
class PortalTrust:
    member_id: str
    domain: str | None
    state: TrustState
    token_sha256: bytes | None

    @property
    def fingerprint(self) -> str | None:
        return self.token_sha256.hex()[:12] if self.token_sha256 else None


@dataclass(frozen=True, slots=True)
class Allowance:
    """An operator's permission for one portal's next install, open until an install uses it."""

    position: int  # of the ALLOWED event: its identity, and the order allowances are used in
    member_id: str | None
    domain: str | None


@dataclass(frozen=True, slots=True)
class TrustEffect:
    """What one trust event records; `apply` moves the state by it."""

    change: TrustChange
    member_id: str  # "" for an allowance that names only a domain
    domain: str | None
    token_sha256: bytes | None = None
    allowance_position: int | None = None  # the allowance this establishment consumed

    def as_json(self) -> dict[str, Any]:
        return {
            "change": self.change.value,
            "member_id": self.member_id,
            "domain": self.domain,
            "token_sha256": self.token_sha256.hex() if self.token_sha256 else None,
            "allowance_position": self.allowance_position,
        }


@dataclass(slots=True)
class TrustFacts:
    """The trust state: portals by member_id and the open allowances (by position, in order)."""

    portals: dict[str, PortalTrust] = field(default_factory=dict)
    allowances: dict[int, Allowance] = field(default_factory=dict)

    def copy(self) -> TrustFacts:
        return TrustFacts(dict(self.portals), dict(self.allowances))

    def allowance_for(self, *, member_id: str | None = None,
                      domain: str | None = None) -> Allowance | None:
        """The oldest open allowance naming this member_id (or this normalised domain)."""
        for allowance in sorted(self.allowances.values(), key=lambda a: a.position):
            if member_id is not None and allowance.member_id == member_id:
                return allowance
            if domain is not None and allowance.domain == domain:
                return allowance
        return None


def apply(facts: TrustFacts, effect: TrustEffect, position: int) -> None:
    """Move `facts` by one trust event at `position` (in place). The fold's only step."""
    if effect.change is TrustChange.ALLOWED:
        facts.allowances[position] = Allowance(
            position, effect.member_id or None, None if effect.member_id else effect.domain
        )
        return
    previous = facts.portals.get(effect.member_id)
    domain = effect.domain or (previous.domain if previous else None)
    if effect.change is TrustChange.ENDED:
        facts.portals[effect.member_id] = PortalTrust(
            effect.member_id, domain, TrustState.ENDED, None
        )
        return
    facts.portals[effect.member_id] = PortalTrust(
        effect.member_id, domain, TrustState.TRUSTED, effect.token_sha256
    )
    if effect.allowance_position is not None:
        facts.allowances.pop(effect.allowance_position, None)


def effect_of(payload: Mapping[str, Any]) -> TrustEffect | None:
    """The effect a stored trust event's payload records (None if it records none we know).

    Events written before migration 0005 carry only the token's fingerprint: their effect has no
    digest (such a portal verifies no token until it is re-provisioned).
    """
    try:
        change = TrustChange(str(payload.get("change")))
    except ValueError:
        return None
    member_id = payload.get("member_id")
    token = payload.get("token_sha256")
    allowance = payload.get("allowance_position")
    try:
        digest = bytes.fromhex(token) if isinstance(token, str) else None
    except ValueError:
        digest = None
    return TrustEffect(
        change,
        member_id if isinstance(member_id, str) else "",
        normalise_domain(payload.get("domain")),
        digest,
        allowance if isinstance(allowance, int) and not isinstance(allowance, bool) else None,
    )


class TrustRecord(Protocol):
    """A stored event as the fold needs it (`ledger.projections.fold.StoredEvent` is one)."""

    @property
    def position(self) -> int: ...
    @property
    def event_type(self) -> str: ...
    @property
    def origin(self) -> str: ...
    @property
    def payload(self) -> Mapping[str, Any]: ...


def fold_trust(events: Iterable[TrustRecord], start: TrustFacts | None = None) -> TrustFacts:
    """Trust as the store's trust events (in position order) make it; other events are skipped.

    `.portals` is what `ledger.portal_trust` must hold; `.allowances` the open rows of
    `ledger.portal_allowances`.
    """
    facts = start.copy() if start is not None else TrustFacts()
    for event in events:
        if event.event_type != TRUST_EVENT or event.origin == "bitrix24":
            continue  # only the ledger and its operators write trust events
        effect = effect_of(event.payload)
        if effect is not None:
            apply(facts, effect, event.position)
    return facts


# ---- the decision ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    change: TrustChange | None = None
    allowance_position: int | None = None  # consumed by this install


# the verdict on nearly every delivery, made once (a frozen dataclass costs ~0.9 µs to build)
ACCEPTED = Accepted()


@dataclass(frozen=True, slots=True)
class Refused:
    status: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class NeedsConfirmation:
    """Admissible only by a domain allowance: the portal must confirm the install first."""

    domain: str


Verdict = Accepted | Refused | NeedsConfirmation


@dataclass(slots=True)  # one per delivery, never changed (frozen costs ~0.7 µs more to build)
class Claim:
    """What a Bitrix24 delivery claims, as the judge needs it."""

    event_type: str
    member_id: str
    domain: str | None  # normalised; an install's only (no other is judged by domain)
    presented_sha256: bytes
    confirmed_domain: str | None = None  # the portal at this domain confirmed the install
    confirmation_refused: str | None = None  # why the confirmation failed, when it did


def token_matches(presented_sha256: bytes, trust: PortalTrust | None) -> bool:
    if trust is None or trust.state is not TrustState.TRUSTED or trust.token_sha256 is None:
        return False
    return hmac.compare_digest(presented_sha256, trust.token_sha256)


def token_accepted_under(effect: TrustEffect | None) -> bytes | None:
    """The token digest a portal's deliveries were accepted with after this trust event
    (None after an ending, or an event from before digests were recorded)."""
    if effect is None or effect.change not in (TrustChange.ESTABLISHED, TrustChange.PROVISIONED):
        return None
    return effect.token_sha256


def proves_redelivery(presented_sha256: bytes | None, accepted_sha256: bytes | None) -> bool:
    """Whether a delivery refused now may still be answered as the duplicate of a stored one:
    only if it presents the token the original was accepted with (full digests, constant time;
    the 48-bit fingerprint in an event's metadata is readable by every ledger reader, and a
    preimage of 48 bits can be searched for offline, so it proves nothing)."""
    if presented_sha256 is None or accepted_sha256 is None:
        return False
    return hmac.compare_digest(presented_sha256, accepted_sha256)


def judge(claim: Claim, facts: TrustFacts, *, policy: TrustPolicy) -> Verdict:
    """Decide one delivery against the current trust state."""
    trust = facts.portals.get(claim.member_id)
    if claim.event_type == INSTALL:
        return _judge_install(claim, trust, facts, policy)
    if trust is None:
        return Refused(403, "unknown_portal", "no trusted application token for this portal")
    if trust.state is TrustState.ENDED:
        return Refused(403, "portal_uninstalled", "the application was uninstalled on this portal")
    if not token_matches(claim.presented_sha256, trust):
        # ONAPPUPDATE included: a new token cannot vouch for itself, see README "Trust model"
        return Refused(401, "invalid_application_token", "application_token does not match")
    if claim.event_type == UNINSTALL:
        return Accepted(TrustChange.ENDED)
    return ACCEPTED


def _judge_install(
    claim: Claim, trust: PortalTrust | None, facts: TrustFacts, policy: TrustPolicy
) -> Verdict:
    if trust is not None and trust.state is TrustState.TRUSTED:
        if token_matches(claim.presented_sha256, trust):
            return ACCEPTED  # the same installation announcing itself again
        return Refused(
            403,
            "token_replacement_refused",
            "the portal already has a trusted token; uninstall first or re-provision it "
            "with `ledger portals trust`",
        )
    by_member = facts.allowance_for(member_id=claim.member_id)
    if by_member is not None:
        return Accepted(TrustChange.ESTABLISHED, by_member.position)
    by_domain = facts.allowance_for(domain=claim.domain) if claim.domain else None
    if by_domain is not None:
        assert by_domain.domain is not None
        if claim.confirmed_domain == by_domain.domain:
            return Accepted(TrustChange.ESTABLISHED, by_domain.position)
        if claim.confirmation_refused is not None:
            return Refused(
                403,
                "install_not_confirmed",
                f"the portal {by_domain.domain} did not confirm this install "
                f"({claim.confirmation_refused})",
            )
        return NeedsConfirmation(by_domain.domain)
    if policy is TrustPolicy.TOFU:
        return Accepted(TrustChange.ESTABLISHED)
    return Refused(
        403,
        "portal_not_allowed",
        "this portal is not allowed to install; an operator runs `ledger portals allow`",
    )
