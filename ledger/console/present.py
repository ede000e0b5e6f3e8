"""How the console and the report say things to people: one time format, words for flags,
names for user ids, payloads with their secrets shown as fingerprints. Pure code."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

ANOMALY_WORDS = {
    "never_seen": "the ledger had never seen this bot before it was deleted",
    "repeated": "this bot had already been deleted before (a repeated deletion)",
    "activity_after_deletion": "the bot was active again after this deletion",
    "unexpected_payload": "the deleting event's payload held what the registry could not use",
}


def iso(moment: datetime | str | None) -> str:
    """ISO 8601 in UTC with a `Z`, to the second: the one time format people read here."""
    if moment is None:
        return ""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(span: timedelta) -> str:
    """A span in the largest two units a person would use ("3 d 4 h", "12 min")."""
    seconds = max(0, int(span.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{seconds} s"


def anomaly_words(row: dict[str, Any]) -> list[str]:
    words = []
    if row.get("never_seen"):
        words.append(ANOMALY_WORDS["never_seen"])
    if row.get("repeated"):
        words.append(ANOMALY_WORDS["repeated"])
    if row.get("activity_after_deletion"):
        after = row.get("activity_after_position")
        words.append(ANOMALY_WORDS["activity_after_deletion"]
                     + (f" (event at position {after})" if after else ""))
    if row.get("payload_anomalies"):  # the API's `unexpected_payload`, with its notes
        words.append(ANOMALY_WORDS["unexpected_payload"] + ": "
                     + "; ".join(row["payload_anomalies"]))
    return words


def person_name(v1: Any, v2: Any) -> str | None:
    """The name a payload gives a user: v1 `data.USER` {NAME, LAST_NAME, …} (NAME is sometimes
    the full name, sometimes the first name), v2 `data.user` {name, firstName, lastName}."""
    if isinstance(v1, dict):
        name = _text(v1.get("NAME")) or _text(v1.get("FIRST_NAME"))
        last = _text(v1.get("LAST_NAME"))
        if name and last and last not in name:
            return f"{name} {last}"
        return name or last
    if isinstance(v2, dict):
        name = _text(v2.get("name"))
        if name:
            return name
        parts = [p for p in (_text(v2.get("firstName")), _text(v2.get("lastName"))) if p]
        return " ".join(parts) or None
    return None


def _text(value: Any) -> str | None:
    return value.strip()[:200] or None if isinstance(value, str) else None


def with_fingerprints(payload: Any, metadata: Any) -> Any:
    """The stored payload with every removed secret put back as a marker naming its fingerprint
    (the stored payload has secrets removed; `metadata.redactions` says where they were)."""
    shown = copy.deepcopy(payload)
    redactions = metadata.get("redactions") if isinstance(metadata, dict) else None
    for item in redactions if isinstance(redactions, list) else []:
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(path, list) or not path or path[0] == "query":
            continue
        node = shown
        for key in path[:-1]:
            if isinstance(node, list) and str(key).isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[path[-1]] = f"[secret removed; fingerprint {item.get('fingerprint')}]"
    return shown
