"""What the zone and the global control planes share: start-up, listening ports, readiness.

Everything that can fail at start-up (the store, the resources directory, the
listening ports) happens in L{ControlPlane.privilegedStartService}, before the
reactor runs, and stops the process with one line rather than a traceback.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.server import Request, Site

from kumazone.core.bulk import (
    bulk_load,
    release_free_memory,
    take_release,
    when_release_wanted,
)
from kumazone.core.storage import Store, StoreError
from kumazone.metrics import Metrics
from kumazone.web.api import MAX_BODY_OCTETS
from kumazone.web.diagnostics import diagnostics_root

__all__ = ["TICK_INTERVAL", "ControlPlane", "StartupError"]

#: How often hold-downs are expired and a full range retried.
TICK_INTERVAL = 30.0


class StartupError(SystemExit, Exception):
    """Start-up failed; the text is the one line to show.

    A SystemExit, so that `twistd -n` exits with that line and no traceback; an
    Exception too, so that a daemonizing twistd reports it to the waiting parent
    (which prints it and exits 1) instead of leaving it waiting.
    """


class _LimitedRequest(Request):
    """A request whose body is held in memory, and refused once over the site's limit.

    twisted.web spools a body of 100,000 octets or more to a temporary file as it
    arrives, whatever its size; here a body is refused with 413 from its
    Content-Length, or as soon as its chunks pass the limit, and the connection
    closes: nothing is written to disk, and at most the limit is held.
    """

    _received = 0
    _refused = False

    def _limit(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body", MAX_BODY_OCTETS))

    def gotLength(self, length: int | None) -> None:
        """Hold the body in memory; refuse it at once if its length is over the limit."""
        self.content = BytesIO()
        if length is not None and length > self._limit():
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        """Keep a chunk of the body, or refuse the body once it is over the limit."""
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        cast(BytesIO, self.content).write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Handle the request, unless its body was refused."""
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        """Answer 413 and close the connection; what else arrives is not read."""
        self._refused = True
        self.content = BytesIO()
        # No "100 Continue" after the refusal (twisted.web sends it after gotLength).
        self.requestHeaders.removeHeader(b"expect")
        limit = self._limit()
        body = json.dumps(
            {
                "title": "Request too large",
                "details": f"bodies are limited to {limit} octets",
                "causes": [],
            }
        ).encode()
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        transport.loseConnection()


class _QuietSite(Site):
    """A site that writes no access log, and limits request bodies (L{_LimitedRequest}).

    Probes and scrapes come every few seconds: an access log would be mostly them.
    """

    noisy = False
    requestFactory = _LimitedRequest

    def __init__(self, resource: Any, max_body: int = MAX_BODY_OCTETS) -> None:
        super().__init__(resource)
        self.max_body = max_body

    def log(self, request: Any) -> None:
        pass


class ControlPlane(MultiService):
    """What the zone and the global share: start-up, listening ports, readiness."""

    log = Logger()

    def __init__(self, data_dir: str, reactor: Any, metrics: Metrics) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.reactor = reactor
        self.metrics = metrics
        self.ports: dict[str, int] = {}
        self._listening: list[IListeningPort] = []
        self._ready = False
        self._store: Store | None = None
        self._releasing = False

    def _release_memory(self) -> None:
        """After a bulk block (start-up, a table or inventory followed in slices):
        the free memory its temporary objects left, back to the system, on a thread."""
        if self._releasing or not self.running or not take_release():
            return  # (one at a time; none once stopping: the thread pool stops)
        self._releasing = True
        done = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), release_free_memory)
        done.addErrback(lambda failure: self.log.failure("releasing free memory failed", failure))
        done.addBoth(self._released)

    def _released(self, _: object) -> None:
        """A release done: another, if a bulk block finished meanwhile."""
        self._releasing = False
        self._release_memory()

    def privilegedStartService(self) -> None:
        # Everything that can fail at start-up happens here, before the reactor
        # runs, so that a failure is one line and a non-zero exit.
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            # The collector paused for the whole start-up (the table, entries, DNS
            # maps: millions of objects in no cycle); collected and frozen below.
            with bulk_load():
                self._start()
            # Each bulk block done (a table or an inventory followed in slices) asks
            # for its leftover memory to be given back: on the next reactor turn.
            when_release_wanted(lambda: self.reactor.callLater(0, self._release_memory))
            self.reactor.callLater(0, self._release_memory)  # (the start-up's block)
            self._write_ports()
        except (StoreError, OSError, CannotListenError, ValueError) as e:
            self._stop_listening()
            raise StartupError(f"kumazone: cannot start: {e}") from None
        self._ready = True
        # The table loaded at start-up lives as long as the process: keep the
        # cyclic garbage collector from walking it again and again.
        gc.collect()
        gc.freeze()
        super().privilegedStartService()

    def _start(self) -> None:
        raise NotImplementedError

    def _guarded(self, work: Callable[[], object]) -> None:
        """Periodic work logs its own errors and keeps its timer running."""
        try:
            work()
        except Exception:
            self.log.failure("periodic work failed")

    def _listen_tcp(self, port: int, factory: Any, interface: str) -> int:
        listening = self.reactor.listenTCP(port, factory, interface=interface)
        self._listening.append(listening)
        return int(listening.getHost().port)

    def _listen_web(
        self,
        api: Any,
        api_port: int,
        api_interface: str,
        diagnostics_port: int,
        diagnostics_interface: str,
    ) -> None:
        # Writes are logged by the API itself; polling GETs would flood the log.
        site = _QuietSite(api)
        self.ports["api"] = self._listen_tcp(api_port, site, api_interface)
        # The diagnostics take no bodies: GETs only.
        diagnostics = _QuietSite(diagnostics_root(self.metrics, self._readiness, self._role), 4096)
        self.ports["diagnostics"] = self._listen_tcp(
            diagnostics_port, diagnostics, diagnostics_interface
        )

    def _write_ports(self) -> None:
        path = os.path.join(self.data_dir, "ports.json")
        temporary = path + ".tmp"
        with open(temporary, "w") as f:
            json.dump(self.ports, f)
            f.write("\n")
        os.replace(temporary, path)

    def _readiness(self) -> str | None:
        return None if self._ready else "starting"

    def _role(self) -> str | None:
        """A replica's part (C{leader}, C{follower}) for /ready; None for one process."""
        return None

    def stopService(self) -> Any:
        self._ready = False
        when_release_wanted(None)
        result = super().stopService()
        self._stop_listening()
        if self._store is not None:
            self._store.close()
        return result

    def _stop_listening(self) -> None:
        for listening in self._listening:
            listening.stopListening()
        self._listening = []
