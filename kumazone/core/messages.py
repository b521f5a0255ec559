"""The zone <-> global sync messages: a pure codec, no Twisted.

A frame is a 4-octet big-endian length followed by that many octets of UTF-8
JSON: one object with ``"v"`` (the protocol version) and ``"t"`` (the message
type).  Frames are at most L{MAX_FRAME} octets; a large inventory or table goes
as several ``part`` messages, the last one marked ``last``, so 100,000 services
never make a frame too large for either side.

Zone to global::

    hello      {zone, have: table version held, table: id of the table held, cidr, cidr6}
    inventory  {full, part, last, add: [[mesh, service]...], remove: [...]}
    ack        {version}
    ping       {}

Global to zone::

    welcome    {version, table: id of the global's table}
    table      {version, base, full, part, last,
                upsert: [[mesh, service, offset, [zone...]]...], remove: [[mesh, service]...]}
    error      {message}
    ping       {}
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "CHUNK_ITEMS",
    "MAX_FRAME",
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

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
#: Items per part message: 2,000 rows of ~60 octets stay far below MAX_FRAME.
CHUNK_ITEMS = 2000
_LENGTH = struct.Struct("!I")

Key = tuple[str, str]


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol; the peer is dropped."""


@dataclass(frozen=True)
class Row:
    """One VIP table row as sent: (mesh, service) at an offset, in some zones."""

    mesh: str
    service: str
    offset: int
    zones: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hello:
    kind: ClassVar[str] = "hello"
    zone: str
    have: int = 0
    table_id: str = ""
    cidr: str = ""
    cidr6: str = ""


@dataclass(frozen=True)
class Inventory:
    kind: ClassVar[str] = "inventory"
    full: bool
    part: int = 0
    last: bool = True
    add: tuple[Key, ...] = ()
    remove: tuple[Key, ...] = ()


@dataclass(frozen=True)
class Ack:
    kind: ClassVar[str] = "ack"
    version: int


@dataclass(frozen=True)
class Ping:
    kind: ClassVar[str] = "ping"
    pass


@dataclass(frozen=True)
class Welcome:
    kind: ClassVar[str] = "welcome"
    version: int
    table_id: str = ""


@dataclass(frozen=True)
class TableUpdate:
    kind: ClassVar[str] = "table"
    version: int
    base: int
    full: bool
    part: int = 0
    last: bool = True
    upsert: tuple[Row, ...] = field(default=())
    remove: tuple[Key, ...] = ()


@dataclass(frozen=True)
class Error:
    kind: ClassVar[str] = "error"
    message: str


Message = Hello | Inventory | Ack | Ping | Welcome | TableUpdate | Error


def _body(message: Message) -> dict[str, Any]:
    if isinstance(message, Hello):
        return {
            "t": "hello",
            "zone": message.zone,
            "have": message.have,
            "table": message.table_id,
            "cidr": message.cidr,
            "cidr6": message.cidr6,
        }
    if isinstance(message, Inventory):
        return {
            "t": "inventory",
            "full": message.full,
            "part": message.part,
            "last": message.last,
            "add": [list(k) for k in message.add],
            "remove": [list(k) for k in message.remove],
        }
    if isinstance(message, Ack):
        return {"t": "ack", "version": message.version}
    if isinstance(message, Ping):
        return {"t": "ping"}
    if isinstance(message, Welcome):
        return {"t": "welcome", "version": message.version, "table": message.table_id}
    if isinstance(message, TableUpdate):
        return {
            "t": "table",
            "version": message.version,
            "base": message.base,
            "full": message.full,
            "part": message.part,
            "last": message.last,
            "upsert": [[r.mesh, r.service, r.offset, list(r.zones)] for r in message.upsert],
            "remove": [list(k) for k in message.remove],
        }
    return {"t": "error", "message": message.message}


def encode(message: Message) -> bytes:
    """One frame: length prefix and JSON body."""
    body = json.dumps({"v": PROTOCOL_VERSION, **_body(message)}, separators=(",", ":"))
    data = body.encode("utf-8")
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} octets exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


def _string(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"{name}: must be a string")
    return value


def _int(document: dict[str, Any], name: str) -> int:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{name}: must be a non-negative integer")
    return value


def _bool(document: dict[str, Any], name: str) -> bool:
    value = document.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"{name}: must be true or false")
    return value


def _keys(document: dict[str, Any], name: str) -> tuple[Key, ...]:
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


def _rows(document: dict[str, Any]) -> tuple[Row, ...]:
    value = document.get("upsert", [])
    if not isinstance(value, list):
        raise ProtocolError("upsert: must be a list")
    rows = []
    for item in value:
        if not (
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], str)
            and item[0]
            and isinstance(item[1], str)
            and item[1]
            and isinstance(item[2], int)
            and not isinstance(item[2], bool)
            and item[2] >= 0
            and isinstance(item[3], list)
            and all(isinstance(z, str) for z in item[3])
        ):
            raise ProtocolError("upsert: items must be [mesh, service, offset, [zone...]]")
        rows.append(Row(item[0], item[1], item[2], tuple(item[3])))
    return tuple(rows)


def decode(data: bytes) -> Message:
    """One frame's body to a message; raises L{ProtocolError} on anything wrong."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ProtocolError("message must be an object")
    version = document.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    kind = document.get("t")
    if kind == "hello":
        return Hello(
            _string(document, "zone"),
            _int(document, "have"),
            _string(document, "table"),
            _string(document, "cidr"),
            _string(document, "cidr6"),
        )
    if kind == "inventory":
        return Inventory(
            _bool(document, "full"),
            _int(document, "part"),
            _bool(document, "last"),
            _keys(document, "add"),
            _keys(document, "remove"),
        )
    if kind == "ack":
        return Ack(_int(document, "version"))
    if kind == "ping":
        return Ping()
    if kind == "welcome":
        return Welcome(_int(document, "version"), _string(document, "table"))
    if kind == "table":
        return TableUpdate(
            _int(document, "version"),
            _int(document, "base"),
            _bool(document, "full"),
            _int(document, "part"),
            _bool(document, "last"),
            _rows(document),
            _keys(document, "remove"),
        )
    if kind == "error":
        return Error(_string(document, "message"))
    raise ProtocolError(f"unknown message type {kind!r}")


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
    """An upper bound of an item's octets in a part's JSON (UTF-8)."""
    if isinstance(item, Row):
        item = [item.mesh, item.service, item.offset, list(item.zones)]
    return len(json.dumps(item, ensure_ascii=False).encode("utf-8")) + 1


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
