"""The append planner: what one batch of drafts becomes, decided in memory, without I/O.

`plan(drafts, facts, head)` judges each Bitrix24 delivery by `ledger.trust`, de-duplicates,
numbers and chains what is accepted, adds the trust event each lifecycle delivery causes, and
moves the trust state by every trust event it plans (`ledger.trust.apply`), so later drafts of the
same batch are judged by it. The store runs it under the head lock on the facts it loaded
(lock → load facts → plan → write); the offline judge runs it without a head (`head=None`: judge
only) on the trust state known while PostgreSQL is away. One function, so both decide alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ledger import foldrecord
from ledger.drafts import effect_of_draft, follow_up, refusal
from ledger.envelope import INSTALL
from ledger.hashing import canonical_json, chain_hash, event_entry
from ledger.models import (
    ORIGIN_BITRIX24,
    ConfirmationNeeded,
    Draft,
    Duplicate,
    EventDraft,
    Outcome,
    Refusal,
    RejectionDraft,
    Spooled,
    Stored,
)
from ledger.settings import TrustPolicy
from ledger.trust import (
    Accepted,
    Claim,
    NeedsConfirmation,
    Refused,
    TrustChange,
    TrustEffect,
    TrustFacts,
    TrustState,
    apply,
    judge,
    normalise_domain,
    proves_redelivery,
)

# a Bitrix24 delivery stored: member_id, dedup key, position, the token digest it was accepted
# under (the store's `_ACCEPTED_UNDER` rule; None: no token proves a redelivery of it)
Committed = tuple[str, bytes, int, bytes | None]


@dataclass(slots=True)
class Head:
    position: int
    hash: bytes


@dataclass(slots=True)
class Facts:
    """What the planner needs from the store: trust, the dedup keys already stored, and for
    those of them a delivery may need it, the token digest the stored event was accepted with
    (by position) — so a redelivery refused by today's trust (uninstalled, re-provisioned) is
    still recognised when, and only when, it presents that token."""

    trust: TrustFacts = field(default_factory=TrustFacts)
    seen: dict[tuple[str, bytes], int] = field(default_factory=dict)
    accepted: dict[int, bytes] = field(default_factory=dict)
    # offline: deliveries this worker spooled as accepted and has not drained yet, with the
    # token digest each presented — the original of a copy, stored once the spool drains
    spooled: dict[tuple[str, bytes], bytes | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PlannedEffect:
    """A trust change the plan makes: its event's position (None offline) and its cause."""

    position: int | None
    effect: TrustEffect
    cause: int  # index of the draft that caused it


@dataclass(slots=True)
class Plan:
    outcomes: list[Outcome | None]  # None: a rejection draft, answered once it is written
    events: list[tuple[Any, ...]] = field(default_factory=list)  # rows for ledger.events
    redeliveries: list[tuple[Any, ...]] = field(default_factory=list)
    rejections: list[tuple[int, RejectionDraft]] = field(default_factory=list)
    effects: list[PlannedEffect] = field(default_factory=list)
    head: Head | None = None
    # offline: drafts accepted on settled trust that change no trust (`offline_accepted`)
    accepted_offline: set[int] = field(default_factory=set)
    # offline: copies of a delivery in `Facts.spooled` (Spooled, changing no trust): the drain
    # stores the original first, and then finds each copy stored
    copies: set[int] = field(default_factory=set)
    # online: each Bitrix24 delivery stored, as (member_id, dedup_key, position, the token
    # digest it was accepted under by the online rule) — what `ledger.recent` remembers
    committed: list[Committed] = field(default_factory=list)


def entry_of(draft: EventDraft) -> tuple[bytes, bytes]:
    """The metadata text (canonical, so a verifier hashes it as it is) and the chained entry:
    everything of an event's hash that does not depend on its position or predecessor.
    Pure and position-free, so callers compute it before taking the head lock."""
    metadata = canonical_json(draft.metadata)
    entry = event_entry(
        member_id=draft.member_id,
        event_type=draft.event_type,
        origin=draft.origin,
        bot_ids=draft.bot_ids,
        occurred_at=draft.occurred_at,
        received_at=draft.received_at,
        dedup_key=draft.dedup_key,
        body_sha256=draft.body_sha256,
        metadata=orjson.Fragment(metadata),
    )
    return metadata, entry


def claim_of(draft: EventDraft) -> Claim:
    assert draft.presented_sha256 is not None
    return Claim(
        event_type=draft.event_type,
        member_id=draft.member_id,
        # only an install's domain is judged (an allowance by domain): the others' is not
        # normalised (~1 µs a delivery)
        domain=normalise_domain(draft.domain) if draft.event_type == INSTALL else None,
        presented_sha256=draft.presented_sha256,
        confirmed_domain=draft.confirmed_domain,
        confirmation_refused=draft.confirmation_refused,
    )


def plan(
    drafts: Sequence[Draft],
    facts: Facts,
    head: Head | None,
    *,
    policy: TrustPolicy,
    draining: bool = False,
    provisional: frozenset[str] = frozenset(),
    prepared: dict[int, tuple[bytes, bytes]] | None = None,
    held: frozenset[int] = frozenset(),
) -> Plan:
    """Decide a batch, in order. `facts` is moved along (the caller passes a copy to keep one).

    - `head=None` plans offline: verdicts and trust effects only, accepted drafts are `Spooled`.
      A refusal is final, as online: a sender is never told 202 for what the drain would refuse
      on the same trust. An acceptance on settled trust that changes none is final too
      (`accepted_offline`); one for a portal in `provisional` (its trust moved by spooled
      lifecycle events not yet in PostgreSQL) or one that changes trust is judged again on
      drain, where PostgreSQL's trust — by then the journal's, in its order — has the last word
      (it differs only when the offline state was stale: see ledger.offline). `facts.seen` and
      `facts.accepted` offline are what this worker itself committed recently
      (`ledger.recent`): a delivery found there is the duplicate it is online — accepted by
      today's (offline) trust, or proven by the original's token — and changes no trust. One
      found in `facts.spooled` (accepted and spooled, not drained yet) is, on the same terms,
      a copy (`Plan.copies`): spooled, changing no trust — the drain stores the original first.
    - `draining`: the drafts come from the spool. Every refusal gets a rejection record (the
      sender heard 202 long ago; the record is all that is left), an install that would need the
      portal's confirmation is refused (its access token was never kept), and a draft already
      stored is a duplicate before it is judged (a drain repeated after a crash).
    - otherwise a delivery today's trust refuses is still the duplicate of a stored occurrence
      if it presents the token that occurrence was accepted with (`Facts.accepted`): Bitrix24
      redelivers after an uninstall or a re-provisioning too. Without that token it is refused.
    - `prepared`: entries computed earlier, by `id()` of their draft.
    - `held` (draining): indices of drafts accepted offline on provisional trust whose portal's
      earlier journal entries all reached PostgreSQL (`ledger.offline.OfflineTrust.held`): they
      are stored as judged then, changing no trust — unless a draft of the same portal was
      refused earlier in this batch (an entry they depended on may be that one).
    """
    result = Plan(outcomes=[None] * len(drafts), head=head)
    provisional_now = set(provisional)
    refused_here: set[str] = set()  # draining: portals with a refusal in this batch
    prepared = prepared or {}

    def add_event(draft: EventDraft) -> int:
        assert result.head is not None
        current = result.head
        position = current.position + 1
        metadata, entry = prepared.get(id(draft)) or entry_of(draft)
        digest = chain_hash(current.hash, position, entry, draft.payload_sha256)
        result.events.append(
            (position, draft.member_id, draft.event_type, draft.origin,
             "{" + ",".join(map(str, draft.bot_ids)) + "}", draft.occurred_at,
             draft.received_at, draft.dedup_key, draft.body_sha256, draft.payload.decode(),
             draft.payload_sha256, metadata.decode(), current.hash, digest,
             draft.fold_record if draft.fold_record is not None
             else foldrecord.stored(draft.event_type, draft.origin, orjson.loads(draft.payload)))
        )
        facts.seen[(draft.member_id, draft.dedup_key)] = position
        if draft.origin == ORIGIN_BITRIX24 and draft.presented_sha256 is not None:
            facts.accepted[position] = draft.presented_sha256
            trust = facts.trust.portals.get(draft.member_id)
            result.committed.append((
                draft.member_id, draft.dedup_key, position,
                # the store's `_ACCEPTED_UNDER`: the portal's token as its last trust event
                # before this one left it (an install's own establishment: see below)
                trust.token_sha256 if trust is not None and trust.state is TrustState.TRUSTED
                else None,
            ))
        current.position, current.hash = position, digest
        return position

    def refuse(index: int, draft: EventDraft, verdict: Refused) -> None:
        result.outcomes[index] = Refusal(verdict.status, verdict.code, verdict.message, 0)
        refused_here.add(draft.member_id)
        source = draft
        if draining and draft.refusal_excerpt_bytes is None:
            source = dataclasses.replace(draft, refusal_excerpt_bytes=0)  # hash and size, at least
        record = refusal(source, status=verdict.status, reason=verdict.code,
                         detail=verdict.message)
        if record is not None:
            result.rejections.append((index, record))

    def duplicate(index: int, draft: EventDraft, known: int) -> None:
        result.outcomes[index] = Duplicate(known)
        result.redeliveries.append(
            (known, draft.received_at, draft.body_sha256, draft.metadata.get("peer"))
        )

    def proven_redelivery(draft: EventDraft) -> int | None:
        """The stored original of a delivery today's trust does not accept, if the delivery
        holds the token the original was accepted with."""
        if draining:
            return None
        known = facts.seen.get((draft.member_id, draft.dedup_key))
        if known is None or not proves_redelivery(draft.presented_sha256,
                                                  facts.accepted.get(known)):
            return None
        return known

    for index, draft in enumerate(drafts):
        if isinstance(draft, RejectionDraft):
            result.rejections.append((index, draft))
            continue
        if draining and head is not None:
            known = facts.seen.get((draft.member_id, draft.dedup_key))
            if known is not None:
                duplicate(index, draft, known)
                continue
        effect: TrustEffect | None = None
        if draft.origin == ORIGIN_BITRIX24:
            verdict = judge(claim_of(draft), facts.trust, policy=policy)
            if draining and draft.offline_accepted and not (
                isinstance(verdict, Accepted) and verdict.change is not None
            ):
                verdict = Accepted()  # judged when it arrived (see EventDraft.offline_accepted)
            elif (draining and index in held and draft.member_id not in refused_here
                    and not isinstance(verdict, Accepted)):
                verdict = Accepted()  # judged when it arrived, on entries that all held
            if not isinstance(verdict, Accepted):
                original = proven_redelivery(draft)
                if original is not None:
                    duplicate(index, draft, original)
                    continue
                if head is None and proves_redelivery(
                    draft.presented_sha256, facts.spooled.get((draft.member_id, draft.dedup_key))
                ):  # the copy of a delivery spooled as accepted, with its token
                    result.outcomes[index] = Spooled()
                    result.copies.add(index)
                    continue
            if isinstance(verdict, NeedsConfirmation):
                if draining:
                    verdict = Refused(
                        403, "install_not_confirmed",
                        f"the install could not be confirmed with {verdict.domain}: it was "
                        "spooled during an outage without its access token",
                    )
                else:
                    result.outcomes[index] = ConfirmationNeeded(verdict.domain)
                    continue
            if isinstance(verdict, Refused):
                refuse(index, draft, verdict)
                continue
            assert isinstance(verdict, Accepted)
            if verdict.change is not None:
                effect = _effect(verdict, draft)
        else:
            effect = effect_of_draft(draft)

        if head is None:
            known = facts.seen.get((draft.member_id, draft.dedup_key))
            if known is not None:  # stored already (by this worker): online, a duplicate too
                duplicate(index, draft, known)
                continue
            result.outcomes[index] = Spooled()
            if (draft.member_id, draft.dedup_key) in facts.spooled:
                result.copies.add(index)  # its original drains first: it moves no trust
                continue
            if draft.origin == ORIGIN_BITRIX24:  # a copy later in this batch is a copy
                facts.spooled[(draft.member_id, draft.dedup_key)] = draft.presented_sha256
            if (draft.origin == ORIGIN_BITRIX24 and effect is None
                    and draft.member_id not in provisional_now):
                result.accepted_offline.add(index)
            if effect is not None:
                apply(facts.trust, effect, 0)
                result.effects.append(PlannedEffect(None, effect, index))
                if effect.member_id:
                    provisional_now.add(effect.member_id)
            continue

        if not draining:
            known = facts.seen.get((draft.member_id, draft.dedup_key))
            if known is not None:
                duplicate(index, draft, known)
                continue
        position = add_event(draft)
        assert result.head is not None
        if effect is None:
            result.outcomes[index] = Stored(position, result.head.hash, None)
            continue
        if draft.origin == ORIGIN_BITRIX24:
            assert isinstance(verdict, Accepted)
            assert verdict.change is not None
            result.outcomes[index] = Stored(position, result.head.hash, verdict.change)
            if effect.change is TrustChange.ESTABLISHED and result.committed and (
                result.committed[-1][2] == position
            ):  # accepted under the establishment it causes, right after it
                member_id, dedup_key, _, _ = result.committed[-1]
                result.committed[-1] = (member_id, dedup_key, position, effect.token_sha256)
            trust_draft = follow_up(
                verdict.change, draft, position, allowance_position=verdict.allowance_position
            )
            trust_position = add_event(trust_draft)
        else:
            assert draft.trust_change is not None
            result.outcomes[index] = Stored(position, result.head.hash, draft.trust_change)
            trust_position = position
        apply(facts.trust, effect, trust_position)
        result.effects.append(PlannedEffect(trust_position, effect, index))
    return result


def _effect(verdict: Accepted, draft: EventDraft) -> TrustEffect:
    assert verdict.change is not None
    return TrustEffect(
        verdict.change,
        draft.member_id,
        normalise_domain(draft.domain),
        draft.presented_sha256 if verdict.change is TrustChange.ESTABLISHED else None,
        verdict.allowance_position,
    )
