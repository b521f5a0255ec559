"""What a store holds and the interface every store implements. Pure.

L{kumazone.core.zone.Zone} and the global's L{kumazone.core.federation.Federation}
depend on L{Store}, never on a particular database: the SQLite store
(L{kumazone.store.sqlite}) implements it, and so will others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kumazone.core.resources import Resource, ResourceKey
from kumazone.core.vips import Allocation, Hold, ServiceKey, TableDelta

if TYPE_CHECKING:
    # federation.py depends on this interface; its ZoneRecord only annotates here.
    from kumazone.core.federation import ZoneRecord

__all__ = ["Store", "StoreChanges", "StoreError", "StoredState"]


class StoreError(Exception):
    """The store cannot be opened or used."""


@dataclass
class StoredState:
    """Everything the store holds, as loaded at start-up."""

    resources: list[Resource] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    table_version: int = 0
    vip_range: str = ""
    #: The id of the global's table the rows came from; '' when allocated here.
    table_id: str = ""
    zones: list[ZoneRecord] = field(default_factory=list)
    #: Rows that no longer validate (kept in the database, reported, not served).
    bad_resources: list[tuple[ResourceKey, str]] = field(default_factory=list)
    #: The last change of the store's change log this state includes (a store
    #: that replicas share; 0 for one that has none).
    log_seq: int = 0


@dataclass(frozen=True)
class StoreChanges:
    """One transaction's worth of changes; a field left at its default changes nothing."""

    #: Resources given through the API, created or replaced.
    puts: Sequence[Resource] = ()
    #: Resources given through the API, deleted.
    deletes: Sequence[ResourceKey] = ()
    #: Allocations and hold-downs added and removed.
    delta: TableDelta | None = None
    table_version: int | None = None
    #: The VIP range the rows belong to (C{"CIDR CIDRv6"}).
    vip_range: str | None = None
    #: Drop every stored allocation and hold-down before applying C{delta}.
    reset_table: bool = False
    table_id: str | None = None
    #: The global's records of zones (contact, acked), created or replaced, and
    #: deleted (a deleted zone's services go with it).  A record put does not
    #: write the zone's services: those are the two fields below.
    zones_put: Sequence[ZoneRecord] = ()
    zones_deleted: Sequence[str] = ()
    #: The zones' services (zone name, service) that came and went.
    zone_services_added: Sequence[tuple[str, ServiceKey]] = ()
    zone_services_removed: Sequence[tuple[str, ServiceKey]] = ()


class Store(Protocol):
    """A transactional store of resources, the VIP table and (on the global) zones."""

    def load(self) -> StoredState:
        """Read everything back; raises L{StoreError} if the store cannot be read."""

    def commit(self, changes: StoreChanges) -> None:
        """Apply C{changes} in one transaction; raises L{StoreError} and changes nothing
        if the write fails."""

    def close(self) -> None:
        """Release the store's resources."""
