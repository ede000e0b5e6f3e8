"""Stored text made safe for where people read it: a terminal, a log, a spreadsheet.

What a portal sends (bot codes, user names and ids) and what anyone claims in a refused
delivery (its portal) is stored exactly as sent. Shown raw, it could drive the reader's tools:
an escape sequence rewrites an investigator's terminal (or its title, or the clipboard), a line
break forges a log line, a right-to-left override reorders what is shown, and a cell that
begins with `=` is run as a formula by the spreadsheet a compliance officer opens an export in.
These functions change only how such text is written out; JSON and JSON Lines keep every value
exactly (with the dangerous characters as JSON escapes).
"""

from __future__ import annotations

import re
from typing import Any

# C0 and C1 controls, DEL, and the bidirectional overrides and isolates ("Trojan Source")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
FORMULA_LEAD = ("=", "+", "-", "@", "\t", "\r", "\n")


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal(text: str) -> str:
    """One line of text a terminal shows as written: every control character (line breaks,
    tabs and escape sequences included) and every bidirectional control as a visible
    `\\xNN`/`\\uNNNN` escape."""
    if text.isprintable():  # every character escaped here is unprintable: the usual case, fast
        return text
    return _CONTROL.sub(_escaped, text)


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_line(text: str) -> str:
    """JSON text (as orjson writes it) with the characters JSON leaves raw but a terminal acts
    on (DEL, C1 controls, bidirectional controls) written as `\\uNNNN`: the same JSON value."""
    if text.isascii() and "\x7f" not in text:  # orjson escapes C0; the rest is not ASCII
        return text
    return _CONTROL.sub(_json_escape, text)


def spreadsheet_cell(value: Any) -> Any:
    """A CSV cell no spreadsheet runs: text that begins with `=`, `+`, `-`, `@`, a tab or a
    line break gets a leading `'` (OWASP's advice; spreadsheets show it as text). Numbers and
    other text are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_LEAD):
        return "'" + value
    return value
