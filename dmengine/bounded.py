"""A mapping that keeps at most ``size`` entries, dropping the oldest (L0).

Why not a plain dict and ``del d[next(iter(d))]``: a dict that has its oldest keys deleted
keeps their slots as dummies at the front of its entry table until it next resizes, and
``next(iter(d))`` walks past every one of them.  With 100,000 entries that walk cost
~100 µs per eviction, so once a cache was full every miss paid it: it was a third of the
server's CPU per device in the 1M-device campaign (issue 16), and a crowd of failing
addresses could drive the auth guard's table into it.  ``OrderedDict`` keeps its order in a
linked list: dropping the oldest is O(1) whatever came and went before.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(OrderedDict[K, V]):
    """Insertion-ordered; setting a new key when ``size`` are held drops the oldest first.
    Setting a key that is held refreshes it (it becomes the newest) when ``refresh`` is set,
    else it keeps its place (first in, first out)."""

    __slots__ = ("size", "refresh")

    def __init__(self, size: int, *, refresh: bool = False) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        super().__init__()
        self.size = size
        self.refresh = refresh

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            if self.refresh:
                self.move_to_end(key)
        elif len(self) >= self.size:
            self.popitem(last=False)
        super().__setitem__(key, value)
