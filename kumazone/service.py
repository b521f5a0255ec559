"""The zone control plane as a Twisted service: store, resources, DNS, API, diagnostics.

Everything that can fail at start-up (the store, the resources directory, the
listening ports) happens in L{ZoneService.privilegedStartService}, before the
reactor runs, and stops the process with one line rather than a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from kumazone.api import ApiResource
from kumazone.authority import ZoneAuthority
from kumazone.config import DnsServerConfig
from kumazone.diagnostics import diagnostics_root
from kumazone.dnsserver import KumaDNSDatagramProtocol, KumaDNSServerFactory
from kumazone.metrics import Metrics
from kumazone.store import SQLiteStore, StoreError
from kumazone.watcher import ResourceDirectory
from kumazone.zone import DEFAULT_MESH, Zone, ZoneSnapshot

__all__ = ["ZoneService", "ZoneSettings"]

#: How often the resources directory is looked at (a change is live within a second).
SCAN_INTERVAL = 0.5
#: How often hold-downs are expired and a full range retried.
TICK_INTERVAL = 30.0


@dataclass(frozen=True)
class ZoneSettings:
    """What a zone control plane needs to start, validated by the options."""

    zone: str
    dns: DnsServerConfig
    data_dir: str
    store_path: str
    resources_dir: str | None = None
    dns_interface: str = "0.0.0.0"
    api_port: int = 5681
    api_interface: str = "127.0.0.1"
    diagnostics_port: int = 5680
    diagnostics_interface: str = ""


class _QuietSite(Site):
    """A site that writes no access log (probes and scrapes come every few seconds)."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def mesh_lookup(get_snapshot: Callable[[], ZoneSnapshot]) -> Callable[[str], str]:
    """A function from a client address to its mesh (``default`` if unknown)."""

    def mesh_of(host: str) -> str:
        if host.startswith("::ffff:"):
            host = host[7:]
        return get_snapshot().mesh_of_address.get(host, DEFAULT_MESH)

    return mesh_of


class ZoneService(MultiService):
    """A standalone zone control plane."""

    log = Logger()

    def __init__(self, settings: ZoneSettings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.metrics = Metrics(settings.zone)
        self.zone: Zone | None = None
        self.ports: dict[str, int] = {}
        self._listening: list[IListeningPort] = []
        self._ready = False

    # -- start-up ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        try:
            self._start()
        except (StoreError, OSError, CannotListenError) as e:
            self._stop_listening()
            raise SystemExit(f"kumazone: cannot start: {e}") from None
        super().privilegedStartService()

    def _start(self) -> None:
        settings = self.settings
        os.makedirs(settings.data_dir, exist_ok=True)
        store = SQLiteStore(settings.store_path)
        zone = Zone(settings.zone, settings.dns, store, warn=lambda m: self.log.warn(m))
        self.zone = zone
        zone.listeners.append(self._update_gauges)
        now = self.reactor.seconds
        if settings.resources_dir is not None:
            directory = ResourceDirectory(settings.resources_dir, zone, self.metrics, now)
            directory.scan()
            self.addService(TimerService(SCAN_INTERVAL, self._guarded, directory.scan))
        zone.update(now())
        self.addService(
            TimerService(
                TICK_INTERVAL, self._guarded, lambda: zone.update(now(), inventory_changed=False)
            )
        )

        nameservers = (
            [] if settings.dns_interface in ("", "0.0.0.0", "::") else [settings.dns_interface]
        )
        authority = ZoneAuthority(settings.dns, nameservers)
        authority.update(zone.snapshot)
        zone.listeners.append(authority.update)
        factory = KumaDNSServerFactory(
            authority, mesh_lookup(lambda: zone.snapshot), self.metrics, self.reactor.seconds
        )
        self.ports["dns"] = self._listen_dns(factory)

        api = Site(ApiResource(zone, self.metrics, now))
        api.noisy = False
        self.ports["api"] = self._listen_tcp(settings.api_port, api, settings.api_interface)
        diagnostics = _QuietSite(diagnostics_root(self.metrics, self._readiness))
        self.ports["diagnostics"] = self._listen_tcp(
            settings.diagnostics_port, diagnostics, settings.diagnostics_interface
        )
        self._write_ports()
        self._ready = True
        snapshot = zone.snapshot
        self.log.info(
            "zone {zone} serving {count} service(s), table version {version}; "
            "DNS on {dns}/udp+tcp, API on {api}, diagnostics on {diagnostics}",
            zone=settings.zone,
            count=len(snapshot.entries),
            version=snapshot.version,
            **self.ports,
        )

    def _guarded(self, work: Callable[[], object]) -> None:
        """Periodic work logs its own errors and keeps its timer running."""
        try:
            work()
        except Exception:
            self.log.failure("periodic work failed")

    def _listen_dns(self, factory: KumaDNSServerFactory) -> int:
        """UDP and TCP on one port; with port 0, a port free for both."""
        wanted = self.settings.dns.port
        interface = self.settings.dns_interface
        for _attempt in range(50):
            udp = self.reactor.listenUDP(
                wanted, KumaDNSDatagramProtocol(factory), interface=interface
            )
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, factory, interface=interface)
            except CannotListenError:
                udp.stopListening()
                if wanted != 0:
                    raise
                continue
            self._listening += [udp, tcp]
            return int(port)
        raise CannotListenError(interface, wanted, "no port free for both UDP and TCP")

    def _listen_tcp(self, port: int, site: Site, interface: str) -> int:
        listening = self.reactor.listenTCP(port, site, interface=interface)
        self._listening.append(listening)
        return int(listening.getHost().port)

    def _write_ports(self) -> None:
        path = os.path.join(self.settings.data_dir, "ports.json")
        temporary = path + ".tmp"
        with open(temporary, "w") as f:
            json.dump(self.ports, f)
            f.write("\n")
        os.replace(temporary, path)

    # -- running ----------------------------------------------------------------

    def _readiness(self) -> str | None:
        return None if self._ready else "starting"

    def _update_gauges(self, snapshot: ZoneSnapshot) -> None:
        self.metrics.vips_allocated.set(len(snapshot.entries))
        self.metrics.vip_range_size.set(snapshot.range_size)
        self.metrics.vip_range_used.set(
            snapshot.range_used / snapshot.range_size if snapshot.range_size else 0.0
        )
        self.metrics.vips_exhausted.set(len(snapshot.exhausted))
        self.metrics.table_version.set(snapshot.version)

    def stopService(self) -> Any:
        self._ready = False
        result = super().stopService()
        self._stop_listening()
        if self.zone is not None:
            self.zone.store.close()
        return result

    def _stop_listening(self) -> None:
        for listening in self._listening:
            listening.stopListening()
        self._listening = []
