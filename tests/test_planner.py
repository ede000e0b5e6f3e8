"""The append planner and the trust fold, alone: pure functions, no PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import drafts
from ledger.hashing import GENESIS_HASH as GENESIS
from ledger.hashing import chain_hash, sha256, timestamp_text
from ledger.models import (
    ConfirmationNeeded,
    Duplicate,
    EventDraft,
    Refusal,
    Spooled,
    Stored,
)
from ledger.planner import Facts, Head, Plan, entry_of, plan
from ledger.settings import TrustPolicy
from ledger.trust import (
    TRUST_EVENT,
    Allowance,
    PortalTrust,
    TrustChange,
    TrustFacts,
    TrustState,
    fold_trust,
    normalise_domain,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
MEMBER = "bac1cd5c8940947a75e0d71b1a84e348"
DOMAIN = "some-domain.bitrix24.com"


def delivery(event: str, token: str, *, ts: int = 1, member: str = MEMBER,
             domain: str | None = DOMAIN, **changes: Any) -> EventDraft:
    payload = f'{{"event":"{event}","ts":"{ts}"}}'.encode()
    made = EventDraft(
        event_type=event, member_id=member, domain=domain, origin="bitrix24", bot_ids=(),
        occurred_at=None, received_at=NOW, payload=payload, payload_sha256=sha256(payload),
        dedup_key=sha256(f"{event}{ts}".encode()), body_sha256=sha256(payload), metadata={},
        presented_sha256=sha256(token.encode()), refusal_excerpt_bytes=100,
    )
    return dataclasses.replace(made, **changes)


def allowed(*, member: str | None = MEMBER, domain: str | None = None,
            position: int = 1) -> TrustFacts:
    return TrustFacts({}, {position: Allowance(position, member, domain)})


def trusted(token: str) -> TrustFacts:
    return TrustFacts({MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.TRUSTED,
                                           sha256(token.encode()))}, {})


def run(batch: list[EventDraft], trust: TrustFacts, *, position: int = 10,
        **options: Any) -> Plan:
    return plan(batch, Facts(trust=trust), Head(position, GENESIS),
                policy=TrustPolicy.ALLOWLIST, **options)


def test_install_uninstall_install_in_one_batch_each_judged_by_the_state_before_it() -> None:
    facts = allowed()
    facts.allowances[2] = Allowance(2, MEMBER, None)  # a second allowance, for the reinstall
    made = run([delivery("ONAPPINSTALL", "T"), delivery("ONAPPUNINSTALL", "T", ts=2),
                delivery("ONAPPINSTALL", "N", ts=3), delivery("ONIMBOTDELETE", "N", ts=4)],
               facts)
    assert [type(o) for o in made.outcomes] == [Stored] * 4
    assert [o.trust_change for o in made.outcomes if isinstance(o, Stored)] == [
        TrustChange.ESTABLISHED, TrustChange.ENDED, TrustChange.ESTABLISHED, None]
    # each lifecycle delivery is followed by its trust event; positions run on without gaps
    assert [row[0] for row in made.events] == list(range(11, 18))
    assert [row[2] for row in made.events] == [
        "ONAPPINSTALL", TRUST_EVENT, "ONAPPUNINSTALL", TRUST_EVENT, "ONAPPINSTALL", TRUST_EVENT,
        "ONIMBOTDELETE"]
    assert [(e.position, e.effect.allowance_position) for e in made.effects] == [
        (12, 1), (14, None), (16, 2)]
    assert facts.portals[MEMBER].token_sha256 == sha256(b"N")
    assert facts.allowances == {}


def test_events_are_chained_each_to_the_one_before() -> None:
    batch = [delivery("ONIMBOTDELETE", "T", ts=1), delivery("ONIMBOTDELETE", "T", ts=2)]
    made = run(batch, trusted("T"), position=0)
    previous = GENESIS
    for row, draft in zip(made.events, batch, strict=True):
        assert row[12] == previous
        assert row[13] == chain_hash(previous, row[0], entry_of(draft)[1], draft.payload_sha256)
        previous = row[13]
    assert made.head == Head(2, previous)


def test_a_duplicate_inside_a_batch_is_stored_once() -> None:
    made = run([delivery("ONIMBOTDELETE", "T"), delivery("ONIMBOTDELETE", "T")], trusted("T"))
    assert made.outcomes == [Stored(11, made.events[0][13], None), Duplicate(11)]
    assert len(made.events) == 1
    assert [r[0] for r in made.redeliveries] == [11]


def test_a_refused_install_leaves_trust_as_it_was_and_is_logged() -> None:
    facts = trusted("T")
    made = run([delivery("ONAPPINSTALL", "X"), delivery("ONIMBOTDELETE", "X", ts=2)], facts)
    assert [(o.status, o.code) for o in made.outcomes if isinstance(o, Refusal)] == [
        (403, "token_replacement_refused"), (401, "invalid_application_token")]
    assert made.events == []
    assert [r.reason for _, r in made.rejections] == [
        "token_replacement_refused", "invalid_application_token"]
    assert facts == trusted("T")


def test_an_allowance_admits_one_install_only() -> None:
    facts = allowed()
    made = run([delivery("ONAPPINSTALL", "T"), delivery("ONAPPUNINSTALL", "T", ts=2),
                delivery("ONAPPINSTALL", "N", ts=3)], facts)
    assert isinstance(made.outcomes[2], Refusal)
    assert made.outcomes[2].code == "portal_not_allowed"
    assert facts.portals[MEMBER].state is TrustState.ENDED


def test_a_domain_allowance_needs_the_portals_confirmation_of_exactly_its_domain() -> None:
    facts = allowed(member=None, domain=DOMAIN)
    install = delivery("ONAPPINSTALL", "T", domain="SOME-DOMAIN.Bitrix24.com.")
    assert run([install], facts.copy()).outcomes == [ConfirmationNeeded(DOMAIN)]
    confirmed = run([dataclasses.replace(install, confirmed_domain=DOMAIN)], facts.copy())
    assert isinstance(confirmed.outcomes[0], Stored)
    refused = run([dataclasses.replace(install, confirmation_refused="unreachable")],
                  facts.copy())
    assert isinstance(refused.outcomes[0], Refusal)
    assert refused.outcomes[0].code == "install_not_confirmed"
    elsewhere = run([delivery("ONAPPINSTALL", "T", domain="other.bitrix24.com",
                              confirmed_domain="other.bitrix24.com")], facts.copy())
    assert isinstance(elsewhere.outcomes[0], Refusal)
    assert elsewhere.outcomes[0].code == "portal_not_allowed"


def test_draining_refuses_what_would_need_a_confirmation_and_logs_every_refusal() -> None:
    facts = allowed(member=None, domain=DOMAIN)
    unlogged = delivery("ONAPPINSTALL", "T", refusal_excerpt_bytes=None)
    made = run([unlogged, delivery("ONIMBOTDELETE", "T", ts=2, refusal_excerpt_bytes=None)],
               facts, draining=True)
    assert [o.code for o in made.outcomes if isinstance(o, Refusal)] == [
        "install_not_confirmed", "unknown_portal"]
    assert len(made.rejections) == 2  # rate limit or not: the record is all that is left


def test_draining_a_stored_draft_again_is_a_duplicate_before_it_is_judged() -> None:
    uninstall = delivery("ONAPPUNINSTALL", "T")
    facts = Facts(trust=TrustFacts({MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)}),
                  seen={(MEMBER, uninstall.dedup_key): 7})
    made = plan([uninstall], facts, Head(10, GENESIS), policy=TrustPolicy.ALLOWLIST,
                draining=True)
    assert made.outcomes == [Duplicate(7)]
    assert made.rejections == []


ENDED = TrustFacts({MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)})


@pytest.mark.parametrize(
    ("trust", "refused"),
    [(ENDED, (403, "portal_uninstalled")), (trusted("N"), (401, "invalid_application_token"))],
    ids=["after an uninstall", "after re-provisioning"],
)
def test_a_refused_redelivery_is_a_duplicate_only_with_the_token_the_original_had(
    trust: TrustFacts, refused: tuple[int, str]
) -> None:
    original = delivery("ONIMBOTDELETE", "T")
    facts = Facts(trust=trust.copy(), seen={(MEMBER, original.dedup_key): 7},
                  accepted={7: sha256(b"T")})
    made = plan([original, delivery("ONIMBOTDELETE", "X"), delivery("ONIMBOTDELETE", "T", ts=2)],
                facts, Head(10, GENESIS), policy=TrustPolicy.ALLOWLIST)
    assert made.outcomes[0] == Duplicate(7)
    assert [row[0] for row in made.redeliveries] == [7]  # one row: the proven redelivery
    for outcome in made.outcomes[1:]:  # another token; a new occurrence under the old token
        assert isinstance(outcome, Refusal)
        assert (outcome.status, outcome.code) == refused
    assert [index for index, _ in made.rejections] == [1, 2]
    assert made.events == []


def test_without_a_known_original_token_a_refused_redelivery_stays_refused() -> None:
    original = delivery("ONIMBOTDELETE", "T")
    facts = Facts(trust=ENDED.copy(), seen={(MEMBER, original.dedup_key): 7})  # e.g. pre-0005
    made = plan([original], facts, Head(10, GENESIS), policy=TrustPolicy.ALLOWLIST)
    assert isinstance(made.outcomes[0], Refusal)
    assert made.redeliveries == []


def test_an_uninstall_redelivered_in_its_own_batch_is_a_duplicate() -> None:
    uninstall = delivery("ONAPPUNINSTALL", "T")
    made = run([uninstall, uninstall, delivery("ONAPPUNINSTALL", "X")], trusted("T"))
    assert made.outcomes[1] == Duplicate(11)
    assert isinstance(made.outcomes[2], Refusal)
    assert [row[0] for row in made.redeliveries] == [11]


def test_a_redelivered_install_needs_no_allowance_with_its_own_token() -> None:
    install = delivery("ONAPPINSTALL", "T")
    facts = Facts(trust=ENDED.copy(), seen={(MEMBER, install.dedup_key): 3},
                  accepted={3: sha256(b"T")})
    made = plan([install], facts, Head(10, GENESIS), policy=TrustPolicy.ALLOWLIST)
    assert made.outcomes == [Duplicate(3)]
    assert made.effects == []


def test_offline_the_planner_judges_only_and_its_refusals_are_final() -> None:
    """A sender is never told 202 for what the drain would refuse on the same trust: a refusal
    offline is answered at once, also for a portal whose trust waits on spooled lifecycle
    events (found by a stress test: 202-spooled deliveries refused on drain)."""
    facts = Facts(trust=trusted("T"))
    made = plan([delivery("ONAPPUNINSTALL", "T"), delivery("ONAPPINSTALL", "N", ts=2),
                 delivery("ONIMBOTDELETE", "N", ts=3), delivery("ONIMBOTJOINCHAT", "T", ts=4)],
                facts, None, policy=TrustPolicy.ALLOWLIST)
    assert made.outcomes[0] == Spooled()
    # no allowance for the reinstall; the old token no longer counts after the uninstall
    assert [(o.status, o.code) for o in made.outcomes[1:] if isinstance(o, Refusal)] == [
        (403, "portal_not_allowed"), (403, "portal_uninstalled"), (403, "portal_uninstalled")]
    assert [e.effect.change for e in made.effects] == [TrustChange.ENDED]
    assert [index for index, _ in made.rejections] == [1, 2, 3]  # logged, spooled with them
    assert made.events == []


def test_offline_a_remembered_copy_is_a_duplicate_and_moves_no_trust() -> None:
    """Offline with this worker's own recent commits (`ledger.recent`) as the dedup facts: an
    install's copy after its uninstall is the duplicate it is online — it establishes nothing
    and leaves the allowance to the genuine reinstall, which follows in the same batch."""
    install = delivery("ONAPPINSTALL", "T")
    trust = allowed(position=4)
    trust.portals[MEMBER] = PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)
    facts = Facts(trust=trust, seen={(MEMBER, install.dedup_key): 3},
                  accepted={3: sha256(b"T")})
    made = plan([install, delivery("ONAPPINSTALL", "N", ts=2),
                 delivery("ONIMBOTJOINCHAT", "N", ts=3)], facts, None,
                policy=TrustPolicy.ALLOWLIST)
    assert made.outcomes == [Duplicate(3), Spooled(), Spooled()]
    assert [(e.effect.change, e.effect.token_sha256, e.cause) for e in made.effects] == [
        (TrustChange.ESTABLISHED, sha256(b"N"), 1)]


def test_offline_a_remembered_copy_refused_by_todays_trust_needs_the_originals_token() -> None:
    original = delivery("ONIMBOTDELETE", "T")
    facts = Facts(trust=trusted("N"), seen={(MEMBER, original.dedup_key): 7},
                  accepted={7: sha256(b"T")})
    made = plan([original, delivery("ONIMBOTDELETE", "X"), delivery("ONIMBOTDELETE", "T", ts=2)],
                facts, None, policy=TrustPolicy.ALLOWLIST)
    assert made.outcomes[0] == Duplicate(7)
    assert [(o.status, o.code) for o in made.outcomes[1:] if isinstance(o, Refusal)] == [
        (401, "invalid_application_token"), (401, "invalid_application_token")]
    assert made.effects == []
    assert made.accepted_offline == set()


def test_offline_a_copy_of_a_spooled_delivery_is_spooled_as_a_copy_and_moves_no_trust() -> None:
    """`Facts.spooled` (accepted and spooled, not drained): its copy with its token is spooled
    as a copy, whatever today's trust says; one with another token is judged as new. A copy
    later in the same batch is a copy too."""
    uninstall = delivery("ONAPPUNINSTALL", "T")
    ended = TrustFacts({MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)}, {})
    facts = Facts(trust=ended, spooled={(MEMBER, uninstall.dedup_key): sha256(b"T")})
    made = plan([uninstall, delivery("ONAPPUNINSTALL", "X")], facts, None,
                policy=TrustPolicy.ALLOWLIST)
    assert made.outcomes[0] == Spooled()
    assert made.copies == {0}
    assert isinstance(made.outcomes[1], Refusal)
    assert made.effects == []
    twice = plan([uninstall, uninstall], Facts(trust=trusted("T")), None,
                 policy=TrustPolicy.ALLOWLIST)
    assert twice.outcomes == [Spooled(), Spooled()]
    assert twice.copies == {1}
    assert len(twice.effects) == 1


def test_the_plan_names_the_token_each_stored_delivery_was_accepted_under() -> None:
    """`Plan.committed`, what the offline cache remembers: by the store's `_ACCEPTED_UNDER` rule
    — an install under the establishment it causes, others under the portal's token then, and
    none when the portal had ended (a drained acceptance judged when it arrived)."""
    trust = allowed(position=4)
    made = run([delivery("ONAPPINSTALL", "T"), delivery("ONIMBOTJOINCHAT", "T", ts=2),
                delivery("ONAPPUNINSTALL", "T", ts=3)], trust)
    assert [(c[2], c[3]) for c in made.committed] == [
        (11, sha256(b"T")), (13, sha256(b"T")), (14, sha256(b"T"))]
    ended = TrustFacts({MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)}, {})
    late = delivery("ONIMBOTJOINCHAT", "T", ts=5, offline_accepted=True, offline_seen=1)
    drained = run([late], ended, draining=True)
    assert isinstance(drained.outcomes[0], Stored)
    assert [(c[2], c[3]) for c in drained.committed] == [(11, None)]


def test_tofu_trusts_the_first_sender() -> None:
    made = plan([delivery("ONAPPINSTALL", "anything")], Facts(), Head(0, GENESIS),
                policy=TrustPolicy.TOFU)
    assert isinstance(made.outcomes[0], Stored)


def test_operator_events_move_trust_in_the_same_batch() -> None:
    facts = TrustFacts()
    provision = drafts.operator_action(TrustChange.PROVISIONED, member_id=MEMBER, domain=DOMAIN,
                                       token="T", actor="t", received_at=NOW)
    made = run([provision, delivery("ONIMBOTDELETE", "T")], facts)
    assert [type(o) for o in made.outcomes] == [Stored, Stored]
    assert facts.portals[MEMBER].state is TrustState.TRUSTED


def test_the_fold_of_the_planned_trust_events_is_the_planned_state() -> None:
    facts = allowed()
    made = run([delivery("ONAPPINSTALL", "T"), delivery("ONAPPUNINSTALL", "T", ts=2)],
               facts.copy())

    @dataclasses.dataclass
    class Row:
        position: int
        event_type: str
        origin: str
        payload: dict[str, Any]

    import orjson

    history = [Row(1, TRUST_EVENT, "operator", {"change": "allowed", "member_id": MEMBER})]
    history += [Row(r[0], r[2], r[3], orjson.loads(r[9])) for r in made.events]
    folded = fold_trust(history)
    assert folded.portals == {MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)}
    assert folded.allowances == {}


@pytest.mark.parametrize(("given", "expected"), [
    ("SOME-DOMAIN.Bitrix24.com.", "some-domain.bitrix24.com"),
    # every other spelling is another name (found by a break test)
    ("  some-domain.bitrix24.com", None),
    ("some-domain.bitrix24.com..", None),
    ("some-domain.bitrix24.com\n", None),
    ("some\u200b-domain.bitrix24.com", None),
    ("some\u00ad-domain.bitrix24.com", None),
    ("\uff53ome-domain.bitrix24.com", None),
    ("some-domain\u3002bitrix24\u3002com", None),
    ("пример.рф", "xn--e1afmkfd.xn--p1ai"),
    ("some-domain.bitrix24.com/evil", None),
    ("a..b", None),
    ("", None),
    (None, None),
])
def test_domains_compare_after_normalisation(given: str | None, expected: str | None) -> None:
    assert normalise_domain(given) == expected


def test_offline_an_acceptance_on_settled_trust_is_marked_one_on_provisional_not() -> None:
    settled = plan([delivery("ONIMBOTJOINCHAT", "t1")], Facts(trust=trusted("t1")), None,
                   policy=TrustPolicy.ALLOWLIST)
    assert settled.accepted_offline == {0}
    provisional = plan([delivery("ONIMBOTJOINCHAT", "t1")], Facts(trust=trusted("t1")), None,
                       policy=TrustPolicy.ALLOWLIST, provisional=frozenset({MEMBER}))
    assert provisional.accepted_offline == set()
    lifecycle = plan([delivery("ONAPPUNINSTALL", "t1")], Facts(trust=trusted("t1")), None,
                     policy=TrustPolicy.ALLOWLIST)
    assert lifecycle.accepted_offline == set()  # it changes trust: judged again on drain


def test_on_drain_a_delivery_accepted_offline_is_stored_though_trust_ended_meanwhile() -> None:
    """Another worker's spooled uninstall may drain first; what this worker acknowledged (202)
    after judging it on settled trust is stored all the same. An unmarked one is refused."""
    ended = TrustFacts({MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)}, {})
    marked = delivery("ONIMBOTJOINCHAT", "t1", offline_accepted=True)
    unmarked = delivery("ONIMBOTMESSAGEADD", "t1")
    made = run([marked, unmarked], ended, draining=True)
    assert isinstance(made.outcomes[0], Stored)
    assert isinstance(made.outcomes[1], Refusal)


def test_on_drain_a_held_acceptance_is_stored_unless_its_portal_was_refused_before_it() -> None:
    """`held`: accepted offline on provisional trust whose journal entries all reached
    PostgreSQL. Stored as judged then, changing no trust; but after a refusal of the same portal
    earlier in the batch (perhaps the entry it depended on) it is judged again."""
    ended = TrustFacts({MEMBER: PortalTrust(MEMBER, DOMAIN, TrustState.ENDED, None)}, {})
    join = delivery("ONIMBOTJOINCHAT", "t1", offline_seen=3)
    made = run([join], ended.copy(), draining=True, held=frozenset({0}))
    assert isinstance(made.outcomes[0], Stored)
    assert made.effects == []
    forged = delivery("ONAPPINSTALL", "f", offline_seen=2)  # no allowance: refused
    made = run([forged, join], ended.copy(), draining=True, held=frozenset({1}))
    assert [type(o) for o in made.outcomes] == [Refusal, Refusal]
    made = run([join], ended.copy(), draining=True)  # not held: judged again
    assert isinstance(made.outcomes[0], Refusal)


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                timezone(timedelta(hours=-11))])))
def test_timestamp_text_formats_utc_fields_as_the_converting_path_does(moment: datetime) -> None:
    """The chained timestamp text: a UTC moment's fields formatted directly (the intake's) are
    byte for byte what converting and `isoformat` make of it (every other zone's path)."""
    expected = moment.astimezone(UTC).replace(tzinfo=None).isoformat(
        timespec="microseconds") + "Z"
    assert timestamp_text(moment) == expected
    assert timestamp_text(moment.astimezone(UTC)) == expected
    assert timestamp_text(moment.astimezone(UTC).replace(microsecond=0)) == (
        expected[:-8] + ".000000Z")
