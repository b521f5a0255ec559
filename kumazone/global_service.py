"""The global control plane as a Twisted service: zone sync, the one VIP table, API."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.task import deferLater

from kumazone.control_plane import TICK_INTERVAL, ControlPlane
from kumazone.core.config import DnsServerConfig
from kumazone.core.federation import Federation
from kumazone.core.limits import ZoneLimits
from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.core.storage import StoreError
from kumazone.core.vips import TableDelta
from kumazone.metrics import Metrics
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.global_side import GlobalHub
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncFactory
from kumazone.sync.tls import TLSFiles, server_options
from kumazone.web.api import GlobalApiResource

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


class GlobalService(ControlPlane):
    """The global control plane: zone sync over mutual TLS, the one VIP table."""

    def __init__(self, settings: GlobalSettings, reactor: Any) -> None:
        super().__init__(settings.data_dir, reactor, Metrics("global"))
        self.settings = settings
        self.federation: Federation | None = None
        self.hub: GlobalHub | None = None
        # A failing store fails every zone message: one line per such message would flood.
        self._store_log = limited(
            RateLimiter(burst=10, interval=60.0), reactor, lambda line: self.log.error(line)
        )

    def _start(self) -> None:
        settings = self.settings
        store = self._store = SQLiteStore(settings.store_path)
        federation = self.federation = Federation(
            settings.dns, store, uuid.uuid4().hex, warn=lambda m: self.log.warn(m)
        )
        sync_metrics = SyncMetrics(self.metrics.registry)
        hub = self.hub = GlobalHub(
            federation.merged,
            federation.table_id,
            (str(settings.dns.cidr), str(settings.dns.cidr6)),
            self._persist,
            self.reactor,
            sync_metrics,
            require_certificates=settings.tls is not None,
            limits=settings.limits,
        )
        hub.changed(
            federation.merged.reconcile(self.reactor.seconds()), federation.cleaned_zones, []
        )
        self.addService(TimerService(TICK_INTERVAL, self._guarded, self._tick))
        self._listen_kds(
            SyncFactory(
                hub.session,
                self.reactor,
                sync_metrics,
                max_pending=settings.limits.max_pending_octets,
            )
        )
        self._listen_web(
            GlobalApiResource(hub, settings.dns.domain, self.metrics, self.reactor),
            settings.api_port,
            settings.api_interface,
            settings.diagnostics_port,
            settings.diagnostics_interface,
        )
        self._log_started()

    def _persist(self, delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
        """Store a change (the hub pushes only what this stored)."""
        assert self.federation is not None
        try:
            self.federation.persist(delta, zones, deleted)
        except StoreError as e:
            self._store_log(f"global: {e}; back to the stored table")
            raise
        self._update_gauges()

    def _tick(self) -> None:
        """Expire hold-downs and retry a full range when due; refresh the sync metrics."""
        assert self.federation is not None and self.hub is not None
        delta = self.federation.tick(self.reactor.seconds())
        if delta is not None:
            self.hub.changed(delta, [], [])
        self.hub.update_metrics()

    def _listen_kds(self, factory: SyncFactory) -> None:
        """Zone sync: mutual TLS, or plain TCP when told --insecure."""
        settings = self.settings
        if settings.tls is None:
            self.ports["kds"] = self._listen_tcp(settings.kds_port, factory, settings.kds_interface)
            return
        listening = self.reactor.listenSSL(
            settings.kds_port,
            factory,
            server_options(settings.tls),
            interface=settings.kds_interface,
        )
        self._listening.append(listening)
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
