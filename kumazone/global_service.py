"""The global control plane as a Twisted service: zone sync, the one VIP table, API."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource as web_resource
from twisted.web.server import Request

from kumazone.control_plane import TICK_INTERVAL, ControlPlane
from kumazone.core.config import DnsServerConfig
from kumazone.core.federation import Federation
from kumazone.core.limits import ZoneLimits
from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.core.storage import Store, StoreChanges, StoredState, StoreError
from kumazone.core.vips import TableDelta
from kumazone.metrics import Metrics
from kumazone.store import require_postgresql
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.forward import ZoneSyncPort
from kumazone.sync.global_side import GlobalHub
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncFactory
from kumazone.sync.tls import TLSFiles, server_options
from kumazone.web.api import GlobalApiResource
from kumazone.web.forward import ToTheLeader

if TYPE_CHECKING:
    from kumazone.store.global_replica import GlobalReplica

__all__ = ["GlobalService", "GlobalSettings"]


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
    diagnostics_interface: str = "127.0.0.1"
    tls: TLSFiles | None = None
    limits: ZoneLimits = field(default_factory=ZoneLimits)
    #: A PostgreSQL store shared with the global's other replicas (instead of SQLite).
    store_url: str | None = None
    #: The host the other replicas reach this one at (None: the kds interface, or
    #: this host's name when that is a wildcard).
    advertise_address: str | None = None


class GlobalService(ControlPlane):
    """The global control plane: zone sync over mutual TLS, the one VIP table."""

    def __init__(self, settings: GlobalSettings, reactor: Any) -> None:
        super().__init__(settings.data_dir, reactor, Metrics("global"))
        self.settings = settings
        self.federation: Federation | None = None
        self.hub: GlobalHub | None = None
        self.replica: GlobalReplica | None = None
        self._kds: Any = None
        self._kds_factory: _ZoneSyncFactory | None = None
        #: Replicas: the zone sync port, open while the process runs (L{ZoneSyncPort}).
        self._kds_port: ZoneSyncPort | None = None
        self._contact = ""
        self._sync_metrics: SyncMetrics | None = None
        #: The API: the federation's while there is one, else a replica standing by.
        self._api = _Switch(ToTheLeader(reactor, lambda: None, "global"))
        # A failing store fails every zone message: one line per such message would flood.
        self._store_log = limited(
            RateLimiter(burst=10, interval=60.0), reactor, lambda line: self.log.error(line)
        )
        self._forward_log = limited(
            RateLimiter(burst=2, interval=60.0), reactor, lambda line: self.log.warn(line)
        )

    def _start(self) -> None:
        settings = self.settings
        if settings.store_url is not None:
            self._start_replica(settings.store_url)
            return
        self._store = SQLiteStore(settings.store_path)
        self._run(self._store)
        self.addService(TimerService(TICK_INTERVAL, self._guarded, self._tick))
        self._listen_api()
        self._log_started()

    def _listen_api(self) -> None:
        settings = self.settings
        self._listen_web(
            self._api,
            settings.api_port,
            settings.api_interface,
            settings.diagnostics_port,
            settings.diagnostics_interface,
        )

    def _run(self, store: Store, prepared: _Prepared | None = None) -> None:
        """The federation over C{store}: its table, zone sync, the API's data.

        C{prepared}: the federation built already, off the reactor (a replica
        taking the lead: L{_prepare}); its start-up write and warnings go now.
        """
        settings = self.settings
        if prepared is None:
            federation = Federation(
                settings.dns, store, uuid.uuid4().hex, warn=lambda m: self.log.warn(m)
            )
            reconciled = federation.merged.reconcile(self.reactor.seconds())
        else:
            federation, reconciled = prepared.federation, prepared.reconciled
            federation.store = store
            for line in prepared.warnings:
                self.log.warn("{line}", line=line)
            for changes in prepared.commits:
                store.commit(changes)
        self.federation = federation
        if self._sync_metrics is None:
            self._sync_metrics = SyncMetrics(self.metrics.registry)

        def persist(delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
            # This federation's only: an old hub's late callbacks (after this replica
            # stood by and led again) must not write through a newer one.
            if federation is not self.federation:
                raise StoreError("this replica stood by since: not stored")
            self._persist(delta, zones, deleted)

        hub = self.hub = GlobalHub(
            federation.merged,
            federation.table_id,
            (str(settings.dns.cidr), str(settings.dns.cidr6)),
            persist,
            self.reactor,
            self._sync_metrics,
            require_certificates=settings.tls is not None,
            limits=settings.limits,
        )
        if self.replica is not None:
            replica = self.replica
            hub.may_push = replica.pushable
            replica.on_drained = hub.stored
        hub.changed(reconciled, federation.cleaned_zones, [])
        factory = self._kds_factory = _ZoneSyncFactory(
            hub.session,
            self.reactor,
            self._sync_metrics,
            max_pending=settings.limits.max_pending_octets,
        )
        if self._kds_port is not None:
            # A replica's port is open already: it serves zone sync from now.
            served: Any = factory
            if settings.tls is not None:
                served = TLSMemoryBIOFactory(server_options(settings.tls), False, factory)
            self._kds_port.serve(served)
        else:
            self._listen_kds(factory)
        self._api.current = GlobalApiResource(hub, settings.dns.domain, self.metrics, self.reactor)

    # -- replicas on PostgreSQL -------------------------------------------------------

    def _start_replica(self, url: str) -> None:
        """Stand by on the shared store; lead when elected (L{GlobalReplica})."""
        require_postgresql()
        from kumazone.store.global_replica import GlobalReplica
        from kumazone.store.replica import open_store

        settings = self.settings
        store = open_store(url, self.log)
        # Zone sync's port is open from the start: forwarded to the leader until
        # this replica leads (kumazone.sync.forward), and so is the API.
        self._kds_port = ZoneSyncPort(
            self.reactor,
            lambda: self._leader_at("kds"),
            self.metrics.registry,
            self._forward_log,
        )
        self.ports["kds"] = self._listen_tcp(
            settings.kds_port, self._kds_port, settings.kds_interface
        )
        self._listen_api()
        self._contact = self._contact_of()
        self._api.current = self._forwarding_api()
        self.replica = GlobalReplica(
            store,
            self.reactor,
            self.metrics.registry,
            holder=f"global@{socket.gethostname()}:{os.getpid()}",
            prepare=self._prepare,
            on_lead=lambda prepared: self._run(self.replica, prepared),  # type: ignore[arg-type]
            on_stand_by=self._stand_by,
            contact=self._contact,
        )
        self._store = None  # the replica closes its own
        self.addService(TimerService(TICK_INTERVAL, self._guarded, self._tick))
        # What is forwarded to a replica that no longer leads is closed within a second.
        self.addService(TimerService(1.0, self._guarded, self._kds_port.check))
        self.replica.start()
        self.log.info(
            "global replica on {where}: forwarding to the leader until elected "
            "(reached at {contact} while leading); zone sync on {kds}, API on {api}, "
            "diagnostics on {diagnostics}",
            where=store.where,
            contact=self._contact,
            **self.ports,
        )

    def _prepare(self, state: StoredState) -> _Prepared:
        """On the replica's store thread, taking the lead: the federation built from
        C{state} and reconciled (O(table), off the reactor; 100,000 services take
        seconds).  Nothing else sees it yet; its write and warnings wait for L{_run}."""
        loaded = _Loaded(state)
        warnings: list[str] = []
        federation = Federation(self.settings.dns, loaded, uuid.uuid4().hex, warn=warnings.append)
        reconciled = federation.merged.reconcile(self.reactor.seconds())
        return _Prepared(federation, reconciled, loaded.commits, warnings)

    def _forwarding_api(self) -> web_resource.Resource:
        """The API while standing by: the leader's, forwarded (L{ToTheLeader})."""
        holder = self.replica.election.contender.holder if self.replica else "global"
        return ToTheLeader(self.reactor, lambda: self._leader_at("api"), holder)

    def _contact_of(self) -> str:
        """How the other replicas reach this one's zone sync and API (JSON).

        The host is C{--advertise-address}, else C{--kds-interface} unless a
        wildcard, else this host's name.  The API is published at that host when
        it listens on a wildcard, at its own interface when that is another, and
        not at all when it listens on loopback only while the host is not
        loopback (the others could not reach it: they answer 503 and say so).
        """
        settings = self.settings
        host = settings.advertise_address
        if host is None:
            host = settings.kds_interface
            if _wildcard(host):
                host = socket.gethostname()
        api = settings.api_interface
        if _wildcard(api):
            api = host
        elif _loopback(api) and not _loopback(host):
            api = ""
        return json.dumps(
            {
                "kds": _host_port(host, self.ports["kds"]),
                "api": _host_port(api, self.ports["api"]) if api else "",
            },
            sort_keys=True,
        )

    def _leader_at(self, what: str) -> tuple[str, int] | None:
        """Where the leader's C{what} (kds, api) listens, as it wrote it; None if no
        other replica leads.  This replica's own ports are never forwarded to (a
        leader that wrote a loopback address, seen from another host, would be):
        each replica listens on the same ports, so a loopback address at one of
        this replica's ports, or this replica's own host, is taken for itself."""
        if self.replica is None:
            return None
        contact = self.replica.election.leadership.contact
        if not contact or contact == self._contact:
            return None
        try:
            found = json.loads(contact)
            mine = json.loads(self._contact)
        except ValueError:
            return None
        if not isinstance(found, dict):
            return None
        target = ZoneSyncPort.parse(found.get(what))
        if target is None:
            return None
        host, port = target
        own = ZoneSyncPort.parse(mine.get(what)) or ("", 0)
        if port == self.ports.get(what) and (_loopback(host) or host == own[0]):
            self._forward_log(
                f"global: the leader's {what} address {host}:{port} is this replica's own: "
                "not forwarded (give each replica --advertise-address)"
            )
            return None
        return target

    def _stand_by(self, why: str) -> None:
        """Lost the lead: zone sync closes (and every connection of it, past its hello
        or not: a zone must not wait on a replica that will send it nothing), the
        table goes; zone sync and the API are forwarded to the leader from now."""
        if self._kds_port is not None:
            self._kds_port.serve(None)
        if self._kds_factory is not None:
            self._kds_factory.close_all()
            self._kds_factory = None
        if self.hub is not None:
            self.hub.may_push = lambda: False  # the old hub sends nothing more
            stepping = getattr(self.hub, "_stepping", None)
            if stepping is not None and stepping.active():
                stepping.cancel()
        if self.replica is not None:
            self.replica.on_drained = lambda: None
        self.hub = None
        self.federation = None
        self._api.current = self._forwarding_api()

    def _role(self) -> str | None:
        if self.replica is None:
            return None
        return "leader" if self.replica.leading else "follower"

    def _persist(self, delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
        """Store a change (the hub pushes only what this stored)."""
        if self.federation is None:
            raise StoreError("this replica stands by: nothing is stored here")
        try:
            self.federation.persist(delta, zones, deleted)
        except StoreError as e:
            self._store_log(f"global: {e}; back to the stored table")
            raise
        self._update_gauges()

    def _tick(self) -> None:
        """Expire hold-downs and retry a full range when due; refresh the sync metrics."""
        if self.federation is None or self.hub is None:
            return  # a replica standing by
        delta = self.federation.tick(self.reactor.seconds())
        if delta is not None:
            self.hub.changed(delta, [], [])
        self.hub.update_metrics()

    def _listen_kds(self, factory: SyncFactory) -> None:
        """Zone sync: mutual TLS, or plain TCP when told --insecure."""
        settings = self.settings
        if settings.tls is None:
            self.ports["kds"] = self._listen_tcp(settings.kds_port, factory, settings.kds_interface)
            self._kds = self._listening[-1]
            return
        listening = self.reactor.listenSSL(
            settings.kds_port,
            factory,
            server_options(settings.tls),
            interface=settings.kds_interface,
        )
        self._listening.append(listening)
        self._kds = listening
        self.ports["kds"] = int(listening.getHost().port)

    def _log_started(self) -> None:
        assert self.hub is not None
        merged = self.hub.merged
        self.log.info(
            "global: {count} service(s) from {zones} zone(s), table version {version}; "
            "zone sync on {kds} ({how}), API on {api}, diagnostics on {diagnostics}",
            count=len(merged.allocator.allocations),
            zones=len(merged.zones),
            version=merged.version,
            how="mutual TLS" if self.settings.tls else "insecure, no TLS",
            **self.ports,
        )

    def stopService(self) -> Any:
        # Close every zone's connection cleanly (TLS close_notify) and give the
        # closes a moment to go out before the listeners and the store go.
        if self.replica is not None:
            # Its lock goes with its session (another leads); the threads end first.
            stopping = self.replica.stop()
            return stopping.addBoth(lambda _: self._stop_rest())
        return self._stop_rest()

    def _stop_rest(self) -> Any:
        if self.hub is not None:
            for session in list(self.hub.sessions.values()):
                session.proto.close()
        delay = deferLater(self.reactor, 0.2, lambda: None)
        return delay.addCallback(lambda _: super(GlobalService, self).stopService())

    def _update_gauges(self) -> None:
        if self.hub is None:
            return
        table = self.hub.merged
        size = table.allocator.range.size
        self.metrics.vips_allocated.set(len(table.allocator.allocations))
        self.metrics.vip_range_size.set(size)
        self.metrics.vip_range_used.set(len(table.allocator.allocations) / size)
        self.metrics.vips_exhausted.set(len(table.allocator.exhausted))
        self.metrics.table_version.set(table.version)


class _Switch(web_resource.Resource):
    """The API root: whichever resource is current (the federation's, or standing by)."""

    isLeaf = True

    def __init__(self, current: web_resource.Resource) -> None:
        super().__init__()
        self.current = current

    def render(self, request: Request) -> Any:
        return self.current.render(request)


class _Loaded:
    """A store for a federation built off the reactor: the state loaded, once; its
    writes kept for the real store (L{GlobalService._run})."""

    def __init__(self, state: StoredState) -> None:
        self.state: StoredState | None = state
        self.commits: list[StoreChanges] = []

    def load(self) -> StoredState:
        state, self.state = self.state, None
        if state is None:
            raise StoreError("global: the state is loaded once")
        return state

    def commit(self, changes: StoreChanges) -> None:
        self.commits.append(changes)

    def close(self) -> None:
        pass


@dataclass
class _Prepared:
    """A federation built off the reactor, and what is left to do on it."""

    federation: Federation
    reconciled: TableDelta
    commits: list[StoreChanges]
    warnings: list[str]


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ZoneSyncFactory(SyncFactory):
    """Zone sync's factory, which can close every connection it made (a replica that
    stops leading: its port stops listening first, so no new one comes after)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocols: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        made = super().buildProtocol(addr)
        self.protocols.add(made)
        return made

    def close_all(self) -> None:
        for made in list(self.protocols):
            made.close()
