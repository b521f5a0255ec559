"""The zone control plane as a Twisted service: store, resources, DNS, API, diagnostics.

Everything that can fail at start-up (the store, the resources directory, the
listening ports) happens in L{ZoneService.privilegedStartService}, before the
reactor runs, and stops the process with one line rather than a traceback.
"""

from __future__ import annotations

import gc
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import ClientService, TimerService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.server import Site

from kumazone import udpbatch
from kumazone.api import ApiResource, GlobalApiResource
from kumazone.authority import ZoneAuthority
from kumazone.config import DnsServerConfig
from kumazone.diagnostics import diagnostics_root
from kumazone.dnsserver import KumaDNSDatagramProtocol, KumaDNSServerFactory
from kumazone.federation import GlobalTable
from kumazone.kds import GlobalHub, SyncFactory, ZoneSync
from kumazone.metrics import Metrics, SyncMetrics
from kumazone.store import SQLiteStore, StoreError
from kumazone.tls import TLSFiles, client_options, server_options
from kumazone.vips import TableDelta, VipRange
from kumazone.watcher import ResourceDirectory
from kumazone.zone import DEFAULT_MESH, Zone, ZoneSnapshot

__all__ = ["GlobalService", "GlobalSettings", "ZoneService", "ZoneSettings"]

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
    #: The global to sync with (host, port), or None for a standalone zone.
    global_address: tuple[str, int] | None = None
    tls: TLSFiles | None = None


@dataclass(frozen=True)
class GlobalSettings:
    """What the global control plane needs to start."""

    dns: DnsServerConfig
    data_dir: str
    store_path: str
    kds_port: int = 5685
    kds_interface: str = "0.0.0.0"
    api_port: int = 5681
    api_interface: str = "127.0.0.1"
    diagnostics_port: int = 5680
    diagnostics_interface: str = ""
    tls: TLSFiles | None = None


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


def mesh_lookup(get_snapshot: Callable[[], ZoneSnapshot]) -> Callable[[str], str]:
    """A function from a client address to its mesh (``default`` if unknown)."""

    def mesh_of(host: str) -> str:
        if host.startswith("::ffff:"):
            host = host[7:]
        return get_snapshot().mesh_of_address.get(host, DEFAULT_MESH)

    return mesh_of


class _ControlPlane(MultiService):
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
        self._store: SQLiteStore | None = None

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


class ZoneService(_ControlPlane):
    """A zone control plane: standalone, or synced with a global."""

    def __init__(self, settings: ZoneSettings, reactor: Any) -> None:
        super().__init__(settings.data_dir, reactor, Metrics(settings.zone))
        self.settings = settings
        self.zone: Zone | None = None
        self.sync: ZoneSync | None = None

    def _start(self) -> None:
        settings = self.settings
        store = self._store = SQLiteStore(settings.store_path)
        federated = settings.global_address is not None
        zone = Zone(
            settings.zone,
            settings.dns,
            store,
            warn=lambda m: self.log.warn(m),
            federated=federated,
        )
        self.zone = zone
        zone.listeners.append(self._update_gauges)
        now = self.reactor.seconds
        loaded = 0
        if settings.resources_dir is not None:
            directory = ResourceDirectory(settings.resources_dir, zone, self.metrics, now)
            loaded = directory.scan()
            self.addService(TimerService(SCAN_INTERVAL, self._guarded, directory.scan))
        if not loaded:
            zone.update(now())  # the scan reconciled already if it loaded anything
        self.addService(TimerService(TICK_INTERVAL, self._guarded, lambda: zone.tick(now())))
        if settings.global_address is not None:
            self._connect_global(zone, settings.global_address)

        nameservers = (
            [] if settings.dns_interface in ("", "0.0.0.0", "::") else [settings.dns_interface]
        )
        authority = ZoneAuthority(settings.dns, nameservers)
        authority.update(zone.snapshot)
        zone.listeners.append(authority.update)
        factory = KumaDNSServerFactory(
            authority, mesh_lookup(lambda: zone.snapshot), self.metrics, self.reactor.seconds
        )
        # After the authority has the new table, no old answer may be served.
        zone.listeners.append(lambda snapshot: factory.hot.clear())
        self.ports["dns"] = self._listen_dns(factory)
        self._listen_web(
            ApiResource(zone, self.metrics, now, self._sync_status),
            settings.api_port,
            settings.api_interface,
            settings.diagnostics_port,
            settings.diagnostics_interface,
        )
        snapshot = zone.snapshot
        self.log.info(
            "zone {zone} serving {count} service(s), table version {version}; "
            "DNS on {dns}/udp+tcp, API on {api}, diagnostics on {diagnostics}",
            zone=settings.zone,
            count=len(snapshot.entries),
            version=snapshot.version,
            **self.ports,
        )

    def _connect_global(self, zone: Zone, address: tuple[str, int]) -> None:
        host, port = address
        sync_metrics = SyncMetrics(self.metrics.registry)
        sync_metrics.connected.labels(zone.name).set(0)
        self.sync = ZoneSync(zone, self.reactor, sync_metrics)
        sync = self.sync
        factory = SyncFactory(lambda: sync, self.reactor, sync_metrics)
        endpoint: Any = HostnameEndpoint(self.reactor, host, port)
        if self.settings.tls is not None:
            endpoint = wrapClientTLS(client_options(self.settings.tls, host), endpoint)
        self.addService(ClientService(endpoint, factory, retryPolicy=backoffPolicy(0.5, 10.0)))
        self.log.info(
            "syncing with the global at {host}:{port} ({how})",
            host=host,
            port=port,
            how="TLS" if self.settings.tls else "insecure, no TLS",
        )

    def _sync_status(self) -> dict[str, Any] | None:
        if self.settings.global_address is None or self.sync is None:
            return None
        host, port = self.settings.global_address
        return {
            "global": f"{host}:{port}",
            "connected": self.sync.connected_since is not None,
            "connectedSince": self.sync.connected_since,
            "lastTable": self.sync.last_table_at,
        }

    def _listen_udp(self, port: int, protocol: KumaDNSDatagramProtocol, interface: str) -> Any:
        """Batched reads and writes where the system has them, else Twisted's own port."""
        if udpbatch.available:
            listening = udpbatch.BatchedDNSPort(port, protocol, interface, reactor=self.reactor)
            try:
                listening.startListening()
            except OSError as e:
                self.log.warn("DNS over UDP: one datagram per system call ({why})", why=e)
            else:
                return listening
            protocol = KumaDNSDatagramProtocol(protocol.controller)
        return self.reactor.listenUDP(port, protocol, interface=interface)

    def _listen_dns(self, factory: KumaDNSServerFactory) -> int:
        """UDP and TCP on one port; with port 0, a port free for both."""
        wanted = self.settings.dns.port
        interface = self.settings.dns_interface
        for _attempt in range(50):
            udp = self._listen_udp(wanted, KumaDNSDatagramProtocol(factory), interface)
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

    def _update_gauges(self, snapshot: ZoneSnapshot) -> None:
        self.metrics.vips_allocated.set(len(snapshot.entries))
        self.metrics.vip_range_size.set(snapshot.range_size)
        self.metrics.vip_range_used.set(
            snapshot.range_used / snapshot.range_size if snapshot.range_size else 0.0
        )
        self.metrics.vips_exhausted.set(len(snapshot.exhausted))
        self.metrics.table_version.set(snapshot.version)


class GlobalService(_ControlPlane):
    """The global control plane: zone sync over mutual TLS, the one VIP table."""

    def __init__(self, settings: GlobalSettings, reactor: Any) -> None:
        super().__init__(settings.data_dir, reactor, Metrics("global"))
        self.settings = settings
        self.hub: GlobalHub | None = None

    def _start(self) -> None:
        settings = self.settings
        store = self._store = SQLiteStore(settings.store_path)
        state = store.load()
        range_id = f"{settings.dns.cidr} {settings.dns.cidr6}"
        allocations, holds = state.allocations, state.holds
        reset = False
        if state.vip_range and state.vip_range != range_id:
            self.log.warn(
                "VIP range changed from {old} to {new}: every VIP is allocated anew",
                old=state.vip_range,
                new=range_id,
            )
            allocations, holds, reset = [], [], True
        table = GlobalTable(
            VipRange(settings.dns.cidr, settings.dns.cidr6),
            settings.dns.hold_down,
            allocations,
            holds,
            state.table_version,
            state.zones,
        )
        # A new table id at every start: a zone then takes the whole table rather
        # than changes from a version this process may never have had.
        table_id = uuid.uuid4().hex
        store.commit(table_origin=table_id, vip_range=range_id, reset_table=reset)
        sync_metrics = SyncMetrics(self.metrics.registry)

        def persist(delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
            try:
                store.commit(
                    delta=delta,
                    table_version=table.version,
                    zones_put=[table.zones[z] for z in zones if z in table.zones],
                    zones_deleted=deleted,
                )
            except StoreError as e:
                # Nothing is pushed that is not stored: back to the stored table.
                self.log.error("global: {error}; back to the stored table", error=str(e))
                stored = store.load()
                table.restore(stored.allocations, stored.holds, stored.table_version, stored.zones)
                raise
            self._update_gauges()

        hub = self.hub = GlobalHub(
            table,
            table_id,
            (str(settings.dns.cidr), str(settings.dns.cidr6)),
            persist,
            self.reactor,
            sync_metrics,
            require_certificates=settings.tls is not None,
        )
        for record in table.zones.values():
            record.connected = False
        now = self.reactor.seconds
        hub.changed(table.reconcile(now()), [], [])

        def tick() -> None:
            if table.table.due(now()):
                delta = table.reconcile(now())
                if delta.anything:
                    hub.changed(delta, [], [])
            hub.update_metrics()

        self.addService(TimerService(TICK_INTERVAL, self._guarded, tick))
        factory = SyncFactory(hub.session, self.reactor, sync_metrics)
        if settings.tls is not None:
            listening = self.reactor.listenSSL(
                settings.kds_port,
                factory,
                server_options(settings.tls),
                interface=settings.kds_interface,
            )
            self._listening.append(listening)
            self.ports["kds"] = int(listening.getHost().port)
        else:
            self.ports["kds"] = self._listen_tcp(settings.kds_port, factory, settings.kds_interface)
        self._listen_web(
            GlobalApiResource(hub, settings.dns.domain, self.metrics, now),
            settings.api_port,
            settings.api_interface,
            settings.diagnostics_port,
            settings.diagnostics_interface,
        )
        self.log.info(
            "global: {count} service(s) from {zones} zone(s), table version {version}; "
            "zone sync on {kds} ({how}), API on {api}, diagnostics on {diagnostics}",
            count=len(table.table.allocations),
            zones=len(table.zones),
            version=table.version,
            how="mutual TLS" if settings.tls else "insecure, no TLS",
            **self.ports,
        )

    def stopService(self) -> Any:
        # Close every zone's connection cleanly (TLS close_notify) and give the
        # closes a moment to go out before the listeners and the store go.
        if self.hub is not None:
            for session in list(self.hub.sessions.values()):
                session.proto.close()
        delay = deferLater(self.reactor, 0.2, lambda: None)
        return delay.addCallback(lambda _: super(GlobalService, self).stopService())

    def _update_gauges(self) -> None:
        if self.hub is None:
            return
        table = self.hub.table
        size = table.table.range.size
        self.metrics.vips_allocated.set(len(table.table.allocations))
        self.metrics.vip_range_size.set(size)
        self.metrics.vip_range_used.set(len(table.table.allocations) / size)
        self.metrics.vips_exhausted.set(len(table.table.exhausted))
        self.metrics.table_version.set(table.version)
