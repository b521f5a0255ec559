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

__all__ = ["FREEZE_AT", "CollectorPause", "bulk_load"]

#: Objects made by a load past which they are moved out of the collector's sight.
FREEZE_AT = 100_000


class CollectorPause:
    """The cyclic collector off while one side makes a great many long-lived objects
    over many reactor turns (a big table followed in slices, an inventory applied
    in slices), and what they made frozen once done.

    Left on, the collector's full collections walk every object made so far, on
    the reactor: at a million services one held a zone for 11 to 13 s, its
    heartbeats with it.  None of these objects is in a cycle: they go by
    reference counting.
    """

    def __init__(self) -> None:
        #: Whether this pause turned the collector off (one already off is left so).
        self.paused = False

    def pause(self) -> None:
        """Turn the collector off, unless it is off already."""
        if not self.paused and gc.isenabled():
            gc.disable()
            self.paused = True

    def resume(self, freeze: bool = True) -> None:
        """Freeze what was made meanwhile (unless told not) and turn the collector back
        on, if paused here."""
        if self.paused:
            self.paused = False
            if freeze:
                gc.freeze()
            gc.enable()


@contextmanager
def bulk_load() -> Iterator[None]:
    """The cyclic collector paused for the block; what a big block made, frozen after.

    Frozen (C{gc.freeze}): never walked by a collection again, still freed as
    usual when dropped.  Nested blocks, and a collector already off, leave the
    collector as they found it.
    """
    pause = CollectorPause()
    pause.pause()
    try:
        yield
    finally:
        pause.resume(freeze=gc.get_count()[0] >= FREEZE_AT)
