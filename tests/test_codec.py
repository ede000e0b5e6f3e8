"""One codec for records that cross a boundary: exact round trips, strict reading, versions."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest

from ledger import codec, drafts
from ledger.errors import CodecError
from ledger.models import EventDraft, RejectionDraft
from ledger.projections.fold import Bot, State, dump_state, load_state
from ledger.settings import Settings
from ledger.simulation import Traffic
from ledger.trust import TrustChange
from tests.conftest import ClientFactory
from tests.test_projections import ingest, projector_of

Admin: TypeAlias = "asyncpg.Connection[Any]"


def operator_draft() -> EventDraft:
    return drafts.operator_action(
        TrustChange.PROVISIONED, member_id="m1", domain="d.example", token="t" * 32,
        actor="test", received_at=datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
    )


def test_a_draft_becomes_plain_json_and_comes_back_equal() -> None:
    draft = dataclasses.replace(operator_draft(), bot_ids=(5, 7))
    data = codec.to_json(draft)
    assert orjson.loads(orjson.dumps(data)) == data  # plain JSON values only
    assert data["payload_sha256"] == draft.payload_sha256.hex()
    assert data["received_at"] == "2026-03-01T12:00:00+00:00"
    assert data["trust_change"] == "provisioned"
    assert data["bot_ids"] == [5, 7]
    assert codec.from_json(EventDraft, data) == draft


def test_times_are_written_in_utc_whatever_their_zone() -> None:
    moscow = timezone(timedelta(hours=3))
    draft = dataclasses.replace(operator_draft(),
                                received_at=datetime(2026, 3, 1, 15, 0, tzinfo=moscow))
    data = codec.to_json(draft)
    assert data["received_at"] == "2026-03-01T12:00:00+00:00"
    assert codec.from_json(EventDraft, data).received_at == draft.received_at


def test_a_rejection_with_optional_fields_round_trips() -> None:
    rejection = drafts.rejection_draft(
        received_at=datetime.now(UTC), status=400, reason="x", detail="y", peer=None,
        content_type=None, body=b"a=1", claim=drafts.claim_of_text(b"a=1", 10),
    )
    assert codec.from_json(RejectionDraft, codec.to_json(rejection)) == rejection


@pytest.mark.parametrize("change", [
    {"surprise": 1},  # a field the type does not have
    {"received_at": "2026-03-01T12:00:00"},  # a time without its zone
    {"bot_ids": "5"},  # a string where a tuple belongs
    {"payload_sha256": "zz"},  # not hex
    {"trust_change": "promoted"},  # no such enum value
    {"body_size": "12"},  # a string where an int belongs
    {"body_size": True},  # a bool is not an int here
])
def test_a_record_that_is_not_exactly_its_type_is_refused(change: dict[str, Any]) -> None:
    data = codec.to_json(operator_draft()) | change
    with pytest.raises(CodecError):
        codec.from_json(EventDraft, data)


def test_a_record_missing_a_required_field_is_refused() -> None:
    data = codec.to_json(operator_draft())
    del data["member_id"]
    with pytest.raises(CodecError, match="member_id"):
        codec.from_json(EventDraft, data)


def test_a_naive_time_is_never_written() -> None:
    draft = dataclasses.replace(operator_draft(), received_at=datetime(2026, 3, 1))
    with pytest.raises(CodecError):
        codec.to_json(draft)


# ---- fold snapshots --------------------------------------------------------------------------


def format_1_snapshot(state: State) -> bytes:
    """A snapshot as it was written before snapshots carried a version."""

    def row(item: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(item):
            value = getattr(item, f.name)
            if isinstance(value, bytes):
                value = {"hex": value.hex()}
            elif isinstance(value, datetime):
                value = {"at": value.isoformat()}
            out[f.name] = value
        return out

    return orjson.dumps({
        "position": state.position,
        "bots": [row(b) for b in state.bots.values()],
        "deletions": [], "portals": [], "lifecycle": [],
    })


def test_a_snapshot_of_another_format_is_ignored_for_a_fold_from_the_start() -> None:
    state = State(position=40)
    bot = Bot("m1", 5, "echo", "v1", "active", 3, datetime(2026, 3, 1, tzinfo=UTC))
    state.bots[bot.key] = bot
    assert load_state(dump_state(state)).bots == state.bots
    assert orjson.loads(dump_state(state))["version"] == 2
    for blob in (format_1_snapshot(state), b"{not json", orjson.dumps({"version": 99})):
        assert load_state(blob) == State()  # position 0: the caller folds everything


async def test_as_of_ignores_a_snapshot_of_an_old_format_and_still_answers_right(
    make_client: ClientFactory, settings_factory: Callable[..., Settings], admin: Admin
) -> None:
    client = await make_client(settings_factory(projector_snapshot_every=100))
    projector = projector_of(client)
    await ingest(client, Traffic(seed=5, portals=3), 250)
    await projector.catch_up()
    head = projector.checkpoint
    expected = dump_state(await projector._fold(State(), head, lambda n: None))
    saved = await admin.fetch("SELECT position, state FROM projections.snapshots")
    assert saved  # there were snapshots to fold from
    for record in saved:
        old = format_1_snapshot(load_state(zlib.decompress(record["state"])))
        await admin.execute("UPDATE projections.snapshots SET state = $1 WHERE position = $2",
                            zlib.compress(old), record["position"])
    folded: list[int] = []
    assert dump_state(await projector.fold_to(head, folded.append)) == expected
    assert sum(folded) == head  # every snapshot ignored: folded from position 0
