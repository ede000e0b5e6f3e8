"""Redeliveries during an outage: answered from what this worker recently stored, as online.

PostgreSQL is cut with the socket relay of the outage tests. Without dedup facts the offline
judge took a copy of a stored event for a new delivery: refused once its portal's trust moved
(bench.churn's `refused-but-stored`), and an install's copy after the uninstall became a new
establishment that took the allowance of the genuine reinstall — which was then refused, with
every delivery carrying its token (`never-stored`). Each scenario asserts the answer the online
path gives, after the relay is back, too.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import pytest

from ledger.hashing import sha256
from ledger.offline import OfflineTrust
from ledger.planner import PlannedEffect
from ledger.recent import RecentCommits
from ledger.settings import TrustPolicy
from ledger.trust import TrustChange, TrustEffect, TrustFacts, TrustState, apply
from ledger.web import OFFLINE
from tests.conftest import DOMAIN, TOKEN, ClientFactory, sample
from tests.helpers import Client, allow_sample_portal, drained, install_sample_portal, post
from tests.test_intake import forge
from tests.test_trust_outage import (
    FORGED_TOKEN,
    NEW_TOKEN,
    known_everywhere,
    refused,
    reinstall,
    spooled,
    stored_types,
    trusted_digest,
)

Admin: TypeAlias = "asyncpg.Connection[Any]"


async def duplicate_of(client: Client, body: bytes) -> int:
    """Posts `body`, which must be answered as the duplicate of a stored event: its position."""
    status, answer = await post(client, body)
    assert (status, answer.get("duplicate")) == (200, True), answer
    position: int = answer["position"]
    return position


async def stored(client: Client, body: bytes) -> int:
    status, answer = await post(client, body)
    assert (status, answer.get("duplicate")) == (200, False), answer
    position: int = answer["position"]
    return position


async def reinstalled_online(client: Client) -> None:
    """Uninstalled and installed again with NEW_TOKEN, online; every app has read it."""
    assert (await post(client, sample("onappuninstall-1")))[0] == 200
    await allow_sample_portal(client)
    await stored(client, reinstall())
    await known_everywhere(client)


async def redeliveries(admin: Admin) -> list[int]:
    return [r["position"] for r in await admin.fetch(
        "SELECT position FROM ledger.redeliveries ORDER BY position")]


async def test_a_redelivery_of_an_event_stored_before_the_outage_is_a_duplicate(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """Its portal reinstalled with a new token since: refused 401 before the cache (online it
    is the duplicate proven by the token its original was accepted with)."""
    relay, settings_for = outage
    client: Client = await make_client(settings_for())
    await install_sample_portal(client)
    join = sample("onimbotjoinchat-1")
    original = await stored(client, join)
    await reinstalled_online(client)

    await relay.cut()
    assert await duplicate_of(client, join) == original
    # a copy with the current token: accepted by today's trust, and stored already
    assert await duplicate_of(client, forge("onimbotjoinchat-1",
                                            application_token=NEW_TOKEN)) == original
    await relay.start()
    await drained(client)
    assert await redeliveries(admin) == [original, original]  # recorded on drain, as online
    assert await admin.fetchval("SELECT count(*) FROM ledger.rejections") == 0
    assert await duplicate_of(client, join) == original  # the online answer is the same


async def test_an_installs_copy_after_its_uninstall_takes_no_allowance_from_the_reinstall(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """The sender reordered: a copy of the first install arrives after the uninstall. Before
    the cache it was accepted offline as an establishment of the old token, consuming the
    allowance meant for the reinstall; the genuine reinstall was then refused 403
    (token_replacement_refused) and its deliveries 401 — never stored."""
    relay, settings_for = outage
    client: Client = await make_client(settings_for())
    await install_sample_portal(client)
    install = sample("onappinstall-1")
    first = await duplicate_of(client, install)  # stored: its position
    assert (await post(client, sample("onappuninstall-1")))[0] == 200
    await allow_sample_portal(client)  # for the reinstall to come
    await known_everywhere(client)

    await relay.cut()
    assert await duplicate_of(client, install) == first  # no trust moved, no allowance taken
    await spooled(client, reinstall())
    join = forge("onimbotjoinchat-1", application_token=NEW_TOKEN)
    await spooled(client, join)
    # the old token is not trusted again by the copy: the reinstall's token is
    await refused(client, forge("onimbotmessageadd-1", application_token=TOKEN), 401,
                  "invalid_application_token")

    await relay.start()
    await drained(client)
    assert await stored_types(admin) == [
        "ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL", "ONIMBOTJOINCHAT"]
    assert await trusted_digest(admin) == sha256(NEW_TOKEN.encode())
    assert [r["reason"] for r in await admin.fetch(
        "SELECT reason FROM ledger.rejections")] == ["invalid_application_token"]
    assert await redeliveries(admin) == [first, first]  # the online one, then the outage's
    assert (await post(client, join))[1]["duplicate"] is True


async def test_forged_and_stale_tokens_are_still_refused_offline(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    relay, settings_for = outage
    client: Client = await make_client(settings_for())
    await install_sample_portal(client)
    join = sample("onimbotjoinchat-1")
    await stored(client, join)
    await reinstalled_online(client)

    await relay.cut()
    # a copy of a stored event with a token that never was the portal's: not a duplicate
    await refused(client, forge("onimbotjoinchat-1", application_token=FORGED_TOKEN), 401,
                  "invalid_application_token")
    # the old token on a delivery this worker never stored proves nothing
    await refused(client, sample("onimbotmessageadd-1"), 401, "invalid_application_token")
    # a forged install while the portal is trusted
    await refused(client, reinstall(FORGED_TOKEN), 403, "token_replacement_refused")
    await relay.start()
    await drained(client)
    reasons = [r["reason"] for r in await admin.fetch(
        "SELECT reason FROM ledger.rejections ORDER BY position")]
    assert reasons == ["invalid_application_token", "invalid_application_token",
                       "token_replacement_refused"]
    assert await redeliveries(admin) == []
    # and online the same three are refused the same way
    await refused(client, forge("onimbotjoinchat-1", application_token=FORGED_TOKEN), 401,
                  "invalid_application_token")
    await refused(client, sample("onimbotmessageadd-1"), 401, "invalid_application_token")
    await refused(client, reinstall(FORGED_TOKEN), 403, "token_replacement_refused")


async def test_a_redelivery_of_an_event_stored_after_an_allowance_is_proven_by_its_token(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """An operator's allowance naming a trusted portal changes neither its state nor its
    token: an event stored after it was accepted under the portal's token, online and offline
    (online once ignored the allowance only by accident of ordering: it took the allowance as
    the last trust event and refused the redelivery)."""
    relay, settings_for = outage
    client: Client = await make_client(settings_for())
    await install_sample_portal(client)
    await allow_sample_portal(client)  # while trusted: for a reinstall later
    join = sample("onimbotjoinchat-1")
    original = await stored(client, join)
    assert (await post(client, sample("onappuninstall-1")))[0] == 200
    await stored(client, reinstall())  # takes the allowance
    await known_everywhere(client)
    assert await duplicate_of(client, join) == original  # online

    await relay.cut()
    assert await duplicate_of(client, join) == original  # offline, the same
    await relay.start()
    await drained(client)
    assert await admin.fetchval("SELECT count(*) FROM ledger.rejections") == 0


async def test_lifecycle_deliveries_another_worker_committed_are_duplicates_offline_too(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """Installs and uninstalls are the copies that move trust, so the worker that commits one
    shares it, as stored, through the journal it already writes for the trust change: worker
    1 never stored the install, yet its copy after the uninstall is a duplicate there too."""
    relay, settings_for = outage
    first: Client = await make_client(settings_for(worker=0))
    second: Client = await make_client(settings_for(worker=1))
    await install_sample_portal(first)
    install = sample("onappinstall-1")
    installed = await duplicate_of(first, install)
    uninstalled = await stored(first, sample("onappuninstall-1"))
    await allow_sample_portal(first)
    await known_everywhere(first, second)

    await relay.cut()
    assert await duplicate_of(second, install) == installed
    assert await duplicate_of(second, sample("onappuninstall-1")) == uninstalled
    await spooled(second, reinstall())
    # the old installation's uninstall, after the reinstall: proven by the token it had
    assert await duplicate_of(second, sample("onappuninstall-1")) == uninstalled
    await relay.start()
    await drained(second)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]
    assert await trusted_digest(admin) == sha256(NEW_TOKEN.encode())
    assert await admin.fetchval("SELECT count(*) FROM ledger.rejections") == 0


async def test_a_copy_of_a_delivery_spooled_in_the_same_outage_is_answered_as_its_original(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """The senders' copies usually arrive while the original is still in the spool, not yet
    stored: a copy after its portal's spooled uninstall was refused 403 (or 401 after a
    spooled reinstall), and the original then stored on drain (bench.churn). It is spooled
    like the original, changes no trust, and is a redelivery of it on drain."""
    relay, settings_for = outage
    client: Client = await make_client(settings_for())
    await install_sample_portal(client)
    await allow_sample_portal(client)
    await known_everywhere(client)

    await relay.cut()
    join, uninstall = sample("onimbotjoinchat-1"), sample("onappuninstall-1")
    await spooled(client, join)
    await spooled(client, uninstall)
    await spooled(client, join)  # after the spooled uninstall: its copy, not a new delivery
    await spooled(client, uninstall)  # a copy: no second ending
    await spooled(client, reinstall())
    await spooled(client, uninstall)  # the old token, after the reinstall: still its copy
    await refused(client, forge("onimbotjoinchat-1", application_token=FORGED_TOKEN), 401,
                  "invalid_application_token")  # a copy needs the original's token
    await refused(client, sample("onimbotmessageadd-1"), 401,
                  "invalid_application_token")  # the old token proves no new delivery
    await relay.start()
    await drained(client)
    assert await stored_types(admin) == [
        "ONAPPINSTALL", "ONIMBOTJOINCHAT", "ONAPPUNINSTALL", "ONAPPINSTALL"]
    assert await trusted_digest(admin) == sha256(NEW_TOKEN.encode())
    assert len(await redeliveries(admin)) == 3
    assert [r["reason"] for r in await admin.fetch(
        "SELECT reason FROM ledger.rejections ORDER BY position")] == [
        "invalid_application_token", "invalid_application_token"]


async def test_what_a_worker_cannot_know_is_judged_as_before(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """The cache is this worker's and in memory: another worker's commits (but for the
    lifecycle ones the journal shares), and this worker's from before a restart, are unknown
    offline — such a copy is judged as new (here refused, its portal reinstalled since), as
    before the cache."""
    relay, settings_for = outage
    first: Client = await make_client(settings_for(worker=0))
    second: Client = await make_client(settings_for(worker=1))
    await install_sample_portal(first)
    join = sample("onimbotjoinchat-1")
    original = await stored(first, join)
    await reinstalled_online(first)
    await known_everywhere(second)
    await first.close()
    restarted: Client = await make_client(settings_for(worker=0))

    await relay.cut()
    await refused(second, join, 401, "invalid_application_token")
    await refused(restarted, join, 401, "invalid_application_token")
    await relay.start()
    await drained(second)
    await drained(restarted)
    assert await duplicate_of(second, join) == original  # online it is known again


async def test_only_committed_deliveries_enter_the_cache_and_its_bound_comes_from_settings(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """A sender cannot grow it: refused deliveries never enter; LEDGER_OFFLINE_CACHE_ENTRIES
    bounds it (here 2: the oldest commit is forgotten, and its copy judged as new offline)."""
    relay, settings_for = outage
    client: Client = await make_client(settings_for(offline_cache_entries=2))
    assert client.app is not None
    recent = client.app[OFFLINE].recent
    await install_sample_portal(client)
    join = sample("onimbotjoinchat-1")
    await stored(client, join)
    assert len(recent) == 2
    for n in range(20):  # forged deliveries, each a new occurrence
        await refused(client, forge("onimbotmessageadd-1", application_token=f"{n:032d}"),
                      401, "invalid_application_token")
    assert len(recent) == 2
    message = await stored(client, sample("onimbotmessageadd-1"))
    assert len(recent) == 2  # the install forgotten, oldest first
    await reinstalled_online(client)

    await relay.cut()
    assert await duplicate_of(client, reinstall()) > message  # remembered: the newest
    await refused(client, join, 401, "invalid_application_token")  # forgotten: judged as new
    await relay.start()
    await drained(client)


# ---- the cache and the planner, without PostgreSQL -------------------------------------------


def test_the_cache_is_bounded_by_entries_and_by_bytes_oldest_first() -> None:
    by_entries = RecentCommits(max_entries=4, max_bytes=1 << 30)
    keys = [(f"m{i}", os.urandom(32)) for i in range(5)]
    by_entries.remember((m, k, i + 1, None) for i, (m, k) in enumerate(keys))
    seen, _ = by_entries.facts(keys)
    assert seen == {keys[2]: 3, keys[3]: 4, keys[4]: 5}

    by_bytes = RecentCommits(max_entries=1 << 30, max_bytes=1000)
    by_bytes.remember((m, k, i + 1, b"d" * 32) for i, (m, k) in enumerate(keys))
    assert 0 < len(by_bytes) < 5
    assert by_bytes.size_bytes <= 1000
    seen, accepted = by_bytes.facts(keys)
    assert set(seen) == set(keys[5 - len(by_bytes):])
    assert set(accepted) == set(seen.values())

    off = RecentCommits(max_entries=0, max_bytes=0)
    off.remember((m, k, 1, None) for m, k in keys)
    assert len(off) == 0
    assert off.size_bytes == 0


@pytest.mark.parametrize("member", ["%032x", "\U0001f600" * 119 + "%09x"],
                         ids=["hex", "four-byte-characters"])
def test_the_byte_bound_holds_in_memory_whatever_characters_the_member_ids_have(
    member: str,
) -> None:
    """A portal's member_id is the sender's (any 128 characters pass the envelope; under `tofu`
    any install makes a portal whose deliveries are committed): counted by characters, ids of
    four-byte characters took 1.5 times the byte bound, measured."""
    bound = 2 << 20
    tracemalloc.start()
    try:
        cache = RecentCommits(max_entries=1 << 30, max_bytes=bound)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            cache.remember([(member % i, os.urandom(32), i + 1, os.urandom(32))])
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) > 1000
    assert cache.size_bytes <= bound
    assert used <= bound, (used, cache.size_bytes)


async def test_a_copy_drained_with_its_original_leaves_the_offline_state_where_postgresql_is(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """A copy spooled behind its original drains in the same batch, as the duplicate of what
    the batch just stored. Its answer once settled the original's journal entry at the copy's
    event position instead of the original's trust event, and the offline state then applied
    that old entry after this worker's own later commits: an uninstall over the reinstall
    PostgreSQL trusts. In the next outage a forged install was accepted (202) and refused on
    drain — acknowledged, then lost (bench.churn) — and the genuine token was refused."""
    relay, settings_for = outage
    # no periodic refresh: the state is the one the drain left (a refresh is what hid it)
    client: Client = await make_client(settings_for(trust_refresh_seconds=3600))
    await install_sample_portal(client)
    await allow_sample_portal(client)
    await known_everywhere(client)

    await relay.cut()
    uninstall = sample("onappuninstall-1")
    await spooled(client, uninstall)
    await spooled(client, reinstall())
    await spooled(client, uninstall)  # its copy, behind the reinstall
    await relay.start()
    await drained(client)
    assert await trusted_digest(admin) == sha256(NEW_TOKEN.encode())
    await allow_sample_portal(client)  # an allowance a forged install could take offline

    await relay.cut()
    # the state offline is PostgreSQL's: the reinstall's token is trusted, no other install
    await spooled(client, forge("onimbotjoinchat-1", application_token=NEW_TOKEN))
    await refused(client, reinstall(FORGED_TOKEN), 403, "token_replacement_refused")
    await relay.start()
    await drained(client)
    assert await trusted_digest(admin) == sha256(NEW_TOKEN.encode())
    assert await stored_types(admin) == [
        "ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL", "ONIMBOTJOINCHAT"]
    assert [r["reason"] for r in await admin.fetch(
        "SELECT reason FROM ledger.rejections ORDER BY position")] == [
        "token_replacement_refused"]


async def test_the_offline_state_applies_committed_changes_in_positions_order(
    tmp_path: Path,
) -> None:
    """Each worker counts its own commits at once and learns the other's through the journal;
    the state took its own first, so another worker's earlier establishment undid this
    worker's later uninstall (offline: a reinstall accepted that PostgreSQL refuses on drain)
    until a refresh. PostgreSQL applied them by position: so does the offline state."""
    first = OfflineTrust(tmp_path, worker=0, policy=TrustPolicy.ALLOWLIST)
    second = OfflineTrust(tmp_path, worker=1, policy=TrustPolicy.ALLOWLIST)
    member = "m" * 32
    token = sha256(TOKEN.encode())
    await second.note_committed(
        [PlannedEffect(30, TrustEffect(TrustChange.ESTABLISHED, member, DOMAIN, token), 0)])
    await first.note_committed(
        [PlannedEffect(40, TrustEffect(TrustChange.ENDED, member, DOMAIN), 0)])
    for worker in (first, second):
        facts, provisional = worker.view()
        assert facts.portals[member].state is TrustState.ENDED
        assert provisional == set()


async def test_a_refresh_landing_while_a_view_is_made_leaves_it_one_consistent_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline judging makes its view in a thread while the loop's refresh replaces the base.
    The view read the base before the refresh and the base's position after it, so it skipped
    the journal's committed changes in between as "in the base" — which it had not: another
    worker's shared uninstall was missed, and a delivery under the ended token accepted 202
    (refused on drain). Here the refresh lands between the two reads, deterministically."""
    worker = OfflineTrust(tmp_path, worker=0, policy=TrustPolicy.ALLOWLIST)
    other = OfflineTrust(tmp_path, worker=1, policy=TrustPolicy.ALLOWLIST)
    member = "m" * 32
    token = sha256(TOKEN.encode())
    established = TrustEffect(TrustChange.ESTABLISHED, member, DOMAIN, token)
    ended = TrustEffect(TrustChange.ENDED, member, DOMAIN)
    before = TrustFacts()
    apply(before, established, 5)
    worker._rebase(before, 5)
    await other.note_committed([PlannedEffect(10, ended, 0)])  # shared through the journal
    after = before.copy()
    apply(after, ended, 10)

    copy = TrustFacts.copy
    refreshed = False

    def refresh_lands_meanwhile(facts: TrustFacts) -> TrustFacts:
        nonlocal refreshed
        made = copy(facts)
        if not refreshed:  # the base is read: the refresh replaces it now
            refreshed = True
            worker._rebase(after, 10)
        return made

    monkeypatch.setattr(TrustFacts, "copy", refresh_lands_meanwhile)
    facts, _ = worker.view()
    assert refreshed
    assert facts.portals[member].state is TrustState.ENDED


async def test_a_copy_of_another_workers_spooled_install_takes_no_allowance_from_the_reinstall(
    make_client: ClientFactory, outage: Any, admin: Admin
) -> None:
    """The hypothesis of bench.churn's unexplained never-stored runs: worker 0 spooled the
    portal's install and then its uninstall; a late copy of that install reaches worker 1,
    which never stored it and had no dedup fact for it — judged as a new establishment of the
    old token, it took the allowance meant for the reinstall, and the genuine reinstall was
    refused 403 token_replacement_refused (then everything under its token 401). The journal
    holds worker 0's spooled install as the cause of its entry: the copy is a copy there."""
    relay, settings_for = outage
    first: Client = await make_client(settings_for(worker=0))
    second: Client = await make_client(settings_for(worker=1))
    await allow_sample_portal(first)  # the install's
    await allow_sample_portal(first)  # the reinstall's
    await known_everywhere(first, second)

    await relay.cut()
    install, uninstall = sample("onappinstall-1"), sample("onappuninstall-1")
    await spooled(first, install)
    await spooled(first, uninstall)
    await spooled(second, install)  # the late copy: moves no trust, takes no allowance
    await spooled(second, reinstall())
    join = forge("onimbotjoinchat-1", application_token=NEW_TOKEN)
    await spooled(first, join)
    await refused(second, forge("onimbotmessageadd-1", application_token=TOKEN), 401,
                  "invalid_application_token")  # the old token is not trusted again
    await relay.start()
    await drained(first)
    await drained(second)
    assert await stored_types(admin) == [
        "ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL", "ONIMBOTJOINCHAT"]
    assert await trusted_digest(admin) == sha256(NEW_TOKEN.encode())
    assert len(await redeliveries(admin)) == 1  # the copy, recorded on drain
    assert [r["reason"] for r in await admin.fetch(
        "SELECT reason FROM ledger.rejections")] == ["invalid_application_token"]
