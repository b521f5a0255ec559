"""The zone <-> global sync messages: a pure codec, no Twisted.

A frame is a 4-octet big-endian length followed by that many octets of UTF-8
JSON: one object with C{"v"} (the protocol version, L{PROTOCOL_VERSION}) and
C{"t"} (the message's kind), then the message's own fields.  Frames are at most
L{MAX_FRAME} octets; a large inventory or table goes as several C{part}
messages, the last one marked C{last}, so 100,000 services never make a frame
too large for either side.

Zone to global: L{Hello} (first), L{Inventory}, L{Ack}.  Global to zone:
L{Welcome}, L{TableUpdate}.  Both ways: L{Ping}, L{Error}.  Each class's
docstring gives its JSON object; L{encode} and L{decode} turn one into the
other.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

__all__ = [
    "CHUNK_ITEMS",
    "KINDS",
    "MAX_FRAME",
    "MAX_NUMBER",
    "PROTOCOL_VERSION",
    "Ack",
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
    "encode",
    "inventory_messages",
    "table_messages",
]

#: 2: table rows carry their claim order (L{Row.claim}); version 1 peers are refused.
PROTOCOL_VERSION = 2
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


def _keys(document: _Document, name: str) -> tuple[Key, ...]:
    value = document.get(name, [])
    if not isinstance(value, list):
        raise ProtocolError(f"{name}: must be a list")
    keys = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(x, str) and x for x in item)
        ):
            raise ProtocolError(f"{name}: items must be [mesh, service]")
        keys.append((item[0], item[1]))
    return tuple(keys)


def _row(item: object) -> Row:
    """One C{[mesh, service, offset, [zone...], claim]} of an upsert list."""
    if not (
        isinstance(item, list)
        and len(item) == 5
        and isinstance(item[0], str)
        and item[0]
        and isinstance(item[1], str)
        and item[1]
        and _is_number(item[2])
        and isinstance(item[3], list)
        and all(isinstance(z, str) for z in item[3])
        and _is_number(item[4])
    ):
        raise ProtocolError("upsert: items must be [mesh, service, offset, [zone...], claim]")
    return Row(item[0], item[1], item[2], tuple(item[3]), item[4])


def _rows(document: _Document) -> tuple[Row, ...]:
    value = document.get("upsert", [])
    if not isinstance(value, list):
        raise ProtocolError("upsert: must be a list")
    return tuple(_row(item) for item in value)


# -- the messages -----------------------------------------------------------------
#
# Each message class has its wire kind ("t"), _fields (its JSON fields, in the
# order they are written) and _parse (the message from a decoded JSON object).


@dataclass(frozen=True)
class Row:
    """One VIP table row as sent: (mesh, service) at an offset, in some zones.

    On the wire, inside a L{TableUpdate}: C{[mesh, service, offset, [zone...], claim]}.

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

        {"v": 2, "t": "hello", "zone": "zone-1", "have": 41, "table": "<table id>",
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

        {"v": 2, "t": "inventory", "full": true, "part": 0, "last": true,
         "add": [[mesh, service]...], "remove": [[mesh, service]...]}

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
        return {
            "full": self.full,
            "part": self.part,
            "last": self.last,
            "add": [list(k) for k in self.add],
            "remove": [list(k) for k in self.remove],
        }

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(
            _bool(document, "full"),
            _int(document, "part"),
            _bool(document, "last"),
            _keys(document, "add"),
            _keys(document, "remove"),
        )


@dataclass(frozen=True)
class Ack:
    """A zone holds table version C{version} (sent once a table's last part applied).

    Zone to global.  On the wire::

        {"v": 2, "t": "ack", "version": 42}
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

        {"v": 2, "t": "ping"}
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

        {"v": 2, "t": "welcome", "version": 42, "table": "<table id>"}

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

        {"v": 2, "t": "table", "version": 42, "base": 41, "full": false,
         "part": 0, "last": true,
         "upsert": [[mesh, service, offset, [zone...], claim]...],
         "remove": [[mesh, service]...]}

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
        return {
            "version": self.version,
            "base": self.base,
            "full": self.full,
            "part": self.part,
            "last": self.last,
            "upsert": [_row_document(r) for r in self.upsert],
            "remove": [list(k) for k in self.remove],
        }

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(
            _int(document, "version"),
            _int(document, "base"),
            _bool(document, "full"),
            _int(document, "part"),
            _bool(document, "last"),
            _rows(document),
            _keys(document, "remove"),
        )


@dataclass(frozen=True)
class Error:
    """Why the sender closes the connection (or, from the global, refuses a zone).

    Both ways, just before closing.  On the wire::

        {"v": 2, "t": "error", "message": "VIP ranges differ: ..."}
    """

    kind: ClassVar[str] = "error"
    message: str

    def _fields(self) -> _Document:
        return {"message": self.message}

    @classmethod
    def _parse(cls, document: _Document) -> Self:
        return cls(_string(document, "message"))


Message = Hello | Inventory | Ack | Ping | Welcome | TableUpdate | Error

#: Each kind's message class, by its wire kind (C{"t"}).
KINDS: dict[str, type[Message]] = {
    cls.kind: cls for cls in (Hello, Inventory, Ack, Ping, Welcome, TableUpdate, Error)
}


# -- frames -----------------------------------------------------------------------


def _row_document(row: Row) -> list[Any]:
    return [row.mesh, row.service, row.offset, list(row.zones), row.claim]


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


def _item_size(item: Any) -> int:
    """An item's exact octets in a part's JSON, with its separating comma."""
    if isinstance(item, Row):
        item = _row_document(item)
    elif isinstance(item, tuple):
        item = list(item)
    return len(_dumps(item)) + 1


def _chunks(items: Sequence[Any], cap: int, budget: int = PART_BUDGET) -> list[Sequence[Any]]:
    """Consecutive runs of C{items}, each at most C{cap} items and C{budget} octets."""
    chunks: list[Sequence[Any]] = []
    start, used = 0, 0
    for index, item in enumerate(items):
        size = _item_size(item)
        if size > budget:
            raise ProtocolError(f"one item takes {size} octets, more than a part may")
        if index > start and (index - start >= cap or used + size > budget):
            chunks.append(items[start:index])
            start, used = index, 0
        used += size
    if start < len(items) or not chunks:
        chunks.append(items[start:])
    return chunks


def _paired(
    first: Sequence[Any], second: Sequence[Any], cap: int
) -> list[tuple[int, bool, tuple[Any, ...], tuple[Any, ...]]]:
    """(part, last, items of C{first}, items of C{second}) for each part message."""
    first_chunks, second_chunks = _chunks(first, cap), _chunks(second, cap)
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
        for part, last, adds, removes in _paired(sorted(add), sorted(remove), size)
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
        for part, last, rows, removes in _paired(list(upsert), list(remove), size)
    ]
