"""The console in a real browser: headless Chromium (the system's `chromium`) driven by
Playwright, against a running ledger. Screenshots of every page go to $CONSOLE_SCREENSHOTS
(docs/console/ holds the committed ones) or the test's temporary directory."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ledger.console.app import SESSIONS
from ledger.simulation import Traffic
from ledger.storage.audit_store import AuditStore
from ledger.web import STORE
from tests.conftest import DOMAIN, MEMBER_ID, sample
from tests.helpers import PROJECTOR, Client, install_sample_portal, post
from tests.test_console import DELETED_AT, make_token
from tests.test_projections import ingest

BOT_567 = re.compile(r"^567\b")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.environ.get("CONSOLE_SCREENSHOTS")  # read before tests clear the environment

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)"
)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    directory = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
async def served(client: Client) -> Client:
    """The sample portal's story (bot 567 deleted by user 27) and some generated traffic."""
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimcommandadd-1",
                 "onimbotmessageadd-2", "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
    await post(client, b"garbage=1")  # one rejected delivery for the rejections page
    await ingest(client, Traffic(seed=7, portals=2), 60)
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    return client


@pytest.fixture
async def browser_page(served: Client) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        context = await browser.new_context(
            base_url=str(served.make_url("")).rstrip("/"), accept_downloads=True,
            viewport={"width": 1280, "height": 800},
        )
        page = await context.new_page()
        page.set_default_timeout(15_000)
        yield page
        await context.close()
        await browser.close()


async def shoot(page: Any, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


async def sign_in(page: Any, token: str) -> None:
    await page.get_by_label("Read token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def test_an_auditor_reads_the_console_in_a_browser(
    served: Client, browser_page: Any, shots: Path, tmp_path: Path
) -> None:
    page = browser_page
    await page.goto("/console/bots")
    assert "/console/sign-in" in page.url  # no session: sent to sign in
    await shoot(page, shots, "sign-in")

    await sign_in(page, "lgr_" + "w" * 43)
    assert await page.get_by_role("alert").inner_text() == (
        "That token is not valid, or it has been revoked.")

    await sign_in(page, await make_token(served))
    assert page.url.endswith("/console/bots")  # back where the reader was going
    await page.goto("/console/")
    assert await page.get_by_role("heading", name="Overview").is_visible()
    assert DOMAIN in await page.content()
    await shoot(page, shots, "overview")

    await page.goto("/console/bots")
    await page.get_by_label("Portal (domain)").fill(DOMAIN)
    await page.get_by_label("Status").select_option("deleted")
    await page.get_by_role("button", name="Show").click()
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=BOT_567))
    text = await row.inner_text()
    assert "deleted" in text
    assert "user 27 — Svetlana Ivanova" in text
    assert DELETED_AT in text  # Bitrix24's time of the deletion
    await shoot(page, shots, "registry")

    await page.get_by_role("link", name=BOT_567).click()
    assert await page.get_by_role("heading", name=re.compile(f"^Bot 567.* on {DOMAIN}$")
                                  ).is_visible()
    positions = [int(p.removeprefix("#")) for p in
                 await page.locator("tbody th[scope=row] a").all_inner_texts()]
    assert len(positions) == 3  # two messages and the deletion, newest first
    assert positions == sorted(positions, reverse=True)
    await page.locator("summary").first.click()
    assert "[secret removed; fingerprint" in await page.content()
    await shoot(page, shots, "bot")

    await page.goto(f"/console/bots?portal={DOMAIN}")
    await page.get_by_label("Position, received time or Bitrix24 time").fill(str(positions[0] - 1))
    await page.get_by_role("button", name="Show").click()
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=BOT_567))
    assert "active" in await row.inner_text()
    assert f"As of position {positions[0] - 1}" in await page.locator("p.scope").inner_text()
    await shoot(page, shots, "registry-as-of")

    await page.goto("/console/deletions")
    assert "Svetlana Ivanova" in await page.content()
    await shoot(page, shots, "deletions")
    await page.get_by_label("Portal (domain)").fill(DOMAIN)
    await page.get_by_role("button", name="Show").click()
    async with page.expect_download() as info:
        await page.get_by_role("link", name="CSV", exact=True).click()
    download = await info.value
    saved = tmp_path / download.suggested_filename
    await download.save_as(str(saved))
    assert saved.name.startswith("deletions-asof-")
    assert saved.suffix == ".csv"
    header, first = saved.read_text().splitlines()[:2]
    assert header.startswith("bot_id,bot_code,portal_domain,deleted_at")
    assert first.startswith(f"567,BOT,{DOMAIN},{DELETED_AT}")

    await page.goto(f"/console/events?portal={MEMBER_ID}&limit=25")
    await shoot(page, shots, "events")
    await page.get_by_role("link", name=f"#{positions[-1]}").first.click()
    assert await page.get_by_role("heading", name=f"Event #{positions[-1]}").is_visible()
    await shoot(page, shots, "event")
    await page.goto("/console/rejections")
    assert "Rejected deliveries" in await page.title()
    await shoot(page, shots, "rejections")

    await page.get_by_role("button", name="Sign out").click()
    assert "/console/sign-in" in page.url
    for path in ["/console/", "/console/deletions", f"/console/portals/{MEMBER_ID}/bots/567"]:
        await page.goto(path)
        assert "/console/sign-in" in page.url, path


async def test_a_revoked_token_is_signed_out_in_the_browser(
    served: Client, browser_page: Any
) -> None:
    page = browser_page
    await page.goto("/console/")
    await sign_in(page, await make_token(served, "leaving"))
    assert await page.get_by_role("heading", name="Overview").is_visible()
    assert served.app is not None
    await AuditStore(served.app[STORE].pool).revoke_token("leaving", "test")
    sessions = next(a for a in served.app._subapps if SESSIONS in a)[SESSIONS]
    for digest in sessions:  # the cache window (the API's TOKEN_CACHE_SECONDS) has passed
        sessions[digest] = 0.0
    await page.goto("/console/deletions")
    assert "/console/sign-in" in page.url
    assert "session ended" in await page.get_by_role("alert").inner_text()


RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: what follows it, to the end of the paragraph, reversed


@pytest.fixture
async def overridden(client: Client) -> Client:
    """User 27 deletes bot 567; the portal's last message before it named the user
    `RLO + Svetlana Ivanova` (a sender sets the names the console shows)."""
    await install_sample_portal(client)
    named = sample("onimbotmessageadd-1").replace(
        b"USER%5D%5BNAME%5D=Svetlana", b"USER%5D%5BNAME%5D=%E2%80%AESvetlana", 1)
    assert named != sample("onimbotmessageadd-1")
    for body in [sample("onimbotjoinchat-1"), named, sample("onimbotdelete-1")]:
        assert (await post(client, body))[0] == 200
    assert client.app is not None
    await client.app[PROJECTOR].catch_up()
    return client


async def test_a_right_to_left_override_in_a_name_stays_inside_its_cell_text(
    overridden: Client, shots: Path
) -> None:
    """Without bidi isolation the override ran to the end of the cell: "(named in #N)" after
    the name was drawn reversed, to the left of it. In its `<bdi>`, the name alone is."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = await browser.new_context(
            base_url=str(overridden.make_url("")).rstrip("/"),
            viewport={"width": 2400, "height": 800})  # the cell on one line
        page = await context.new_page()
        page.set_default_timeout(15_000)
        await page.goto("/console/deletions")
        await sign_in(page, await make_token(overridden))
        await page.goto("/console/deletions")
        cell = page.locator("td").filter(has=page.locator("strong", has_text="Svetlana"))
        name = await cell.locator("strong").bounding_box()
        note = await cell.locator("small").bounding_box()
        await shoot(page, shots, "deletions-rlo")
        await context.close()
        await browser.close()
    assert RLO in await cell_text(overridden)
    assert name is not None
    assert note is not None
    assert note["x"] >= name["x"] + name["width"] - 1, (name, note)


async def cell_text(client: Client) -> str:
    """The deletion page's HTML as the server sent it (the override is kept, isolated)."""
    from tests.test_console import page as get_page
    from tests.test_console import sign_in as http_sign_in

    await http_sign_in(client, await make_token(client, "html"))
    return await get_page(client, "/console/deletions")
