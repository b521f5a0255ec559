"""Making a great many long-lived objects at once (a zone's start-up). Pure, but for
L{release_free_memory} (a call into the C library).

A first load makes millions of objects (resources, keys, rows, entries) that
live as long as the zone.  Python's cyclic collector, left on, walks all of
them again and again while they are made (a third of a 100,000-service load)
and, once they are made, in a full collection on the reactor later.  None of
them is part of a cycle: they go when they are dropped, by reference counting.

A load also makes and drops many temporary objects (decoded files and
messages, maps outgrown and copied): their memory goes back to the C heap,
where glibc keeps it (a zone at a million services held a tenth of its RSS
so).  A block that made many objects marks the memory for release
(L{take_release}, L{when_release_wanted}); the service then gives it back with
L{release_free_memory}, off the reactor.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "FREEZE_AT",
    "CollectorPause",
    "bulk_load",
    "release_free_memory",
    "take_release",
    "when_release_wanted",
]

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
            if freeze:
                _want_release()


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


#: Whether a bulk block finished since L{take_release} last said so.
_release_wanted = False
#: Called when a bulk block finishes (L{when_release_wanted}).
_release_hook: Callable[[], object] | None = None


def when_release_wanted(hook: Callable[[], object] | None) -> None:
    """Call C{hook} (on the thread of the block: the reactor's) each time a bulk
    block finishes; None for no call.  One hook: the process's service."""
    global _release_hook
    _release_hook = hook


def _want_release() -> None:
    global _release_wanted
    _release_wanted = True
    if _release_hook is not None:
        _release_hook()


def take_release() -> bool:
    """Whether a bulk block (or a L{CollectorPause} that froze) finished since the
    last call: the free memory it left is worth giving back."""
    global _release_wanted
    wanted, _release_wanted = _release_wanted, False
    return wanted


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's C{malloc_trim} among the process's own symbols, or None (another C
    library).  (C{dlopen(NULL)}: no search of the system's libraries.)"""
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
    return trim


#: Looked for on the first release (an import does no more than import).
_malloc_trim: Callable[[int], int] | None = None
_looked = False


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's C{malloc_trim(0)}),
    where the C library can; whether it could.

    A few milliseconds at a million services, the GIL released meanwhile (a
    ctypes call): run it on a thread, never on the reactor.  Other threads'
    C{malloc} of large blocks waits for it; Python's small objects do not.
    """
    global _malloc_trim, _looked
    if not _looked:
        _malloc_trim, _looked = _find_malloc_trim(), True
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
