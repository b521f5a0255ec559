"""The zone control plane as a Twisted service: store, resources, DNS, API, diagnostics."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService, TimerService, backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from kumazone.control_plane import TICK_INTERVAL, ControlPlane
from kumazone.core.config import DnsServerConfig, default_nameserver_addresses
from kumazone.core.storage import StoreError
from kumazone.core.zone import DEFAULT_MESH, Zone, ZoneSnapshot
from kumazone.dns import udpbatch
from kumazone.dns.authority import MeshAuthority
from kumazone.dns.server import KumaDNSDatagramProtocol, KumaDNSServerFactory
from kumazone.metrics import Metrics
from kumazone.resource_dir import ResourceDirectory
from kumazone.store import require_postgresql
from kumazone.store.background import BackgroundWrites, StoredWrites
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.dataplane_side import DataplaneHub, DataplaneLimits, DataplaneMetrics
from kumazone.sync.failover import FailoverEndpoint
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncFactory
from kumazone.sync.tls import TLSFiles, client_options, server_options
from kumazone.sync.zone_side import ZoneSync
from kumazone.web.api import ApiResource

if TYPE_CHECKING:
    from kumazone.store.replica import ZoneReplica

__all__ = ["ZoneService", "ZoneSettings", "mesh_lookup"]

#: How often the resources directory is looked at (a change is live within a second).
SCAN_INTERVAL = 0.5
#: Seconds a connection to one of the global's replicas may take before the next is tried.
GLOBAL_TIMEOUT = 5.0


def _host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    diagnostics_interface: str = "127.0.0.1"
    #: The global to sync with (host, port), or None for a standalone zone.
    global_address: tuple[str, int] | None = None
    #: The global's other replicas, tried in turn when one cannot be reached.
    global_fallbacks: tuple[tuple[str, int], ...] = ()
    #: A PostgreSQL store shared with the zone's other replicas (instead of SQLite).
    store_url: str | None = None
    tls: TLSFiles | None = None
    #: The dataplane port: served with C{dp_tls} (mutual TLS), or without TLS
    #: when C{dp_insecure}; with neither, not at all.
    dp_port: int = 5678
    dp_interface: str = "0.0.0.0"
    dp_tls: TLSFiles | None = None
    dp_insecure: bool = False
    dp_limits: DataplaneLimits = field(default_factory=DataplaneLimits)


def mesh_lookup(get_snapshot: Callable[[], ZoneSnapshot]) -> Callable[[str], str]:
    """A function from a client address to its mesh (C{default} if unknown)."""

    def mesh_of(host: str) -> str:
        if host.startswith("::ffff:"):
            host = host[7:]
        return get_snapshot().mesh_of_address.get(host, DEFAULT_MESH)

    return mesh_of


class ZoneService(ControlPlane):
    """A zone control plane: standalone, or synced with a global."""

    def __init__(self, settings: ZoneSettings, reactor: Any) -> None:
        super().__init__(settings.data_dir, reactor, Metrics(settings.zone))
        self.settings = settings
        self.zone: Zone | None = None
        self.sync: ZoneSync | None = None
        self.dataplanes: DataplaneHub | None = None
        self._sync_metrics: SyncMetrics | None = None
        self._globals: FailoverEndpoint
        self.replica: ZoneReplica | None = None
        #: Replicas: the connection to the global, made while this one leads.
        self._global_client: ClientService | None = None
        #: A zone's big table updates, and the changes behind them, written on
        #: another thread (SQLite stores).
        self._background: BackgroundWrites | None = None

    def _start(self) -> None:
        settings = self.settings
        zone = self.zone = self._open_zone()
        self._load_resources(zone)
        clock = self.reactor
        self.addService(
            TimerService(TICK_INTERVAL, self._guarded, lambda: zone.tick(clock.seconds()))
        )
        if settings.global_address is not None:
            self._connect_global(zone, (settings.global_address, *settings.global_fallbacks))
        self.ports["dns"] = self._listen_dns(self._dns_factory(zone))
        self._serve_dataplanes(zone)
        self._listen_web(
            ApiResource(
                zone,
                self.metrics,
                self.reactor,
                self._sync_status,
                self.dataplanes,
                writes=self.replica if self.replica is not None else self._stored_writes(zone),
            ),
            settings.api_port,
            settings.api_interface,
            settings.diagnostics_port,
            settings.diagnostics_interface,
        )
        if self.replica is not None:
            self.replica.start(zone)
        self._log_started(zone)

    def _stored_writes(self, zone: Zone) -> StoredWrites | None:
        """The API's writes, answered once stored (SQLite: behind a big write)."""
        return StoredWrites(zone, self._background) if self._background is not None else None

    def _role(self) -> str | None:
        if self.replica is None:
            return None
        return "leader" if self.replica.leading else "follower"

    def _open_zone(self) -> Zone:
        """The zone over its store, as the store left it."""
        settings = self.settings
        store: Any
        if settings.store_url is not None:
            # Replicas on PostgreSQL: the store waits for the database (a line each
            # try), then every call of it runs on its own thread, never here.
            # (psycopg is imported only for them: SQLite alone needs none of it.)
            require_postgresql()
            from kumazone.store.replica import ZoneReplica, open_store

            postgres = open_store(settings.store_url, self.log)
            store = self._store = self.replica = ZoneReplica(
                postgres,
                settings.zone,
                self.reactor,
                self.metrics.registry,
                holder=f"{settings.zone}@{socket.gethostname()}:{os.getpid()}",
            )
        else:
            store = self._store = SQLiteStore(settings.store_path)
        zone = Zone(
            settings.zone,
            settings.dns,
            store,
            warn=lambda m: self.log.warn(m),
            federated=settings.global_address is not None,
        )
        if isinstance(store, SQLiteStore):
            # One thread: the writes handed to it run in the order they came.
            # Its thread starts with the reactor (a start-up that fails exits then,
            # with no thread left to wait for); writes handed to it before wait.
            pool = ThreadPool(minthreads=1, maxthreads=1, name="zone-store")
            self.reactor.callWhenRunning(pool.start)
            self.reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
            self._background = BackgroundWrites(
                store,
                lambda write: deferToThreadPool(self.reactor, pool, write),
                self._background_failed,
            )
            zone.write_in_background = self._background.write
        zone.listeners.append(lambda change: self._update_gauges(change.snapshot))
        if self.replica is not None:
            zone.following = True  # until the election says otherwise
        return zone

    def _load_resources(self, zone: Zone) -> None:
        """Load the resources directory (watched from now on) and reconcile once."""
        loaded = 0
        if self.settings.resources_dir is not None:
            directory = ResourceDirectory(
                self.settings.resources_dir, zone, self.metrics, self.reactor
            )
            loaded = directory.scan()
            self.addService(TimerService(SCAN_INTERVAL, self._guarded, directory.scan))
        if not loaded:
            zone.update(self.reactor.seconds())  # a scan that loaded anything reconciled

    def _nameservers(self) -> tuple[str, ...]:
        """The addresses of the apex NS name, as the zone's authority serves them."""
        return self.settings.dns.nameserver_addresses or default_nameserver_addresses(
            self.settings.dns_interface
        )

    def _shared_sync_metrics(self) -> SyncMetrics:
        """The sync counters, made once: zone sync and the dataplane port share them."""
        if self._sync_metrics is None:
            self._sync_metrics = SyncMetrics(self.metrics.registry)
        return self._sync_metrics

    def _dns_factory(self, zone: Zone) -> KumaDNSServerFactory:
        """The DNS server factory over an authority that follows the zone's table."""
        dns_config = self.settings.dns
        authority = MeshAuthority(dns_config, self._nameservers())
        authority.update(zone.snapshot)
        zone.listeners.append(authority.apply)
        factory = KumaDNSServerFactory(
            authority, mesh_lookup(lambda: zone.snapshot), self.metrics, self.reactor
        )
        # After the authority has the change: the answers it touched go (and no others).
        zone.listeners.append(factory.hot.apply)
        return factory

    def _log_started(self, zone: Zone) -> None:
        snapshot = zone.snapshot
        self.log.info(
            "zone {zone} serving {count} service(s), table version {version}; "
            "DNS on {dns}/udp+tcp, API on {api}, diagnostics on {diagnostics}",
            zone=self.settings.zone,
            count=len(snapshot.entries),
            version=snapshot.version,
            **self.ports,
        )

    def _connect_global(self, zone: Zone, addresses: Sequence[tuple[str, int]]) -> None:
        sync_metrics = self._shared_sync_metrics()
        sync_metrics.connected.labels(zone.name).set(0)
        replica = self.replica
        self.sync = ZoneSync(
            zone,
            self.reactor,
            sync_metrics,
            durable=replica.when_durable if replica is not None else self._when_stored,
        )
        sync = self.sync
        factory = SyncFactory(lambda: sync, self.reactor, sync_metrics)
        endpoints: list[Any] = []
        for host, port in addresses:
            endpoint: Any = HostnameEndpoint(self.reactor, host, port, timeout=GLOBAL_TIMEOUT)
            if self.settings.tls is not None:
                endpoint = wrapClientTLS(client_options(self.settings.tls, host), endpoint)
            endpoints.append(endpoint)
        self._globals = FailoverEndpoint(endpoints, [_host_port(a) for a in addresses])
        backoff = backoffPolicy(0.5, 10.0)

        def connecting() -> ClientService:
            # A zone the global refused waits longer (ZoneSync.retry_delay).
            return ClientService(
                self._globals,
                factory,
                retryPolicy=lambda attempt: sync.retry_delay(backoff(attempt)),
            )

        how = "TLS" if self.settings.tls else "insecure, no TLS"
        where = ", ".join(self._globals.names)
        if replica is None:
            self.addService(connecting())
            self.log.info("syncing with the global at {where} ({how})", where=where, how=how)
            return
        # Replicas: only the leader syncs (its table comes to the others through
        # the store), from when it leads until it no longer does.
        self.log.info(
            "the leader of these replicas syncs with the global at {where} ({how})",
            where=where,
            how=how,
        )

        def role(leading: bool) -> None:
            if leading and self._global_client is None:
                self.log.info("leading: syncing with the global at {where}", where=where)
                self._global_client = connecting()
                self._global_client.startService()
            elif not leading and self._global_client is not None:
                self.log.info("no longer leading: closing zone sync")
                client, self._global_client = self._global_client, None
                if sync.proto is not None:
                    sync.proto.close()
                client.stopService()

        replica.role_listeners.append(role)

    def _serve_dataplanes(self, zone: Zone) -> None:
        """The dataplane port: mutual TLS, or plain TCP when told --insecure; else off."""
        settings = self.settings
        if settings.dp_tls is None and not settings.dp_insecure:
            self.log.info("dataplane port off: give --tls-cert/--tls-key/--tls-ca or --insecure")
            return
        hub = self.dataplanes = DataplaneHub(
            zone,
            self.reactor,
            DataplaneMetrics(self.metrics.registry),
            self._shared_sync_metrics(),
            settings.dns,
            self._nameservers(),
            require_certificates=settings.dp_tls is not None,
            limits=settings.dp_limits,
        )
        if settings.dp_tls is None:
            self.ports["dp"] = self._listen_tcp(
                settings.dp_port, hub.factory(), settings.dp_interface
            )
        else:
            listening = self.reactor.listenSSL(
                settings.dp_port,
                hub.factory(),
                server_options(settings.dp_tls),
                interface=settings.dp_interface,
            )
            self._listening.append(listening)
            self.ports["dp"] = int(listening.getHost().port)
        self.log.info(
            "dataplanes on {interface}:{port} ({how})",
            interface=settings.dp_interface,
            port=self.ports["dp"],
            how="mutual TLS" if settings.dp_tls is not None else "insecure, no TLS",
        )

    def _when_stored(self) -> Deferred[None]:
        return succeed(None) if self._background is None else self._background.when_stored()

    def _background_failed(self, reason: str) -> None:
        """A write on the store's thread failed (a big table update, or a change
        behind one): back to what is stored, and reconnect to the global."""
        self.log.warn("cannot store a change: {error}; back to what is stored", error=reason)
        if self.zone is not None:
            try:
                self.zone.recover()
            except StoreError as e:
                self.log.warn("cannot read the store again: {error}", error=e)
        if self.sync is not None and self.sync.proto is not None:
            # The next connection claims what is stored; the global sends on from there.
            self.sync.proto.fail(f"cannot store a change: {reason}")

    def stopService(self) -> Any:
        # The connection to the global is closed by its protocol first: that takes
        # it off the transport as a producer, without which TLS would wait for it
        # before sending its close (and SIGTERM would never end the process).
        if self.sync is not None and self.sync.proto is not None:
            self.sync.proto.close()
        if self.replica is not None:
            # Stop leading first: the lock goes with its session, and another leads.
            stopping = self.replica.stop()
            self._store = None  # the replica closes its own store
            return stopping.addBoth(lambda _: self._stop_rest())
        return self._stop_rest()

    def _stop_rest(self) -> Any:
        # Close every dataplane's connection cleanly (TLS close_notify) and give the
        # closes a moment to go out before the listeners and the store go.
        if self.dataplanes is None:
            return super().stopService()
        self.dataplanes.stop()
        delay = deferLater(self.reactor, 0.2, lambda: None)
        return delay.addCallback(lambda _: super(ZoneService, self).stopService())

    def _sync_status(self) -> dict[str, Any] | None:
        if self.settings.global_address is None or self.sync is None:
            return None
        status = {
            "global": self._globals.current_name,
            "connected": self.sync.connected_since is not None,
            "connectedSince": self.sync.connected_since,
            "lastTable": self.sync.last_table_at,
        }
        if self.replica is not None:
            # Only the leader syncs; a follower's table comes through the store.
            status["syncing"] = self._global_client is not None
        if len(self._globals.names) > 1:
            status["globals"] = list(self._globals.names)
        return status

    def _listen_udp(self, port: int, protocol: KumaDNSDatagramProtocol, interface: str) -> Any:
        """Batched reads and writes where the system has them, else Twisted's own port."""
        return udpbatch.listen(
            self.reactor, port, protocol, interface, lambda line: self.log.warn("{line}", line=line)
        )

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
