"""A forged install costs no fsync: the intent is written only for a plan that changes trust.

Every batch holding an install or uninstall wrote its intent (an fsync'd journal line) before it
was judged, so an unauthenticated sender cost the worker an fsync per request. The intent is now
written once the batch is judged, under the head lock and before its COMMIT, naming only the
deliveries whose trust changes the COMMIT would commit — the only ones a lost COMMIT leaves in
doubt (docs/operations.md, "Lifecycle in doubt").
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.conftest import sample
from tests.helpers import Client, install_sample_portal, post
from tests.test_intake import forge


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every fsync this process makes, by descriptor."""
    made: list[int] = []
    real = os.fsync

    def counted(fd: Any) -> None:
        made.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return made


async def test_forged_installs_cost_no_fsync_and_a_genuine_one_still_writes_its_intent(
    client: Client, fsyncs: list[int]
) -> None:
    await install_sample_portal(client)
    fsyncs.clear()
    for i in range(20):
        status, answer = await post(
            client, forge("onappinstall-1", application_token=f"{i:032x}"))
        assert (status, answer["error"]) == (403, "token_replacement_refused")
    assert fsyncs == []  # on main: 20, one intent each

    assert (await post(client, sample("onappuninstall-1")))[0] == 200
    assert fsyncs != []  # a trust change: its intent (and its share) are durable
