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
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from kumazone.core.storage import Store, StoreError
from kumazone.metrics import Metrics
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


class _QuietSite(Site):
    """A site that writes no access log (probes and scrapes come every few seconds)."""

    noisy = False

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

    def privilegedStartService(self) -> None:
        # Everything that can fail at start-up happens here, before the reactor
        # runs, so that a failure is one line and a non-zero exit.
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            self._start()
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
        diagnostics = _QuietSite(diagnostics_root(self.metrics, self._readiness))
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

    def stopService(self) -> Any:
        self._ready = False
        result = super().stopService()
        self._stop_listening()
        if self._store is not None:
            self._store.close()
        return result

    def _stop_listening(self) -> None:
        for listening in self._listening:
            listening.stopListening()
        self._listening = []
