"""The dataplane role as a Twisted service: its table, the DNS resolver, the zone, diagnostics.

Start-up comes in two steps, as twistd runs them.  L{DataplaneService.privilegedStartService}
(before C{-u}/C{-g} drop privileges) binds the DNS ports on every
C{--dns-interface} address and the diagnostics port: nothing else needs the
privileges.  L{DataplaneService.startService} (as the user the process runs as)
creates the data dir, opens the table's store there (so its files belong to
that user), writes C{ports.json} and starts connecting to the zone.  Both run
before the reactor does; a failure in either is one line and a non-zero exit.

Until a table is held (from the store, or the zone) the names of the domain
(the stored settings', else the default C{mesh}) and the VIPs' reverse domains
are SERVFAIL, never forwarded; every other name is forwarded from the start.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError

from kumazone.control_plane import ControlPlane, StartupError, _QuietSite
from kumazone.core.config import DnsServerConfig
from kumazone.core.zone import DEFAULT_MESH, ZoneChange
from kumazone.dataplane.client import DataplaneClient
from kumazone.dataplane.forwarder import Forwarder
from kumazone.dataplane.metrics import DataplaneMetrics
from kumazone.dataplane.resolver import DataplaneAuthority, DataplaneDNSFactory
from kumazone.dataplane.table import STORE_FILE, DataplaneTable, TableStore, open_store
from kumazone.dns import udpbatch
from kumazone.dns.authority import Negative, Result
from kumazone.dns.server import KumaDNSDatagramProtocol
from kumazone.metrics import Metrics
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import DATAPLANE_HEARTBEAT, DATAPLANE_SILENCE, SyncFactory
from kumazone.sync.tls import TLSFiles, client_options
from kumazone.web.diagnostics import diagnostics_root

__all__ = ["DataplaneService", "DataplaneSettings", "NoTableYet"]

#: Reconnection to the zone: from half a second, backing off to ten.
RETRY_INITIAL, RETRY_MAX = 0.5, 10.0
#: Why an address of the defaults may be missing: no IPv6 (or no such address) here.
_ABSENT = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


@dataclass(frozen=True)
class DataplaneSettings:
    """What a dataplane needs to start, validated by the options."""

    mesh: str
    name: str
    #: The zone control plane's dataplane port (host, port).
    cp_address: tuple[str, int]
    data_dir: str
    tls: TLSFiles | None = None
    dns_port: int = 15053
    dns_interfaces: tuple[str, ...] = ("127.0.0.1", "::1")
    #: Whether the interfaces are the defaults: one that this host lacks (no
    #: IPv6) is then left out with a warning, not a failure.
    dns_interfaces_default: bool = False
    diagnostics_port: int = 9902
    diagnostics_interface: str = "127.0.0.1"
    resolv_conf: str = "/etc/resolv.conf"


class NoTableYet(Exception):
    """A name of the domain asked before any table is held: SERVFAIL."""


class _AwaitingTable(DataplaneAuthority):
    """The authority before any table: the domains' names fail (SERVFAIL), no others are its."""

    def resolve(self, asked: bytes, qtype: int, qclass: int, mesh: str = DEFAULT_MESH) -> Result:
        """Never an answer: the zone has not said what the domain holds."""
        raise NoTableYet("no table from the zone yet")

    def negative(self, name: bytes, qtype: int, qclass: int, mesh: str) -> Negative | None:
        """No negative answer either (the hot path leaves every query to the factory)."""
        return None


class DataplaneService(ControlPlane):
    """A dataplane: its mesh's names from the zone, answered locally; the rest forwarded."""

    def __init__(self, settings: DataplaneSettings, reactor: Any) -> None:
        super().__init__(settings.data_dir, reactor, Metrics(""))
        self.settings = settings
        self.dp_metrics = DataplaneMetrics(self.metrics.registry)
        self.table: DataplaneTable | None = None
        self.client: DataplaneClient | None = None
        self.factory: DataplaneDNSFactory | None = None
        self._table_store: TableStore | None = None
        #: The addresses the DNS ports are open on.
        self._interfaces: list[str] = []

    @property
    def zone_address(self) -> str:
        """The zone's dataplane port as logs and metrics name it."""
        host, port = self.settings.cp_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- start-up ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind the ports now if one needs privileges (below 1024), else in L{startService}.

        Sockets opened before twistd's C{-u}/C{-g} switch stay root's: the
        transparent proxy's rules tell the dataplane's own packets by their
        owner, so answers from a root-owned UDP socket would not be sent back
        through the redirect.  Ports of 1024 and above (15053, 9902) are
        therefore opened as the user the process runs as.
        """
        settings = self.settings
        if any(0 < port < 1024 for port in (settings.dns_port, settings.diagnostics_port)):
            self._bind_or_stop()
        MultiService.privilegedStartService(self)

    def _bind_or_stop(self) -> None:
        try:
            self._bind()
        except (OSError, CannotListenError, ValueError) as e:
            self._stop_listening()
            raise StartupError(f"kumazone: cannot start: {e}") from None

    def _bind(self) -> None:
        settings = self.settings
        forwarder = Forwarder(settings.resolv_conf, self.reactor, self.dp_metrics)
        self.factory = DataplaneDNSFactory(
            _AwaitingTable(DnsServerConfig()),
            settings.mesh,
            self.metrics,
            self.dp_metrics,
            forwarder,
            self.reactor,
        )
        self.ports["dns"] = self._listen_dns(self.factory)
        diagnostics = _QuietSite(diagnostics_root(self.metrics, self._readiness), 4096)
        self.ports["diagnostics"] = self._listen_tcp(
            settings.diagnostics_port, diagnostics, settings.diagnostics_interface
        )

    def startService(self) -> None:
        """Open the table where the process's user can write it; connect to the zone."""
        if self.factory is None:  # unprivileged ports: opened as this process's user
            self._bind_or_stop()
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            self._open_table()
            self._write_ports()
        except (OSError, ValueError) as e:
            self._stop_listening()
            raise StartupError(f"kumazone: cannot start: {e}") from None
        self._connect()
        self._ready = True
        self._log_started()
        MultiService.startService(self)

    def _open_table(self) -> None:
        """The table from the store (served at once if it holds one), followed by the DNS side."""
        settings = self.settings
        factory = self.factory
        assert factory is not None

        def warn(message: str) -> None:
            self.log.warn("{message}", message=message)

        store, stored = open_store(os.path.join(self.data_dir, STORE_FILE), warn)
        self._table_store = store
        table = self.table = DataplaneTable(settings.mesh, store, stored, warn)
        if table.config is not None:
            self._reconfigure(table.config)
            factory.apply(ZoneChange(table.snapshot, full=True))
        table.config_listeners.append(self._reconfigure)
        table.listeners.append(factory.apply)
        table.listeners.append(self._update_gauges)
        self._update_gauges(ZoneChange(table.snapshot, full=True))

    def _reconfigure(self, config: DnsServerConfig) -> None:
        """The zone's settings changed (or are first known): a new authority, a fresh cache.

        The table's next change (a full one) fills it; until a table is held, the
        names of the new domain fail as before.
        """
        assert self.factory is not None and self.table is not None
        kind = DataplaneAuthority if self.table.loaded else _AwaitingTable
        self.factory.set_authority(kind(config, config.nameserver_addresses))

    def _connect(self) -> None:
        settings = self.settings
        assert self.table is not None
        host, port = settings.cp_address
        sync_metrics = SyncMetrics(self.metrics.registry)
        client = self.client = DataplaneClient(
            self.table, settings.name, self.reactor, self.dp_metrics, self.zone_address
        )
        factory = SyncFactory(
            lambda: client, self.reactor, sync_metrics, DATAPLANE_HEARTBEAT, DATAPLANE_SILENCE
        )
        endpoint: Any = HostnameEndpoint(self.reactor, host, port)
        if settings.tls is not None:
            endpoint = wrapClientTLS(client_options(settings.tls, host), endpoint)
        self.addService(
            ClientService(endpoint, factory, retryPolicy=backoffPolicy(RETRY_INITIAL, RETRY_MAX))
        )

    def _log_started(self) -> None:
        table = self.table
        assert table is not None
        settings = self.settings
        self.log.info(
            "dataplane {mesh}/{name} serving {held}; DNS on {interfaces} port {dns}/udp+tcp, "
            "diagnostics on {diagnostics}; syncing with the zone at {zone} ({how})",
            mesh=settings.mesh,
            name=settings.name,
            held=(
                f"{len(table.entries)} service(s), table version {table.version} (stored)"
                if table.loaded
                else "no table yet"
            ),
            interfaces=",".join(self._interfaces),
            zone=self.zone_address,
            how="TLS" if settings.tls is not None else "insecure, no TLS",
            **self.ports,
        )

    # -- DNS ports --------------------------------------------------------------

    def _listen_udp(self, port: int, protocol: KumaDNSDatagramProtocol, interface: str) -> Any:
        """Batched reads and writes where the system has them, else Twisted's own port."""
        return udpbatch.listen(
            self.reactor, port, protocol, interface, lambda line: self.log.warn("{line}", line=line)
        )

    def _listen_dns(self, factory: DataplaneDNSFactory) -> int:
        """UDP and TCP on one port on every interface; with port 0, one free on all of them."""
        wanted = self.settings.dns_port
        interfaces = list(self.settings.dns_interfaces)
        for _attempt in range(50):
            port, opened, serving = wanted, [], []
            try:
                for interface in interfaces:
                    try:
                        udp = self._listen_udp(port, KumaDNSDatagramProtocol(factory), interface)
                    except CannotListenError as e:
                        if not self._absent(e):
                            raise
                        self.log.warn(
                            "DNS: {interface} is not an address of this host; not served",
                            interface=interface,
                        )
                        continue
                    opened.append(udp)
                    port = udp.getHost().port
                    opened.append(self.reactor.listenTCP(port, factory, interface=interface))
                    serving.append(interface)
            except CannotListenError as e:
                for listening in opened:
                    listening.stopListening()
                # With port 0, a port free on the first address may be taken on
                # another: try again.  Anything else is no use trying again.
                if wanted != 0 or getattr(e.socketError, "errno", None) != errno.EADDRINUSE:
                    raise
                continue
            if not serving:
                raise CannotListenError(",".join(interfaces), wanted, "no address to serve on")
            self._listening += opened
            self._interfaces = serving
            return int(port)
        raise CannotListenError(",".join(interfaces), wanted, "no port free for UDP and TCP")

    def _absent(self, error: CannotListenError) -> bool:
        """Whether an address of the defaults is just missing here (no IPv6, say)."""
        why = getattr(error.socketError, "errno", None)
        return self.settings.dns_interfaces_default and why in _ABSENT

    # -- readiness, metrics, stopping --------------------------------------------

    def _readiness(self) -> str | None:
        if not self._ready or self.table is None:
            return "starting"
        if not self.table.loaded:
            return f"no table yet (the zone at {self.zone_address} not reached)"
        return None

    def _update_gauges(self, change: ZoneChange) -> None:
        snapshot = change.snapshot
        self.metrics.vips_allocated.set(len(snapshot.entries))
        self.metrics.vip_range_size.set(snapshot.range_size)
        self.metrics.vip_range_used.set(
            snapshot.range_used / snapshot.range_size if snapshot.range_size else 0.0
        )
        self.metrics.table_version.set(snapshot.version)
        self.dp_metrics.table_version.set(snapshot.version)

    def stopService(self) -> Any:
        """Stop connecting and serving; close the store."""
        # Closed by the protocol first: it takes itself off the transport as a
        # producer, without which TLS would wait for it before sending its close.
        if self.client is not None:
            self.client.stop()
        result = super().stopService()
        if self._table_store is not None:
            self._table_store.close()
            self._table_store = None
        return result
