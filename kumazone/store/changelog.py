"""A store change as text and back: the rows of the PostgreSQL store's change log. Pure.

Replicas sharing a database follow each other through its change log: every
transaction appends the L{StoreChanges} it wrote, encoded here, and the other
replicas read and apply the ones they have not seen (O(change) each).  The
encoding is compact JSON with one list per field; resources travel as their
stored documents and are validated again when read (L{parse_stored}).
"""

from __future__ import annotations

import json
from typing import Any

from kumazone.core.federation import ZoneRecord
from kumazone.core.resources import ResourceKey, parse_stored
from kumazone.core.storage import StoreChanges
from kumazone.core.vips import Allocation, Hold, ServiceKey, TableDelta

__all__ = ["decode", "encode"]

#: The version of this encoding: a replica refuses a log row of another.
VERSION = 1


def encode(changes: StoreChanges) -> str:
    """C{changes} as one line of JSON; fields left at their defaults are left out."""
    out: dict[str, Any] = {"v": VERSION}
    if changes.puts:
        out["puts"] = [r.raw.decode("utf-8") for r in changes.puts]
    if changes.deletes:
        out["deletes"] = [[k.type, k.mesh, k.name] for k in changes.deletes]
    delta = changes.delta
    if delta is not None:
        out["delta"] = {
            "added": [
                [a.key.mesh, a.key.service, a.offset, list(a.zones), a.claim] for a in delta.added
            ],
            "removed": [[a.key.mesh, a.key.service, a.offset] for a in delta.removed],
            "holds_added": [
                [h.key.mesh, h.key.service, h.offset, h.until] for h in delta.holds_added
            ],
            "holds_dropped": [
                [h.key.mesh, h.key.service, h.offset, h.until] for h in delta.holds_dropped
            ],
            # The services the range left without a VIP, all of them (each change
            # of the leader's table works them out anew).
            "exhausted": [[k.mesh, k.service] for k in delta.exhausted],
        }
    for name in ("table_version", "vip_range", "table_id"):
        value = getattr(changes, name)
        if value is not None:
            out[name] = value
    if changes.reset_table:
        out["reset_table"] = True
    if changes.zones_put:
        out["zones_put"] = [[z.name, z.last_contact, z.acked] for z in changes.zones_put]
    if changes.zones_deleted:
        out["zones_deleted"] = list(changes.zones_deleted)
    for name in ("zone_services_added", "zone_services_removed"):
        pairs = getattr(changes, name)
        if pairs:
            out[name] = [[zone, k.mesh, k.service] for zone, k in pairs]
    return json.dumps(out, separators=(",", ":"))


def decode(text: str) -> StoreChanges:
    """The L{StoreChanges} that L{encode} wrote; ValueError if the text is not one."""
    try:
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("v") != VERSION:
            raise ValueError(f"not a change of log version {VERSION}")
        return _decode(document)
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"a malformed change: {type(e).__name__}: {e}") from None


def _key(mesh: str, service: str) -> ServiceKey:
    if not isinstance(mesh, str) or not isinstance(service, str):
        raise TypeError("a service key is two strings")
    return ServiceKey(mesh, service)


def _decode(document: dict[str, Any]) -> StoreChanges:
    delta = None
    raw = document.get("delta")
    if raw is not None:
        delta = TableDelta(
            added=[
                Allocation(_key(m, s), int(o), tuple(str(z) for z in zones), int(c))
                for m, s, o, zones, c in raw["added"]
            ],
            removed=[Allocation(_key(m, s), int(o)) for m, s, o in raw["removed"]],
            holds_added=[Hold(_key(m, s), int(o), float(u)) for m, s, o, u in raw["holds_added"]],
            holds_dropped=[
                Hold(_key(m, s), int(o), float(u)) for m, s, o, u in raw["holds_dropped"]
            ],
            exhausted=[_key(m, s) for m, s in raw.get("exhausted", ())],
        )
    version = document.get("table_version")
    return StoreChanges(
        puts=tuple(parse_stored(text) for text in document.get("puts", ())),
        deletes=tuple(
            ResourceKey(str(t), str(m), str(n)) for t, m, n in document.get("deletes", ())
        ),
        delta=delta,
        table_version=None if version is None else int(version),
        vip_range=document.get("vip_range"),
        reset_table=bool(document.get("reset_table", False)),
        table_id=document.get("table_id"),
        zones_put=tuple(
            ZoneRecord(str(n), set(), last_contact=float(c), acked=int(a))
            for n, c, a in document.get("zones_put", ())
        ),
        zones_deleted=tuple(str(n) for n in document.get("zones_deleted", ())),
        zone_services_added=tuple(
            (str(z), _key(m, s)) for z, m, s in document.get("zone_services_added", ())
        ),
        zone_services_removed=tuple(
            (str(z), _key(m, s)) for z, m, s in document.get("zone_services_removed", ())
        ),
    )
