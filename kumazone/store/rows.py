"""The store's rows back into a L{StoredState}: what the SQLite and PostgreSQL stores share. Pure.

Both stores hold the same logical tables and read them with the same queries;
L{load_state} runs them through the store's C{execute} (sqlite3's or psycopg's,
inside the store's own transaction) and builds the state, one key object per
service shared by the table and every zone's services.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from kumazone.core.federation import ZoneRecord
from kumazone.core.resources import ResourceKey, parse_stored
from kumazone.core.storage import StoredState
from kumazone.core.vips import Allocation, Hold, ServiceKey

__all__ = ["load_state"]

Execute = Callable[[str], Iterable[Any]]


def load_state(execute: Execute) -> StoredState:
    """Every row, through C{execute}; ValueError or KeyError if a meta value is missing."""
    state = StoredState()
    for type_, mesh, name, document in execute(
        "SELECT type, mesh, name, document FROM resources ORDER BY type, mesh, name"
    ):
        try:
            resource = parse_stored(document)
        except ValueError as e:
            state.bad_resources.append((ResourceKey(type_, mesh, name), str(e)))
            continue
        state.resources.append(resource)
    #: One key object per service, shared by the table and every zone's services.
    keys: dict[tuple[str, str], ServiceKey] = {}
    #: One tuple per set of zones (most rows share a few).
    zone_sets: dict[str, tuple[str, ...]] = {}
    #: One number per claim (many rows share one: those allocated by one change).
    claims: dict[int, int] = {}
    allocations = state.allocations
    for mesh, service, offset, zones, claim in execute(
        "SELECT mesh, service, vip_offset, zones, claim FROM vips ORDER BY vip_offset"
    ):
        key = keys[(mesh, service)] = ServiceKey(mesh, service)
        names = zone_sets.get(zones)
        if names is None:
            names = zone_sets[zones] = tuple(json.loads(zones))
        allocations.append(Allocation(key, offset, names, claims.setdefault(claim, claim)))
    records = {
        name: ZoneRecord(name, set(), last_contact=last_contact, acked=acked)
        for name, last_contact, acked in execute(
            "SELECT name, last_contact, acked FROM zones ORDER BY name"
        )
    }
    for zone, mesh, service in execute("SELECT zone, mesh, service FROM zone_services"):
        record = records.get(zone)
        if record is None:
            continue  # rows of a zone deleted (never written so; harmless)
        shared = keys.get((mesh, service))
        if shared is None:
            shared = keys[(mesh, service)] = ServiceKey(mesh, service)
        record.services.add(shared)
    state.zones = list(records.values())
    state.holds = [
        Hold(ServiceKey(mesh, service), offset, until)
        for offset, mesh, service, until in execute(
            "SELECT vip_offset, mesh, service, until FROM holds ORDER BY vip_offset"
        )
    ]
    meta = dict(execute("SELECT key, value FROM meta"))
    state.table_version = int(meta["table_version"])
    state.vip_range = meta["vip_range"]
    state.table_id = meta["table_origin"]
    state.log_seq = int(meta.get("log_seq", 0))  # a store that replicas share has one
    return state
