"""The shape of a portal's identifiers, checked before an operator's word is recorded forever.

A `member_id` is what Bitrix24 sends in `auth.member_id`: an MD5-style 32-character hex string on
every portal we have seen (cloud and on-premise). A domain is the portal's host as Bitrix24 sends it
in `auth.domain`: any valid DNS name of two labels or more (cloud portals end in `bitrix24.<tld>`,
on-premise ones can have any name), normalised as trust compares domains (`trust.normalise_domain`:
lower case, no trailing dot, IDNA).
"""

from __future__ import annotations

import re

from ledger.errors import BadInput
from ledger.trust import normalise_domain

_MEMBER_ID = re.compile(r"[0-9a-f]{32}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def member_id(value: str) -> str:
    """The member_id, lower-cased; refused unless it is 32 hex characters."""
    candidate = value.strip().lower()
    if not _MEMBER_ID.fullmatch(candidate):
        raise BadInput(
            f"{value!r} is not a Bitrix24 member_id (32 hex characters, as in auth.member_id "
            "of any delivery from the portal)"
        )
    return candidate


def domain(value: str) -> str:
    """The portal host as trust compares it; refused unless it is a DNS name."""
    candidate = normalise_domain(value)
    labels = candidate.split(".") if candidate else []
    valid = (
        candidate is not None
        and len(candidate) <= 253
        and len(labels) >= 2
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )
    if not valid or candidate is None:
        raise BadInput(
            f"{value!r} is not a portal domain: give the host only, as Bitrix24 sends it in "
            "auth.domain, e.g. your-portal.bitrix24.com (no scheme, port, path or spaces)"
        )
    return candidate
