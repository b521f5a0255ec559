"""The epoll reactor's dispatch, without the legacy log context for the DNS ports.

Twisted's epoll reactor hands each ready descriptor to C{_doReadOrWrite}
through L{twisted.python.log.callWithLogger}: a C{logPrefix()} call, a copy of
the legacy log context and a push and pop of it, for every wakeup.  A DNS port
at 50,000 queries per second wakes some 8,000 times a second for a few
datagrams each: that wrapper alone was 5 % of the CPU per answer (1.17 against
1.23 times NSD's, in one run each way).

L{install} gives one reactor a C{doPoll} that is Twisted's but for that: the
selectables whose type is registered with L{direct} (the batched DNS ports)
go straight to C{_doReadOrWrite}, which still catches and logs what a
C{doRead} raises and disconnects the port then; every other selectable is
dispatched as before.  What those ports give up is only the legacy
C{system} prefix of old-style C{log.msg} calls made while they read: they
make none (they log through L{twisted.logger.Logger}, whose events carry their
namespace).

A reactor that is not an epoll reactor of the shape this knows (an attribute
missing: another Twisted) is left alone, and dispatches as Twisted does.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.python import log

__all__ = ["direct", "install", "installed"]

#: The selectable types dispatched without the legacy log context.
_DIRECT: set[type] = set()


def direct(kind: type) -> None:
    """Dispatch selectables of exactly C{kind} without the legacy log context,
    on the reactors L{install} was given."""
    _DIRECT.add(kind)


def installed(reactor: Any) -> bool:
    """Whether L{install} gave C{reactor} its dispatch."""
    return bool(getattr(reactor, "_kumazone_dispatch", False))


def install(reactor: Any) -> bool:
    """Give C{reactor} the dispatch above, once; whether it has it (False: an
    unknown reactor, left as it is)."""
    if installed(reactor):
        return True
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # (a platform without epoll)
        return False
    if not isinstance(reactor, EPollReactor) or not all(
        hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")
    ):
        return False

    def doPoll(timeout: float | None) -> None:
        # Twisted's EPollReactor.doPoll, but for the dispatch of _DIRECT types.
        if timeout is None:
            timeout = -1  # wait indefinitely
        selectables = reactor._selectables
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        dispatch = reactor._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if type(selectable) in _DIRECT:
                try:
                    dispatch(selectable, fd, event)
                except Exception:
                    # What callWithLogger did: a failure past _doReadOrWrite's own
                    # (in disconnecting the port) is logged, the other events served.
                    log.err()
            else:
                log.callWithLogger(selectable, dispatch, selectable, fd, event)

    # (The reactor's main loop calls doIteration, the class's alias of doPoll.)
    given: Any = reactor
    given.doPoll = given.doIteration = doPoll
    given._kumazone_dispatch = True
    return True
