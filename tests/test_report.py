"""`ledger report`: one self-contained HTML file naming the verified head, the deletions, and a
SHA-256 manifest that recomputes (and stops recomputing when the file is touched)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DOMAIN, Database
from tests.test_cli import _deliver_samples, run


def test_the_report_names_the_verified_head_the_deletions_and_recomputes(
    database: Database, tmp_path: Path
) -> None:
    asyncio.run(_deliver_samples(database))
    output = tmp_path / "r.html"
    made = run(database, "report", "--portal", DOMAIN, "--output", str(output))
    assert made.exit_code == 0, made.output
    verify = run(database, "verify", "--quiet").output
    head = re.search(r"events: \d+ rows verified, head (\d+) ([0-9a-f]{64})", verify)
    assert head
    text = output.read_text(encoding="utf-8")
    assert f'<td id="head-position-events">{head.group(1)}</td>' in text
    assert f'id="head-hash-events">{head.group(2)}</code>' in text
    deletions = text.split('id="deletions-h"')[1].split("</section>")[0]
    assert "567 (BOT)" in deletions
    assert "user 27 — Svetlana Ivanova (named at #" in deletions  # from the message it sent
    assert "2026-02-26T07:19:23Z" in deletions
    assert "bot deleted" in deletions
    assert "http://" not in text.split("<main")[0]
    assert "<script" not in text
    assert "<link" not in text

    checked = run(database, "report", "--check", str(output))
    assert checked.exit_code == 0, checked.output
    stated = re.search(r'<code id="document-sha256">([0-9a-f]{64})</code>', text)
    assert stated
    zeroed = text.replace(stated.group(1), "0" * 64, 1).encode()
    assert hashlib.sha256(zeroed).hexdigest() == stated.group(1)
    registry = re.search(r'<pre class="export" id="export-registry">(.*?)</pre>', text, re.S)
    assert registry
    recheck = re.search(r"<code>(python3 -c .*?report\.html)</code>", text)
    assert recheck  # the printed one-liner, run as a reviewer would
    import html

    command = html.unescape(recheck.group(1)).replace("report.html", str(output))
    printed = subprocess.run(["bash", "-c", command.replace("python3", sys.executable, 1)],
                             capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "True"

    output.write_text(text.replace("bot deleted", "bot removed", 1), encoding="utf-8")
    tampered = run(database, "report", "--check", str(output))
    assert tampered.exit_code == 1
    assert "does not match" in tampered.output


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary on PATH")
def test_the_report_prints_to_pdf_with_headless_chromium(
    database: Database, tmp_path: Path
) -> None:
    asyncio.run(_deliver_samples(database))
    pdf = tmp_path / "r.pdf"
    made = run(database, "report", "--output", str(tmp_path / "r.html"), "--pdf", str(pdf))
    assert made.exit_code == 0, made.output
    assert pdf.read_bytes().startswith(b"%PDF-")
