"""What the service does for its latency at a moderate rate (bench/RESULTS.md, "Latency at
1000/s"): observable settings of the running process, not timings."""

from __future__ import annotations

import gc

from ledger.settings import Settings
from ledger.web import GC_FULL_EVERY, GC_YOUNG_THRESHOLD
from tests.conftest import ClientFactory


async def test_while_serving_full_collections_are_rarer_and_start_up_is_frozen(
    make_client: ClientFactory, settings: Settings
) -> None:
    """A full collection rescans every object the service keeps (decoding templates, caches)
    and stalls the event loop for tens of milliseconds: while the app runs they come ten times
    less often, and what start-up allocated is out of the collector's sight; both undone when
    it stops. The young generation waits for `GC_YOUNG_THRESHOLD` objects, not 700: at 700 it
    ran every ~23 deliveries over every request in flight (~7 % of the intake's CPU); nor
    10,000: each young collection then stalled the loop for milliseconds at a fixed rate, and
    the gen1 one over ten of them for 13-20 ms. A full collection still waits for as many
    allocations as Python's defaults take ten of."""
    before = gc.get_threshold()
    client = await make_client(settings)
    try:
        assert gc.get_threshold() == (max(GC_YOUNG_THRESHOLD, before[0]), before[1],
                                      GC_FULL_EVERY)
        assert before[2] < GC_FULL_EVERY
        young, middle, full = gc.get_threshold()
        assert 700 < young <= 2_000  # neither every ~23 deliveries nor millisecond stalls
        assert young * middle * full >= 10 * before[0] * before[1] * before[2]
        assert gc.get_freeze_count() > 0
        response = await client.get("/healthz")
        assert response.status == 200
    finally:
        await client.close()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
