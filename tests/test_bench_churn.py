"""bench.churn's never-stored classification: its headline counts only what the service could
have stored, so the line between the senders' races and the service's misjudgements is tested.

A small corpus of one portal — install, messages, uninstall, reinstall — with answers made up
per scenario (times in seconds from the start)."""

from __future__ import annotations

import hashlib
from collections import Counter

from bench.churn import SERVICE_KINDS, Answer, corpus, lifecycle_of, timeline
from ledger.envelope import INSTALL, UNINSTALL

DELIVERIES, _ = corpus(200, 1, 9)
FACTS = [lifecycle_of(body) for _, body in DELIVERIES]
INSTALLS = [i for i, (event, _) in enumerate(FACTS) if event == INSTALL]
UNINSTALLS = [i for i, (event, _) in enumerate(FACTS) if event == UNINSTALL]


def sha(index: int) -> str:
    return hashlib.sha256(DELIVERIES[index][1]).hexdigest()


def classify(answers: dict[int, list[tuple[float, float, int]]]) -> Counter[str]:
    """Every delivery answered 202 at (i, i + 0.5) unless `answers` says otherwise (sent,
    answered, status per copy); stored when any copy was answered 2xx."""
    rows = []
    for index in range(len(DELIVERIES)):
        for sender, (sent, answered, status) in enumerate(
                answers.get(index, [(float(index), index + 0.5, 202)])):
            rows.append(Answer(sender, index, sha(index), status, {}, sent, answered))
    stored = {a.sha for a in rows if a.status in (200, 202)}
    kinds, _ = timeline(rows, DELIVERIES, stored, 0.0)
    return kinds


def test_the_corpus_has_the_lifecycle_these_scenarios_need() -> None:
    assert INSTALLS[0] == 0
    assert UNINSTALLS
    assert UNINSTALLS[0] + 1 in INSTALLS


def test_a_reinstall_refused_after_its_uninstall_was_acknowledged_is_misjudged() -> None:
    uninstall = UNINSTALLS[0]
    reinstall = uninstall + 1
    following = [i for i in range(reinstall + 1, len(FACTS))
                 if FACTS[i][0] not in (INSTALL, UNINSTALL)][:3]
    kinds = classify({reinstall: [(uninstall + 0.6, uninstall + 0.7, 403)],
                      # every message under its token is refused with it
                      **{i: [(i + 0.0, i + 0.1, 401)] for i in following}})
    assert kinds == Counter({"misjudged": 1, "behind-misjudged": len(following)})
    assert all(k.removeprefix("behind-") in SERVICE_KINDS for k in kinds)


def test_a_reinstall_sent_before_its_uninstall_was_acknowledged_raced() -> None:
    uninstall = UNINSTALLS[0]
    reinstall = uninstall + 1
    kinds = classify({reinstall: [(uninstall + 0.1, uninstall + 0.7, 403)]})
    assert kinds["raced"] == 1
    assert kinds["misjudged"] == 0


def test_a_message_in_flight_with_its_portals_next_uninstall_raced() -> None:
    uninstall = UNINSTALLS[0]
    message = uninstall - 1
    assert FACTS[message][0] not in (INSTALL, UNINSTALL)
    # sent before the uninstall went out, answered (refused) after it was sent
    kinds = classify({message: [(uninstall - 0.2, uninstall + 0.3, 403)]})
    assert kinds == Counter({"raced": 1})
    # answered before the uninstall was sent: the service refused what it should have stored
    kinds = classify({message: [(uninstall - 0.2, uninstall - 0.1, 403)]})
    assert kinds == Counter({"misjudged": 1})


def test_503_in_doubt_unanswered_and_acknowledged_are_told_apart() -> None:
    uninstall = UNINSTALLS[0]
    reinstall = uninstall + 1
    in_doubt = classify({uninstall: [(uninstall + 0.0, uninstall + 0.4, 503)] * 3})
    assert in_doubt["in-doubt"] == 1
    unanswered = classify({reinstall: [(reinstall, 0.0, -1)] * 3})
    assert unanswered["unanswered"] == 1
    assert unanswered["misjudged"] == 0
