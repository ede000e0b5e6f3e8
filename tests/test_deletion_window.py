"""One rule for a deletion's time in every `from`/`to` window: its `ts`, never later than its
received time (`readers.deletion_time`). Found by a "break this" review: a deletion whose `ts`
was in the year 9999 was missing from every bounded `GET /deletions` window (and the CLI's
export) yet appeared in `ledger report` for the same window — two surfaces, two answers."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from ledger import wire
from tests.conftest import Database, sample
from tests.helpers import PROJECTOR, Client, install_sample_portal, post
from tests.test_api import bearer, get
from tests.test_as_of_sender_time import YEAR_9999
from tests.test_derived_state import cli


def deletion(bot_id: int, ts: int) -> bytes:
    """The sample portal's deletion of `bot_id`, sent with `ts`."""
    document = wire.parse_php_form(sample("onimbotdelete-1"), max_fields=999, max_nesting=9)
    document["data"]["BOT_ID"] = str(bot_id)
    document["ts"] = str(ts)
    return wire.http_build_query(document)


async def surfaces(client: Client, headers: dict[str, str], database: Database, tmp: Path,
                   start: datetime, end: datetime) -> dict[str, set[int]]:
    """The bot ids each surface answers for the deletions in [start, end)."""
    window = {"from": start.isoformat(), "to": end.isoformat()}
    head = (await get(client, "/projection", headers))["position"]
    found = {
        "api": {d["bot_id"] for d in await get(client, "/deletions", headers, **window)},
        "api as of": {d["bot_id"] for d in await get(client, "/deletions", headers,
                                                     as_of=f"position:{head}", **window)},
    }
    export = tmp / f"d-{start.timestamp():.0f}.jsonl"
    exported = await cli(database, "export", "deletions", "--format", "jsonl", "--output",
                         str(export), "--from", window["from"], "--to", window["to"])
    assert exported.exit_code == 0, exported.output
    found["cli export"] = {orjson.loads(line)["bot_id"]
                           for line in export.read_text().splitlines()}
    report = tmp / f"r-{start.timestamp():.0f}.html"
    made = await cli(database, "report", "--output", str(report),
                     "--from", window["from"], "--to", window["to"])
    assert made.exit_code == 0, made.output
    embedded = re.search(r'<pre class="export" id="export-deletions">(.*?)</pre>',
                         report.read_text(encoding="utf-8"), re.S)
    assert embedded
    import html

    rows = list(csv.DictReader(io.StringIO(html.unescape(embedded.group(1)))))
    found["report (console reader)"] = {int(r["bot_id"]) for r in rows}
    return found


async def test_a_deletion_is_in_the_same_windows_on_every_surface(
    client: Client, database: Database, tmp_path: Path
) -> None:
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1"]:
        assert (await post(client, sample(name)))[0] == 200
    assert (await post(client, deletion(571, YEAR_9999)))[0] == 200  # counts when received
    assert (await post(client, deletion(567, 978307200)))[0] == 200  # 2001: kept as sent
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    headers = await bearer(client)
    now = datetime.now(UTC)
    windows: list[tuple[datetime, datetime, set[int]]] = [
        (now - timedelta(hours=1), now + timedelta(hours=1), {571}),
        (datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 1, 2, tzinfo=UTC), {567}),
        (datetime(9999, 12, 31, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999,
                                                      tzinfo=UTC), set()),
    ]
    for start, end, expected in windows:
        answers: dict[str, Any] = await surfaces(client, headers, database, tmp_path, start, end)
        assert answers == dict.fromkeys(answers, expected), (start, end)
