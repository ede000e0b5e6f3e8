"""Bounded caches for what the intake works out per distinct key (form key plans, key facts).

Pure code. The caches live as long as the process and are fed by senders, so each is bounded in
entries, and callers admit only short keys (so in bytes too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class KeyCache:
    """A bounded map in two generations: hits in the old one move to the young one, and when
    the young one is full it becomes the old one (the old one is dropped). Keys that recur
    (Bitrix24's few hundred) stay; a sender's invented keys age out; memory never grows past
    two generations. Safe to share between the loop and the decoding thread (dict operations
    are atomic; a lost update only costs a miss)."""

    def __init__(self, generation: int, weigh: Callable[[Any], int] | None = None) -> None:
        """`generation`: entries per generation — or, with `weigh`, the sum of the entries'
        weights (a cache of values that differ much in size is then bounded in size)."""
        self.generation = generation
        self.weigh = weigh
        self.weight = 0  # of the young generation
        self.young: dict[Any, Any] = {}
        self.old: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        value = self.young.get(key)
        if value is None:
            value = self.old.get(key)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key: Any, value: Any) -> None:
        weight = 1 if self.weigh is None else self.weigh(value)
        if self.weight + weight > self.generation and self.young:
            self.old = self.young
            self.young = {}
            self.weight = 0
        self.young[key] = value
        self.weight += weight

    def __len__(self) -> int:
        return len(self.young) + len(self.old)
