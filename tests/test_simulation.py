"""The traffic simulator produces what a real ledger accepts, in lifecycle order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from ledger import loadgen, wire
from ledger.simulation import Traffic
from tests.helpers import Client, allow_installs


async def test_simulated_traffic_is_accepted_under_concurrency(
    client: Client, admin: asyncpg.Connection[Any]
) -> None:
    traffic = Traffic(seed=5, portals=3)
    same = Traffic(seed=5, portals=3)
    await allow_installs(client, [same.next() for _ in range(600)])
    url = str(client.make_url("/bitrix24/events"))
    report = await loadgen.send(url, traffic, count=600, concurrency=32)
    assert report.statuses == {200: 600}
    stored = await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE origin = 'bitrix24'"
    )
    assert stored == 600
    assert report.percentile(50) > 0


def test_the_corpus_holds_php_encoded_bodies(tmp_path: Path) -> None:
    loadgen.write_corpus(tmp_path, Traffic(seed=2), 50)
    bodies = sorted(tmp_path.glob("*.form"))
    assert len(bodies) == 50
    document = wire.parse_php_form(bodies[0].read_bytes(), max_fields=9999, max_nesting=9)
    assert document["event"] == "ONAPPINSTALL"


def test_same_seed_same_traffic() -> None:
    first, second = Traffic(seed=9), Traffic(seed=9)
    assert [first.next().document for _ in range(200)] == [
        second.next().document for _ in range(200)
    ]
