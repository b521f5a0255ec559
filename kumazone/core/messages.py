"""The zone <-> global sync messages: a pure codec, no Twisted.

A frame is a 4-octet big-endian length followed by that many octets of UTF-8
JSON: one object with C{"v"} (the protocol version, L{PROTOCOL_VERSION}) and
C{"t"} (the message's kind), then the message's own fields.  Frames are at most
L{MAX_FRAME} octets; a large inventory or table goes as several C{part}
messages, the last one marked C{last}, so 100,000 services never make a frame
too large for either side.

Keys and rows go as columns (version 3): one list per field, a mesh as an index
into the message's C{"meshes"}, a row's zones as an index into its C{"sets"}
(each a list of indexes into its C{"zones"}).  A part of 2,000 rows is then a
few lists that C{json} reads at C speed and that are checked whole (types, min
and max) rather than item by item; every index is checked against its list, so
bad input is a L{ProtocolError}, and a part's work is bounded by its size.

Zone to global: L{Hello} (first), L{Inventory}, L{Ack}.  Global to zone:
L{Welcome}, L{TableUpdate}.  Both ways: L{Ping}, L{Error}.  Dataplane to zone (on
the dataplane port): L{DpHello} (first), L{DpAck}; zone to dataplane: L{DpWelcome},
L{DpTable}.  Each class's
docstring gives its JSON object; L{encode} and L{decode} turn one into the
other.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Self

__all__ = [
    "CHUNK_ITEMS",
    "FORM_DOTTED",
    "FORM_UNDERSCORE",
    "KINDS",
    "MAX_FRAME",
    "MAX_NUMBER",
    "PROTOCOL_VERSION",
    "Ack",
    "DpAck",
    "DpHello",
    "DpRow",
    "DpTable",
    "DpWelcome",
    "Error",
    "FrameDecoder",
    "Hello",
    "Inventory",
    "Message",
    "Ping",
    "ProtocolError",
    "Row",
    "TableUpdate",
    "Welcome",
    "decode",
    "dp_table_messages",
    "encode",
    "inventory_messages",
    "table_messages",
]

#: 2: table rows carry their claim order (L{Row.claim}).  3: keys and rows go as
#: columns (see above).  Peers of another version are refused, with a clear error.
PROTOCOL_VERSION = 3
MAX_FRAME = 1 << 20
#: The largest number a message may carry (a store's signed 64-bit integer).
MAX_NUMBER = (1 << 63) - 1
#: Items per part message: 2,000 rows of ~60 octets stay far below MAX_FRAME.
CHUNK_ITEMS = 2000
_LENGTH = struct.Struct("!I")

Key = tuple[str, str]
_Document = dict[str, Any]


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol; the peer is dropped."""


# -- reading fields ---------------------------------------------------------------


def _string(document: _Document, name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"{name}: must be a string")
    return value


def _is_number(value: object) -> bool:
    """Whether C{value} is an integer in [0, L{MAX_NUMBER}] (booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMBER


def _int(document: _Document, name: str) -> int:
    value = document.get(name)
    if not _is_number(value):
        raise ProtocolError(f"{name}: must be an integer in [0, {MAX_NUMBER}]")
    assert isinstance(value, int)
    return value


def _bool(document: _Document, name: str) -> bool:
    value = document.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"{name}: must be true or false")
    return value


# Columns are checked whole, at C speed where it can be (a set of the items' types,
# min and max): a part of 2,000 rows costs a few hundred microseconds to check.


def _texts(value: object, name: str, empty: bool = False) -> list[str]:
    """A list of strings (non-empty unless C{empty})."""
    if type(value) is not list or not set(map(type, value)) <= {str}:
        raise ProtocolError(f"{name}: must be a list of strings")
    if not empty and "" in value:
        raise ProtocolError(f"{name}: strings must not be empty")
    return value


def _numbers(value: object, name: str, limit: int = MAX_NUMBER) -> list[int]:
    """A list of integers in [0, C{limit}] (booleans are not integers here)."""
    if type(value) is not list or not set(map(type, value)) <= {int}:
        raise ProtocolError(f"{name}: must be a list of integers")
    if value and (min(value) < 0 or max(value) > limit):
        raise ProtocolError(f"{name}: integers must be in [0, {limit}]")
    return value


def _indexes(value: object, name: str, of: Sequence[Any]) -> list[Any]:
    """A list of indexes into C{of}, as the items of C{of} they name."""
    numbers = _numbers(value, name, len(of) - 1)
    return list(map(of.__getitem__, numbers))


def _columns(document: _Document, name: str, columns: tuple[str, ...]) -> dict[str, Any] | None:
    """The object of columns C{name} (None if absent), each column a list, all as long."""
    value = document.get(name)
    if value is None:
        return None
    if type(value) is not dict:
        raise ProtocolError(f"{name}: must be an object of columns {', '.join(columns)}")
    lengths = set()
    for column in columns:
        items = value.get(column)
        if type(items) is not list:
            raise ProtocolError(f"{name}.{column}: must be a list")
        lengths.add(len(items))
    if len(lengths) > 1:
        raise ProtocolError(f"{name}: columns {', '.join(columns)} must be as long")
    return value


def _keys(document: _Document, name: str, meshes: list[str]) -> tuple[Key, ...]:
    """C{{"mesh": [mesh index...], "service": [service...]}} as (mesh, service) pairs."""
    value = _columns(document, name, ("mesh", "service"))
    if value is None:
        return ()
    mesh = _indexes(value["mesh"], f"{name}.mesh", meshes)
    return tuple(zip(mesh, _texts(value["service"], f"{name}.service"), strict=True))


def _meshes(document: _Document) -> list[str]:
    return _texts(document.get("meshes", []), "meshes")


def _zone_sets(document: _Document) -> list[tuple[str, ...]]:
    """C{"sets"}: each a list of indexes into C{"zones"}, as tuples of zone names."""
    zones = _texts(document.get("zones", []), "zones", empty=True)
    sets = document.get("sets", [])
    if type(sets) is not list:
        raise ProtocolError("sets: must be a list")
    return [tuple(_indexes(item, "sets[]", zones)) for item in sets]


_ROW_COLUMNS = ("mesh", "service", "offset", "in", "claim")


def _rows(document: _Document, meshes: list[str]) -> tuple[Row, ...]:
    value = _columns(document, "upsert", _ROW_COLUMNS)
    if value is None:
        return ()
    sets = _zone_sets(document)
    # Claims are table versions, shared by many rows: one int object each (a
    # zone holds a million rows; each int decoded apart is 32 octets of its own).
    claims: dict[int, int] = {}
    claim = [claims.setdefault(c, c) for c in _numbers(value["claim"], "upsert.claim")]
    return tuple(
        map(
            Row,
            _indexes(value["mesh"], "upsert.mesh", meshes),
            _texts(value["service"], "upsert.service"),
            _numbers(value["offset"], "upsert.offset"),
            _indexes(value["in"], "upsert.in", sets),
            claim,
        )
    )


# -- writing fields ---------------------------------------------------------------


def _key_columns(keys: Sequence[Key], meshes: dict[str, int]) -> dict[str, list[Any]]:
    """Keys as columns, each mesh an index into the message's C{meshes} (added as met)."""
    return {
        "mesh": [meshes.setdefault(mesh, len(meshes)) for mesh, _service in keys],
        "service": [service for _mesh, service in keys],
    }


def _row_columns(
    rows: Sequence[Row], meshes: dict[str, int], zones: dict[str, int]
) -> tuple[dict[str, list[Any]], list[list[int]]]:
    """Rows as columns, and the message's zone sets (each zone an index into C{zones})."""
    sets: dict[tuple[str, ...], int] = {}
    columns: dict[str, list[Any]] = {
        "mesh": [meshes.setdefault(row.mesh, len(meshes)) for row in rows],
        "service": [row.service for row in rows],
        "offset": [row.offset for row in rows],
        "in": [sets.setdefault(row.zones, len(sets)) for row in rows],
        "claim": [row.claim for row in rows],
    }
    return columns, [[zones.setdefault(zone, len(zones)) for zone in names] for names in sets]


# -- the messages -----------------------------------------------------------------
#
# Each message class has its wire kind ("t"), _fields (its JSON fields, in the
# order they are written) and _parse (the message from a decoded JSON object).


class Row(NamedTuple):
    """One VIP table row as sent: (mesh, service) at an offset, in some zones.

    On the wire, inside a L{TableUpdate}: one item of each of its C{upsert}
    columns.  A named tuple: a full table decodes 100,000 of them.

    @ivar claim: the table version at which the row was first allocated; of the
        services that map to one DNS name, the one with the lowest claim (then
        mesh and service) holds it (L{kumazone.core.names.assign_names}).
    """

    mesh: str
    service: str
    offset: int
    zones: tuple[str, ...] = ()
    claim: int = 0


@dataclass(frozen=True)
class Hello:
    """A zone says who it is, which table it holds and which VIP ranges it uses.

    Zone to global, first on each connection; the global refuses a zone whose
    name, certificate or ranges do not fit.  On the wire::

        {"v": 3, "t": "hello", "zone": "zone-1", "have": 41, "table": "<table id>",
         "cidr": "240.0.0.0/4", "cidr6": "fd00:fd00::/64"}

    @ivar zone: the zone's name.
    @ivar have: the version of the table the zone holds (0: none).
    @ivar table_id: the id of the global's table it holds (C{"table"}; C{""}: none).
    @ivar cidr: the zone's IPv4 VIP range.
    @ivar cidr6: the zone's IPv6 VIP range.
    """

    kind: ClassVar[str] = "hello"
    zone: str
    have: int = 0
    table_id: str = ""
    cidr: str = ""
    cidr6: str = ""

    def _fields(self) -> _Document:
        return {
            "zone": self.zone,
            "have": self.have,
            "table": self.table_id,
            "cidr": self.cidr,
            "cidr6": self.cidr6,
        }

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(
            _string(document, "zone"),
            _int(document, "have"),
            _string(document, "table"),
            _string(document, "cidr"),
            _string(document, "cidr6"),
        )


@dataclass(frozen=True)
class Inventory:
    """A zone's services: all of them (C{full}) or what changed, in parts.

    Zone to global, a full one after L{Hello}, then changes.  On the wire::

        {"v": 3, "t": "inventory", "full": true, "part": 0, "last": true,
         "meshes": [mesh...],
         "add": {"mesh": [mesh index...], "service": [service...]},
         "remove": {"mesh": [mesh index...], "service": [service...]}}

    @ivar full: whether C{add} (over all parts) is the zone's whole inventory.
    @ivar part: this part's index, from 0.
    @ivar last: whether this is the last part.
    """

    kind: ClassVar[str] = "inventory"
    full: bool
    part: int = 0
    last: bool = True
    add: tuple[Key, ...] = ()
    remove: tuple[Key, ...] = ()

    def _fields(self) -> _Document:
        meshes: dict[str, int] = {}
        add, remove = _key_columns(self.add, meshes), _key_columns(self.remove, meshes)
        return {
            "full": self.full,
            "part": self.part,
            "last": self.last,
            "meshes": list(meshes),
            "add": add,
            "remove": remove,
        }

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        meshes = _meshes(document)
        return cls(
            _bool(document, "full"),
            _int(document, "part"),
            _bool(document, "last"),
            _keys(document, "add", meshes),
            _keys(document, "remove", meshes),
        )


@dataclass(frozen=True)
class Ack:
    """A zone holds table version C{version} (sent once a table's last part applied).

    Zone to global.  On the wire::

        {"v": 3, "t": "ack", "version": 42}
    """

    kind: ClassVar[str] = "ack"
    version: int

    def _fields(self) -> _Document:
        return {"version": self.version}

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(_int(document, "version"))


@dataclass(frozen=True)
class Ping:
    """A heartbeat: the sender is still there.

    Both ways, every few seconds.  On the wire::

        {"v": 3, "t": "ping"}
    """

    kind: ClassVar[str] = "ping"

    def _fields(self) -> _Document:
        return {}

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls()


@dataclass(frozen=True)
class Welcome:
    """The global accepts a zone: its table's version and id.

    Global to zone, once, in answer to L{Hello}.  On the wire::

        {"v": 3, "t": "welcome", "version": 42, "table": "<table id>"}

    @ivar table_id: the id of the global's table (C{"table"} on the wire).
    """

    kind: ClassVar[str] = "welcome"
    version: int
    table_id: str = ""

    def _fields(self) -> _Document:
        return {"version": self.version, "table": self.table_id}

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(_int(document, "version"), _string(document, "table"))


@dataclass(frozen=True)
class TableUpdate:
    """The VIP table at C{version}: whole (C{full}) or the changes from C{base}, in parts.

    Global to zone, after L{Welcome} and on every change.  On the wire::

        {"v": 3, "t": "table", "version": 42, "base": 41, "full": false,
         "part": 0, "last": true,
         "meshes": [mesh...], "zones": [zone...], "sets": [[zone index...]...],
         "upsert": {"mesh": [mesh index...], "service": [service...],
                    "offset": [offset...], "in": [set index...], "claim": [claim...]},
         "remove": {"mesh": [mesh index...], "service": [service...]}}

    @ivar base: the version the changes apply to (0 for a full table).
    @ivar part: this part's index, from 0.
    @ivar last: whether this is the last part.
    @ivar upsert: rows added or changed (L{Row}).
    """

    kind: ClassVar[str] = "table"
    version: int
    base: int
    full: bool
    part: int = 0
    last: bool = True
    upsert: tuple[Row, ...] = field(default=())
    remove: tuple[Key, ...] = ()

    def _fields(self) -> _Document:
        meshes: dict[str, int] = {}
        zones: dict[str, int] = {}
        upsert, sets = _row_columns(self.upsert, meshes, zones)
        remove = _key_columns(self.remove, meshes)
        return {
            "version": self.version,
            "base": self.base,
            "full": self.full,
            "part": self.part,
            "last": self.last,
            "meshes": list(meshes),
            "zones": list(zones),
            "sets": sets,
            "upsert": upsert,
            "remove": remove,
        }

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        meshes = _meshes(document)
        return cls(
            _int(document, "version"),
            _int(document, "base"),
            _bool(document, "full"),
            _int(document, "part"),
            _bool(document, "last"),
            _rows(document, meshes),
            _keys(document, "remove", meshes),
        )


@dataclass(frozen=True)
class Error:
    """Why the sender closes the connection (or, from the global, refuses a zone).

    Both ways, just before closing.  On the wire::

        {"v": 3, "t": "error", "message": "VIP ranges differ: ..."}
    """

    kind: ClassVar[str] = "error"
    message: str

    def _fields(self) -> _Document:
        return {"message": self.message}

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(_string(document, "message"))


#: The name forms of a L{DpRow}: which of a service's two DNS names it holds.
FORM_UNDERSCORE = 1
FORM_DOTTED = 2


class DpRow(NamedTuple):
    """One service of a mesh as a dataplane serves it.

    On the wire, inside a L{DpTable}: one item of each of its C{upsert} columns.

    @ivar offset: the VIP's offset in the zone's ranges (the welcome's C{cidr}
        and C{cidr6}): one number gives both addresses.
    @ivar forms: the DNS names the zone serves for it, as bits
        (L{FORM_UNDERSCORE}: C{<service>.<domain>}; L{FORM_DOTTED}: the form with
        every C{_} a dot), so a row costs a few octets whatever its names
        (L{kumazone.core.names.names_from_forms} spells them out).
    @ivar provisional: not yet confirmed by the global (served with a short TTL).
    """

    service: str
    offset: int
    forms: int = FORM_UNDERSCORE
    provisional: bool = False


@dataclass(frozen=True)
class DpHello:
    """A dataplane says which table it holds.

    Dataplane to zone, first on each connection.  With TLS the zone takes the
    mesh and name from the dataplane's certificate, and refuses a hello that
    names others; without, from here.  On the wire::

        {"v": 3, "t": "dphello", "mesh": "default", "name": "web-1",
         "have": 41, "table": "<table id>"}

    @ivar have: the version of the table the dataplane holds (0: none).
    @ivar table_id: the id of the zone's table it holds (C{"table"}; C{""}: none).
    """

    kind: ClassVar[str] = "dphello"
    mesh: str = ""
    name: str = ""
    have: int = 0
    table_id: str = ""

    def _fields(self) -> _Document:
        return {"mesh": self.mesh, "name": self.name, "have": self.have, "table": self.table_id}

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(
            _string(document, "mesh"),
            _string(document, "name"),
            _int(document, "have"),
            _string(document, "table"),
        )


#: The largest TTL a welcome may carry (RFC 2181 8).
MAX_TTL = (1 << 31) - 1


@dataclass(frozen=True)
class DpWelcome:
    """The zone accepts a dataplane: who it is, and how the zone serves its names.

    Zone to dataplane, once, in answer to L{DpHello}; the dataplane answers as
    the zone does from these.  On the wire::

        {"v": 3, "t": "dpwelcome", "mesh": "default", "name": "web-1",
         "version": 42, "table": "<table id>", "domain": "mesh",
         "cidr": "240.0.0.0/4", "cidr6": "fd00:fd00::/64", "ttl": 60,
         "ns": ["192.0.2.1"]}

    @ivar nameservers: the addresses of the apex NS name (C{"ns"}).
    """

    kind: ClassVar[str] = "dpwelcome"
    mesh: str
    name: str
    version: int
    table_id: str
    domain: str
    cidr: str
    cidr6: str
    ttl: int
    nameservers: tuple[str, ...] = ()

    def _fields(self) -> _Document:
        return {
            "mesh": self.mesh,
            "name": self.name,
            "version": self.version,
            "table": self.table_id,
            "domain": self.domain,
            "cidr": self.cidr,
            "cidr6": self.cidr6,
            "ttl": self.ttl,
            "ns": list(self.nameservers),
        }

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        ttl = _int(document, "ttl")
        if ttl > MAX_TTL:
            raise ProtocolError(f"ttl: must be at most {MAX_TTL}")
        return cls(
            _string(document, "mesh"),
            _string(document, "name"),
            _int(document, "version"),
            _string(document, "table"),
            _string(document, "domain"),
            _string(document, "cidr"),
            _string(document, "cidr6"),
            ttl,
            tuple(_texts(document.get("ns", []), "ns")),
        )


_DP_ROW_COLUMNS = ("service", "offset", "forms", "prov")


@dataclass(frozen=True)
class DpTable:
    """A mesh's names at C{version}: whole (C{full}) or the changes from C{base}, in parts.

    Zone to dataplane, after L{DpWelcome} and on every change of the zone's
    table; a change in another mesh comes as a part with no rows (the serial
    moved).  On the wire::

        {"v": 3, "t": "dptable", "version": 42, "base": 41, "full": false,
         "part": 0, "last": true,
         "upsert": {"service": [service...], "offset": [offset...],
                    "forms": [forms...], "prov": [0 or 1...]},
         "remove": [service...]}

    It goes to thousands of dataplanes at each change, so what is at its default
    is left out: C{full} (false), C{part} (0), C{last} (true), C{remove} (empty),
    C{prov} (all 0) and C{forms} (all 1); a one-service change is then about 120
    octets.

    @ivar upsert: rows added or changed (L{DpRow}).
    @ivar remove: the services gone.
    """

    kind: ClassVar[str] = "dptable"
    version: int
    base: int
    full: bool
    part: int = 0
    last: bool = True
    upsert: tuple[DpRow, ...] = ()
    remove: tuple[str, ...] = ()

    def _fields(self) -> _Document:
        rows = self.upsert
        document: _Document = {"version": self.version, "base": self.base}
        if self.full:
            document["full"] = True
        if self.part:
            document["part"] = self.part
        if not self.last:
            document["last"] = False
        if rows:
            upsert: _Document = {
                "service": [row.service for row in rows],
                "offset": [row.offset for row in rows],
            }
            if any(row.forms != FORM_UNDERSCORE for row in rows):
                upsert["forms"] = [row.forms for row in rows]
            if any(row.provisional for row in rows):
                upsert["prov"] = [int(row.provisional) for row in rows]
            document["upsert"] = upsert
        if self.remove:
            document["remove"] = list(self.remove)
        return document

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        rows: tuple[DpRow, ...] = ()
        value = document.get("upsert")
        if value is not None:
            if type(value) is not dict:
                raise ProtocolError("upsert: must be an object of columns")
            service = value.get("service")
            count = len(service) if type(service) is list else 0  # else refused below
            defaults = {"forms": [FORM_UNDERSCORE] * count, "prov": [0] * count}
            value = _columns({"upsert": {**defaults, **value}}, "upsert", _DP_ROW_COLUMNS)
            assert value is not None
            rows = tuple(
                map(
                    DpRow,
                    _texts(value["service"], "upsert.service"),
                    _numbers(value["offset"], "upsert.offset"),
                    _numbers(value["forms"], "upsert.forms", FORM_UNDERSCORE | FORM_DOTTED),
                    map(bool, _numbers(value["prov"], "upsert.prov", 1)),
                )
            )
        return cls(
            _int(document, "version"),
            _int(document, "base"),
            _bool({"full": False, **document}, "full"),
            _int({"part": 0, **document}, "part"),
            _bool({"last": True, **document}, "last"),
            rows,
            tuple(_texts(document.get("remove", []), "remove")),
        )


@dataclass(frozen=True)
class DpAck:
    """A dataplane holds table version C{version} (sent once a table's last part applied).

    Dataplane to zone.  On the wire::

        {"v": 3, "t": "dpack", "version": 42}
    """

    kind: ClassVar[str] = "dpack"
    version: int

    def _fields(self) -> _Document:
        return {"version": self.version}

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(_int(document, "version"))


Message = (
    Hello
    | Inventory
    | Ack
    | Ping
    | Welcome
    | TableUpdate
    | Error
    | DpHello
    | DpWelcome
    | DpTable
    | DpAck
)

#: Each kind's message class, by its wire kind (C{"t"}).
KINDS: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        Hello,
        Inventory,
        Ack,
        Ping,
        Welcome,
        TableUpdate,
        Error,
        DpHello,
        DpWelcome,
        DpTable,
        DpAck,
    )
}


# -- frames -----------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    """The one JSON encoding of frames and of the part-size count: compact, ASCII only."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode(message: Message) -> bytes:
    """One frame: length prefix and JSON body."""
    document = {"v": PROTOCOL_VERSION, "t": message.kind, **message._fields()}
    data = _dumps(document)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} octets exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


def decode(data: bytes) -> Message:
    """One frame's body to a message; raises L{ProtocolError} on anything wrong."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("not JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise ProtocolError("message must be an object")
    kind = document.get("t")
    version = document.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        if kind == Error.kind and isinstance(document.get("message"), str):
            # A peer of another version says why it refuses: readable at any version.
            return Error._parse(document)
        raise ProtocolError(
            f"the peer speaks sync protocol version {str(version)[:20]}, this kumazone "
            f"speaks version {PROTOCOL_VERSION}: run the same kumazone release on both sides"
        )
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    return cls._parse(document)


class FrameDecoder:
    """Turns a byte stream into messages; a bad frame raises L{ProtocolError}."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Message]:
        """Every complete message in the stream so far."""
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} octets exceeds {self.max_frame}")
            if len(self._buffer) < _LENGTH.size + length:
                return
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            yield decode(body)


#: What one part's items may take on the wire, leaving room for the envelope.
PART_BUDGET = MAX_FRAME // 2 - 4096
#: What a number (or an index) and its comma take at most: 19 digits and a comma.
_NUMBER = 20
#: A character that compact ASCII JSON writes as more than itself.
_ESCAPED = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def _texts_size(texts: Iterable[str]) -> int:
    """What C{texts} take in a JSON list, exactly (C speed unless one needs escapes)."""
    texts = list(texts)
    joined = "".join(texts)
    if _ESCAPED.search(joined) is None:
        return len(joined) + 3 * len(texts)
    return sum(len(_dumps(text)) + 1 for text in texts)


def _keys_size(keys: Sequence[Key]) -> int:
    """At most what C{keys} take in a message: their services and meshes, an index each."""
    return (
        _texts_size(service for _mesh, service in keys)
        + _texts_size({mesh for mesh, _service in keys})
        + _NUMBER * len(keys)
    )


def _rows_size(rows: Sequence[Row]) -> int:
    """At most what C{rows} take in a message: columns, meshes, zones and zone sets."""
    sets = {row.zones for row in rows}
    return (
        _texts_size(row.service for row in rows)
        + _texts_size({row.mesh for row in rows})
        + _texts_size({zone for names in sets for zone in names})
        + sum(_NUMBER * len(names) + 3 for names in sets)
        + 4 * _NUMBER * len(rows)
    )


def _chunks(
    items: Sequence[Any],
    cap: int,
    size_of: Callable[[Sequence[Any]], int],
    budget: int = PART_BUDGET,
) -> list[Sequence[Any]]:
    """Consecutive runs of C{items}, each at most C{cap} items and C{budget} octets.

    C{size_of(run)} bounds what a run takes (and grows with the run): a run of
    C{cap} items is measured at once, and only one over the budget is cut, to
    the longest run that fits (found by bisection).
    """
    chunks: list[Sequence[Any]] = []
    start = 0
    while start < len(items):
        end = min(len(items), start + cap)
        if size_of(items[start:end]) > budget:
            if size_of(items[start : start + 1]) > budget:
                raise ProtocolError(
                    f"one item takes {size_of(items[start : start + 1])} octets, "
                    "more than a part may"
                )
            low, high = start + 1, end - 1  # the run to low fits, the run to end does not
            while low < high:
                middle = (low + high + 1) // 2
                if size_of(items[start:middle]) <= budget:
                    low = middle
                else:
                    high = middle - 1
            end = low
        chunks.append(items[start:end])
        start = end
    if not chunks:
        chunks.append(items[:0])
    return chunks


def _paired(
    first: Sequence[Any],
    second: Sequence[Any],
    cap: int,
    first_size: Callable[[Sequence[Any]], int],
    second_size: Callable[[Sequence[Any]], int] = _keys_size,
) -> list[tuple[int, bool, tuple[Any, ...], tuple[Any, ...]]]:
    """(part, last, items of C{first}, items of C{second}) for each part message."""
    first_chunks = _chunks(first, cap, first_size)
    second_chunks = _chunks(second, cap, second_size)
    count = max(len(first_chunks), len(second_chunks))
    return [
        (
            index,
            index == count - 1,
            tuple(first_chunks[index]) if index < len(first_chunks) else (),
            tuple(second_chunks[index]) if index < len(second_chunks) else (),
        )
        for index in range(count)
    ]


def inventory_messages(
    add: Iterable[Key], remove: Iterable[Key] = (), full: bool = True, size: int = CHUNK_ITEMS
) -> list[Inventory]:
    """A full inventory (or a change) as part messages, each well below MAX_FRAME."""
    return [
        Inventory(full, part, last, adds, removes)
        for part, last, adds, removes in _paired(sorted(add), sorted(remove), size, _keys_size)
    ]


def table_messages(
    version: int,
    base: int,
    full: bool,
    upsert: Sequence[Row],
    remove: Sequence[Key] = (),
    size: int = CHUNK_ITEMS,
) -> list[TableUpdate]:
    """A table (whole, or the changes from C{base}) as part messages, each below MAX_FRAME."""
    return [
        TableUpdate(version, base, full, part, last, rows, removes)
        for part, last, rows, removes in _paired(upsert, list(remove), size, _rows_size)
    ]


def _dp_rows_size(rows: Sequence[DpRow]) -> int:
    """At most what C{rows} take in a L{DpTable}: their services and three numbers each."""
    return _texts_size(row.service for row in rows) + 3 * _NUMBER * len(rows)


def dp_table_messages(
    version: int,
    base: int,
    full: bool,
    upsert: Sequence[DpRow],
    remove: Sequence[str] = (),
    size: int = CHUNK_ITEMS,
) -> list[DpTable]:
    """A mesh's table (whole, or the changes from C{base}) as parts, each below MAX_FRAME."""
    return [
        DpTable(version, base, full, part, last, rows, removes)
        for part, last, rows, removes in _paired(
            upsert, list(remove), size, _dp_rows_size, _texts_size
        )
    ]
