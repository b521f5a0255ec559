"""The global control plane as a Twisted service: zone sync, the one VIP table, API."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.task import deferLater

from kumazone.control_plane import TICK_INTERVAL, ControlPlane
from kumazone.core.config import DnsServerConfig
from kumazone.core.federation import MergedTable
from kumazone.core.storage import StoreChanges, StoreError
from kumazone.core.vips import TableDelta, VipRange
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
    diagnostics_interface: str = ""
    tls: TLSFiles | None = None


class GlobalService(ControlPlane):
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
        table = MergedTable(
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
        store.commit(StoreChanges(table_id=table_id, vip_range=range_id, reset_table=reset))
        sync_metrics = SyncMetrics(self.metrics.registry)

        def persist(delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
            try:
                store.commit(
                    StoreChanges(
                        delta=delta,
                        table_version=table.version,
                        zones_put=[table.zones[z] for z in zones if z in table.zones],
                        zones_deleted=deleted,
                    )
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
            if table.allocator.due(now()):
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
            GlobalApiResource(hub, settings.dns.domain, self.metrics, self.reactor),
            settings.api_port,
            settings.api_interface,
            settings.diagnostics_port,
            settings.diagnostics_interface,
        )
        self.log.info(
            "global: {count} service(s) from {zones} zone(s), table version {version}; "
            "zone sync on {kds} ({how}), API on {api}, diagnostics on {diagnostics}",
            count=len(table.allocator.allocations),
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
        table = self.hub.merged
        size = table.allocator.range.size
        self.metrics.vips_allocated.set(len(table.allocator.allocations))
        self.metrics.vip_range_size.set(size)
        self.metrics.vip_range_used.set(len(table.allocator.allocations) / size)
        self.metrics.vips_exhausted.set(len(table.allocator.exhausted))
        self.metrics.table_version.set(table.version)
