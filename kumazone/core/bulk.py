"""Making a great many long-lived objects at once (a zone's start-up). Pure.

A first load makes millions of objects (resources, keys, rows, entries) that
live as long as the zone.  Python's cyclic collector, left on, walks all of
them again and again while they are made (a third of a 100,000-service load)
and, once they are made, in a full collection on the reactor later.  None of
them is part of a cycle: they go when they are dropped, by reference counting.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["FREEZE_AT", "bulk_load"]

#: Objects made by a load past which they are moved out of the collector's sight.
FREEZE_AT = 100_000


@contextmanager
def bulk_load() -> Iterator[None]:
    """The cyclic collector paused for the block; what a big block made, frozen after.

    Frozen (C{gc.freeze}): never walked by a collection again, still freed as
    usual when dropped.  Nested blocks, and a collector already off, leave the
    collector as they found it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if gc.get_count()[0] >= FREEZE_AT:
            gc.freeze()
        gc.enable()
