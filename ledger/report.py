"""`ledger report`: one self-contained HTML evidence pack a reviewer can open offline and print.

What it holds: the scope and time of the report; the bot registry and the deletion timeline as
of one pinned position; a summary of rejected deliveries; integrity — a `ledger verify` of both
chains run while generating it, the latest signed checkpoint and its public key's fingerprint;
and a manifest of SHA-256 hashes:

- each embedded export (CSV, in a `<pre id="export-NAME">`) is hashed as the UTF-8 bytes of its
  exact text (the element's content after HTML unescaping);
- the document is hashed as the UTF-8 bytes of the whole file in which the 64 hex digits inside
  its first `<code id="document-sha256">…</code>` are replaced by 64 zeros (`0`). The value
  written there is that hash, so anyone can recompute it (`ledger report --check FILE`, or the
  one-line Python command the report prints).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from ledger import __version__, asof, integrity
from ledger.console import params, present, tables
from ledger.console.app import templates
from ledger.console.reader import Reader
from ledger.display import spreadsheet_cell
from ledger.errors import ConfigurationError
from ledger.storage.audit_store import AuditStore
from ledger.storage.store import EventStore

PLACEHOLDER = "0" * 64
_DOCUMENT_HASH = re.compile(r'<code id="document-sha256">([0-9a-f]{64})</code>')
_EXPORT = re.compile(r'<pre class="export" id="export-([a-z-]+)">(.*?)</pre>', re.S)
_EXPORT_HASH = re.compile(r'<code id="sha256-([a-z-]+)">([0-9a-f]{64})</code>')
RECHECK = (
    "python3 -c 'import hashlib,re,sys; b=open(sys.argv[1],\"rb\").read(); "
    "m=re.search(rb\"<code id=.document-sha256.>([0-9a-f]{64})<\",b); "
    "z=b[:m.start(1)]+b\"0\"*64+b[m.end(1):]; "
    "print(hashlib.sha256(z).hexdigest()==m.group(1).decode())' report.html"
)


@dataclass(frozen=True)
class Scope:
    portal: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None
    as_of: asof.AsOf | None = None


def _csv(rows: list[Any]) -> str:
    """CSV with "\n" line ends: HTML turns "\r\n" into "\n", so a copy from a browser
    would otherwise never match its hash. Cells as the exports write them: no formulas."""
    out = io.StringIO(newline="")
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(type(rows[0]).model_fields),
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else spreadsheet_cell(v)
                             for k, v in row.model_dump(mode="json").items()})
    return out.getvalue()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def build(reader: Reader, events: EventStore, scope: Scope) -> str:
    """The report's HTML (its document hash filled in)."""
    generated = datetime.now(UTC)
    store = events
    verifications = []
    audit = AuditStore(store.pool)
    for stream in integrity.STREAMS:
        report = await integrity.verify_stream(store, stream)
        await audit.record_verification(
            stream=report.stream, verified_rows=report.verified,
            head_position=report.head_position, head_hash=report.head_hash,
            checkpoint_position=None, problem=str(report.problem) if report.problem else None,
        )
        verifications.append(report)
    events_report = verifications[0]
    await reader.audit.portals()  # the CLI's service folds pending events first: portals known
    members = await reader.resolve_portal(scope.portal)
    pinned = scope.as_of or asof.Position(events_report.head_position)
    bots = await reader.all_bots(members=members, status=None, as_of=pinned)
    deletions = await reader.all_deletions(
        members=members, as_of=pinned, occurred_from=scope.received_from,
        occurred_to=scope.received_to,
    )
    rejections = await reader.store.rejection_summary(
        scope.received_from, scope.received_to, members
    )
    bot_rows = [tables.bot_row(b) for b in bots]
    deletion_rows = [tables.deletion_row(d) for d in deletions]
    embedded = {"registry": _csv(bot_rows), "deletions": _csv(deletion_rows)}
    checkpoint = await reader.latest_checkpoint()
    env = templates()
    page = env.get_template("report.html").render(
        version=__version__, generated=generated, scope=scope,
        pinned=params.as_of_words(pinned),
        members=members, verifications=verifications, bots=bots, deletions=deletions,
        rejections=rejections, checkpoint=checkpoint, embedded=embedded,
        hashes={name: _sha(text) for name, text in embedded.items()},
        placeholder=PLACEHOLDER, recheck=RECHECK, iso=present.iso,
        stylesheet=resources.files("ledger.console").joinpath("static/console.css")
        .read_text(),
        export_rows={"registry": len(bot_rows), "deletions": len(deletion_rows)},
    )
    return _seal(page)


def _zeroed(text: str) -> tuple[str, str | None]:
    """The text with its document hash replaced by zeros, and the hash that was there."""
    found = _DOCUMENT_HASH.search(text)
    if found is None:
        return text, None
    return text[:found.start(1)] + PLACEHOLDER + text[found.end(1):], found.group(1)


def _seal(page: str) -> str:
    zeroed, stated = _zeroed(page)
    if stated != PLACEHOLDER:
        raise ConfigurationError("the report template has no document hash placeholder")
    found = _DOCUMENT_HASH.search(zeroed)
    assert found is not None
    return zeroed[:found.start(1)] + _sha(zeroed) + zeroed[found.end(1):]


def check(text: str) -> list[str]:
    """Problems found re-checking a report's manifest (empty: every hash recomputes)."""
    problems = []
    zeroed, stated = _zeroed(text)
    if stated is None:
        return ["no document hash in the file"]
    if _sha(zeroed) != stated:
        problems.append("the document hash does not match the file's content")
    export_hashes = dict(_EXPORT_HASH.findall(text))
    bodies = dict(_EXPORT.findall(text))
    for name, digest in export_hashes.items():
        if name not in bodies or digest != _sha(html.unescape(bodies[name])):
            problems.append(f"embedded export {name!r} does not match its hash")
    if not export_hashes:
        problems.append("no embedded export hashes in the file")
    return problems


def to_pdf(source: Path, target: Path) -> None:
    """Print the report to PDF with headless Chromium (the Debian package `chromium`)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise ConfigurationError("--pdf needs Chromium: apt-get install chromium")
    try:
        subprocess.run(  # noqa: S603 - a fixed program and our own file paths
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
             f"--print-to-pdf={target}", source.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigurationError(f"Chromium could not print {source} to PDF: {exc}") from exc
