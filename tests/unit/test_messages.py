"""Tests for L{kumazone.core.messages}: the zone <-> global wire codec (pure, no Twisted)."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumazone.core.messages import (
    CHUNK_ITEMS,
    KINDS,
    MAX_FRAME,
    MAX_NUMBER,
    PROTOCOL_VERSION,
    Ack,
    DpAck,
    DpHello,
    DpRow,
    DpTable,
    DpWelcome,
    Error,
    FrameDecoder,
    Hello,
    Inventory,
    Message,
    Ping,
    ProtocolError,
    Row,
    TableUpdate,
    Welcome,
    decode,
    encode,
    inventory_messages,
    table_messages,
)

# -- strategies -------------------------------------------------------------------

#: Any text JSON can carry (lone surrogates included: json escapes them).
texts = st.text(max_size=40)
names = st.text(min_size=1, max_size=40)
offsets = st.integers(min_value=0, max_value=MAX_NUMBER)
versions = st.integers(min_value=0, max_value=MAX_NUMBER)
keys = st.tuples(names, names)
key_lists = st.lists(keys, max_size=8).map(tuple)
zone_lists = st.lists(texts, max_size=5).map(tuple)
rows = st.builds(Row, names, names, offsets, zone_lists, versions)

hellos = st.builds(Hello, texts, versions, texts, texts, texts)
inventories = st.builds(Inventory, st.booleans(), versions, st.booleans(), key_lists, key_lists)
acks = st.builds(Ack, versions)
pings = st.just(Ping())
welcomes = st.builds(Welcome, versions, texts)
tables = st.builds(
    TableUpdate,
    versions,
    versions,
    st.booleans(),
    versions,
    st.booleans(),
    st.lists(rows, max_size=8).map(tuple),
    key_lists,
)
errors = st.builds(Error, texts)
messages = st.one_of(hellos, inventories, acks, pings, welcomes, tables, errors)


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def raw(document: dict[str, Any]) -> bytes:
    """A frame body from a JSON document (version added unless given)."""
    return json.dumps({"v": PROTOCOL_VERSION, **document}).encode()


def decode_stream(data: bytes, splits: list[int] | None = None) -> list[Message]:
    decoder = FrameDecoder()
    out: list[Message] = []
    cuts = sorted(set(splits or []))
    start = 0
    for cut in [*cuts, len(data)]:
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    return out


# -- round trips ------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Hello("zone-1", 7, "abc", "240.0.0.0/4", "fd00:fd00::/64"),
        Hello("zone-1"),
        Inventory(True, 0, True, (("default", "redis"),), ()),
        Inventory(False, 3, False, (), (("m", "s"),)),
        Ack(12),
        Ping(),
        Welcome(42, "table-id"),
        TableUpdate(5, 4, False, 1, True, (Row("default", "redis", 9, ("zone-1", "zone-2")),), ()),
        TableUpdate(0, 0, True),
        Error("nope"),
    ],
)
def test_each_message_type_round_trips(message: Message) -> None:
    data = encode(message)
    (length,) = struct.unpack("!I", data[:4])
    assert length == len(data) - 4
    assert decode(data[4:]) == message
    document = json.loads(data[4:])
    assert document["v"] == PROTOCOL_VERSION


def test_frame_body_is_compact_utf8_json_with_type_names() -> None:
    types = {
        "hello": Hello("z"),
        "inventory": Inventory(True),
        "ack": Ack(1),
        "ping": Ping(),
        "welcome": Welcome(1),
        "table": TableUpdate(1, 0, True),
        "error": Error("x"),
    }
    for name, message in types.items():
        body = encode(message)[4:]
        assert json.loads(body.decode("utf-8"))["t"] == name
        assert b" " not in body


#: One message of each kind and its frame as protocol version 3 writes it.
PINNED: list[tuple[Message, bytes]] = [
    (
        Hello("zone-1", 7, "abc", "240.0.0.0/4", "fd00:fd00::/64"),
        b'\x00\x00\x00h{"v":3,"t":"hello","zone":"zone-1","have":7,"table":"abc",'
        b'"cidr":"240.0.0.0/4","cidr6":"fd00:fd00::/64"}',
    ),
    (
        Inventory(False, 3, False, (("default", "redis"),), (("m", "gone"),)),
        b'\x00\x00\x00\xa3{"v":3,"t":"inventory","full":false,"part":3,"last":false,'
        b'"meshes":["default","m"],"add":{"mesh":[0],"service":["redis"]},'
        b'"remove":{"mesh":[1],"service":["gone"]}}',
    ),
    (Ack(12), b'\x00\x00\x00\x1e{"v":3,"t":"ack","version":12}'),
    (Ping(), b'\x00\x00\x00\x12{"v":3,"t":"ping"}'),
    (
        Welcome(42, "table-id"),
        b'\x00\x00\x005{"v":3,"t":"welcome","version":42,"table":"table-id"}',
    ),
    (
        TableUpdate(
            5,
            4,
            False,
            1,
            True,
            (Row("default", "redis", 9, ("zone-1", "zone-2"), 3),),
            (("m", "gone"),),
        ),
        b'\x00\x00\x01\x03{"v":3,"t":"table","version":5,"base":4,"full":false,"part":1,'
        b'"last":true,"meshes":["default","m"],"zones":["zone-1","zone-2"],"sets":[[0,1]],'
        b'"upsert":{"mesh":[0],"service":["redis"],"offset":[9],"in":[0],"claim":[3]},'
        b'"remove":{"mesh":[1],"service":["gone"]}}',
    ),
    (Error("nope: \u00e9"), b'\x00\x00\x00,{"v":3,"t":"error","message":"nope: \\u00e9"}'),
    (
        DpHello("default", "web-1", 41, "t-1"),
        b'\x00\x00\x00M{"v":3,"t":"dphello","mesh":"default","name":"web-1","have":41,'
        b'"table":"t-1"}',
    ),
    (
        DpWelcome(
            "default",
            "web-1",
            42,
            "t-1",
            "mesh",
            "240.0.0.0/4",
            "fd00:fd00::/64",
            60,
            ("192.0.2.1",),
        ),
        b'\x00\x00\x00\xac{"v":3,"t":"dpwelcome","mesh":"default","name":"web-1","version":42,'
        b'"table":"t-1","domain":"mesh","cidr":"240.0.0.0/4","cidr6":"fd00:fd00::/64","ttl":60,'
        b'"ns":["192.0.2.1"]}',
    ),
    (
        DpTable(43, 42, False, 0, True, (DpRow("web", 7, 1), DpRow("a_b", 9, 3, True)), ("gone",)),
        b'\x00\x00\x00\x8b{"v":3,"t":"dptable","version":43,"base":42,'
        b'"upsert":{"service":["web","a_b"],"offset":[7,9],"forms":[1,3],"prov":[0,1]},'
        b'"remove":["gone"]}',
    ),
    (DpAck(43), b'\x00\x00\x00 {"v":3,"t":"dpack","version":43}'),
]


@pytest.mark.parametrize(("message", "wire"), PINNED, ids=[m.kind for m, _w in PINNED])
def test_each_kind_encodes_to_the_same_bytes_as_ever(message: Message, wire: bytes) -> None:
    assert encode(message) == wire
    assert decode(wire[4:]) == message


def test_every_kind_is_pinned() -> None:
    kinds = ["ack", "dpack", "dphello", "dptable", "dpwelcome", "error", "hello", "inventory"]
    kinds += ["ping", "table", "welcome"]
    assert sorted(m.kind for m, _w in PINNED) == sorted(KINDS) == kinds
    assert all(KINDS[m.kind] is type(m) for m, _w in PINNED)


@settings(max_examples=300)
@given(messages)
def test_any_message_round_trips(message: Message) -> None:
    assert decode(encode(message)[4:]) == message


@given(st.lists(rows, max_size=20).map(tuple), key_lists)
def test_table_rows_keep_names_offsets_and_zones(upsert, remove) -> None:
    message = TableUpdate(3, 2, False, 0, True, upsert, remove)
    decoded = decode(encode(message)[4:])
    assert isinstance(decoded, TableUpdate)
    assert [(r.mesh, r.service, r.offset, r.zones) for r in decoded.upsert] == [
        (r.mesh, r.service, r.offset, r.zones) for r in upsert
    ]
    assert decoded.remove == remove


# -- framing ----------------------------------------------------------------------


@settings(max_examples=100)
@given(st.lists(messages, max_size=8), st.data())
def test_decoder_gives_the_same_messages_whatever_the_splits(stream, data) -> None:
    wire = b"".join(encode(m) for m in stream)
    assert decode_stream(wire) == stream
    splits = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    assert decode_stream(wire, splits) == stream


@settings(max_examples=20)
@given(st.lists(messages, min_size=1, max_size=4))
def test_decoder_fed_one_octet_at_a_time(stream) -> None:
    wire = b"".join(encode(m) for m in stream)
    assert decode_stream(wire, list(range(len(wire)))) == stream


def test_decoder_waits_for_a_whole_frame() -> None:
    wire = encode(Welcome(1, "t"))
    decoder = FrameDecoder()
    assert list(decoder.feed(wire[:3])) == []
    assert list(decoder.feed(wire[3:-1])) == []
    assert list(decoder.feed(wire[-1:])) == [Welcome(1, "t")]
    assert list(decoder.feed(b"")) == []


def test_a_frame_of_exactly_max_frame_is_accepted() -> None:
    overhead = len(encode(Error(""))) - 4
    message = Error("x" * (MAX_FRAME - overhead))
    wire = encode(message)
    assert len(wire) - 4 == MAX_FRAME
    assert list(FrameDecoder().feed(wire)) == [message]


def test_encoding_a_message_over_max_frame_raises() -> None:
    overhead = len(encode(Error(""))) - 4
    with pytest.raises(ProtocolError):
        encode(Error("x" * (MAX_FRAME - overhead + 1)))


def test_a_frame_over_max_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder()
    # Only the header: the decoder must not wait for (or buffer) a megabyte first.
    with pytest.raises(ProtocolError):
        list(decoder.feed(struct.pack("!I", MAX_FRAME + 1)))
    with pytest.raises(ProtocolError):
        list(FrameDecoder().feed(b"\xff\xff\xff\xff"))


def test_a_smaller_max_frame_is_honoured() -> None:
    decoder = FrameDecoder(max_frame=16)
    with pytest.raises(ProtocolError):
        list(decoder.feed(encode(Error("more than sixteen octets"))))


def test_messages_before_a_bad_frame_are_still_delivered() -> None:
    decoder = FrameDecoder()
    received: list[Message] = []
    with pytest.raises(ProtocolError):
        for message in decoder.feed(encode(Ping()) + frame(b"{nope")):
            received.append(message)
    assert received == [Ping()]


# -- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b"",
        b"[1, 2]",
        b'"hello"',
        b"null",
    ],
)
def test_bad_json_raises(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(body)
    with pytest.raises(ProtocolError):
        list(FrameDecoder().feed(frame(body)))


@pytest.mark.parametrize("version", [None, 0, 1, 2, 4, "3", 2.5, 3.0, True, [3]])
def test_wrong_protocol_version_raises(version: object) -> None:
    document: dict[str, Any] = {"t": "ping"}
    if version is not None:
        document["v"] = version
    with pytest.raises(ProtocolError):
        decode(json.dumps(document).encode())


@pytest.mark.parametrize("kind", ["pong", "", None, 1, "Hello", "HELLO", ["hello"], {"t": 1}])
def test_unknown_type_raises(kind: object) -> None:
    document: dict[str, Any] = {} if kind is None else {"t": kind}
    with pytest.raises(ProtocolError):
        decode(raw(document))


GOOD: dict[str, dict[str, Any]] = {
    "hello": {"t": "hello", "zone": "z", "have": 0, "table": "", "cidr": "", "cidr6": ""},
    "inventory": {
        "t": "inventory",
        "full": True,
        "part": 0,
        "last": True,
        "meshes": ["m"],
        "add": {"mesh": [0], "service": ["s"]},
    },
    "ack": {"t": "ack", "version": 1},
    "welcome": {"t": "welcome", "version": 1, "table": "t"},
    "table": {
        "t": "table",
        "version": 2,
        "base": 1,
        "full": False,
        "part": 0,
        "last": True,
        "meshes": ["m"],
        "zones": ["zone-1"],
        "sets": [[0]],
        "upsert": {"mesh": [0], "service": ["s"], "offset": [3], "in": [0], "claim": [7]},
        "remove": {"mesh": [0], "service": ["gone"]},
    },
    "error": {"t": "error", "message": "m"},
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_the_good_documents_decode(kind: str) -> None:
    decode(raw(GOOD[kind]))


def _upsert(**columns: object) -> dict[str, object]:
    """GOOD's upsert columns with some replaced (a value of None drops the column)."""
    good: dict[str, object] = {
        "mesh": [0],
        "service": ["s"],
        "offset": [3],
        "in": [0],
        "claim": [7],
    }
    return {k: v for k, v in {**good, **columns}.items() if v is not None}


BAD_FIELDS: list[tuple[str, str, object]] = [
    ("hello", "zone", 5),
    ("hello", "zone", None),
    ("hello", "have", "1"),
    ("hello", "have", -1),
    ("hello", "have", True),
    ("hello", "have", 1.0),
    ("hello", "table", 0),
    ("hello", "cidr", ["240.0.0.0/4"]),
    ("hello", "cidr6", None),
    ("inventory", "full", "yes"),
    ("inventory", "full", 1),
    ("inventory", "part", -2),
    ("inventory", "last", None),
    ("inventory", "meshes", "m"),
    ("inventory", "meshes", [""]),
    ("inventory", "meshes", [1]),
    ("inventory", "meshes", []),  # the add's mesh index then names nothing
    ("inventory", "add", "m/s"),
    ("inventory", "add", [["m", "s"]]),
    ("inventory", "add", {"mesh": [0]}),
    ("inventory", "add", {"service": ["s"]}),
    ("inventory", "add", {"mesh": [0, 0], "service": ["s"]}),
    ("inventory", "add", {"mesh": [1], "service": ["s"]}),
    ("inventory", "add", {"mesh": [-1], "service": ["s"]}),
    ("inventory", "add", {"mesh": [True], "service": ["s"]}),
    ("inventory", "add", {"mesh": ["0"], "service": ["s"]}),
    ("inventory", "add", {"mesh": [0.0], "service": ["s"]}),
    ("inventory", "add", {"mesh": [0], "service": [""]}),
    ("inventory", "add", {"mesh": [0], "service": [1]}),
    ("inventory", "add", {"mesh": [0], "service": [["s"]]}),
    ("inventory", "add", {"mesh": 0, "service": "s"}),
    ("inventory", "remove", {"m": "s"}),
    ("inventory", "remove", [["m", "s"]]),
    ("ack", "version", "3"),
    ("ack", "version", None),
    ("ack", "version", False),
    ("welcome", "version", -1),
    ("welcome", "table", 7),
    ("table", "version", "2"),
    ("table", "base", None),
    ("table", "full", 0),
    ("table", "part", 0.5),
    ("table", "last", "true"),
    ("table", "meshes", {"m": 0}),
    ("table", "meshes", [""]),
    ("table", "zones", "zone-1"),
    ("table", "zones", [1]),
    ("table", "zones", []),  # the set's zone index then names nothing
    ("table", "sets", {"0": [0]}),
    ("table", "sets", [0]),
    ("table", "sets", [[1]]),
    ("table", "sets", [[-1]]),
    ("table", "sets", [[False]]),
    ("table", "sets", []),  # the row's set index then names nothing
    ("table", "upsert", [["m", "s", 3, ["zone-1"], 7]]),
    ("table", "upsert", "rows"),
    ("table", "upsert", _upsert(mesh=None)),
    ("table", "upsert", _upsert(service=None)),
    ("table", "upsert", _upsert(offset=None)),
    ("table", "upsert", _upsert(**{"in": None})),
    ("table", "upsert", _upsert(claim=None)),
    ("table", "upsert", _upsert(offset=[3, 4])),
    ("table", "upsert", _upsert(claim=[])),
    ("table", "upsert", _upsert(mesh=[1])),
    ("table", "upsert", _upsert(mesh=[None])),
    ("table", "upsert", _upsert(service=[""])),
    ("table", "upsert", _upsert(service=[None])),
    ("table", "upsert", _upsert(offset=["3"])),
    ("table", "upsert", _upsert(offset=[-3])),
    ("table", "upsert", _upsert(offset=[True])),
    ("table", "upsert", _upsert(offset=[3.0])),
    ("table", "upsert", _upsert(offset=[2**63])),
    ("table", "upsert", _upsert(offset=3)),
    ("table", "upsert", _upsert(**{"in": [1]})),
    ("table", "upsert", _upsert(**{"in": ["zone-1"]})),
    ("table", "upsert", _upsert(**{"in": [[0]]})),
    ("table", "upsert", _upsert(claim=[-1])),
    ("table", "upsert", _upsert(claim=[2**63])),
    ("table", "upsert", _upsert(claim=[None])),
    ("table", "remove", [["m", "gone"]]),
    ("table", "remove", {"mesh": [0], "service": [""]}),
    ("table", "remove", {"mesh": [5], "service": ["gone"]}),
    ("table", "remove", {"mesh": [0]}),
    ("ack", "version", 2**64),
    ("hello", "have", 2**63),
    ("inventory", "part", 2**63),
    ("error", "message", None),
    ("error", "message", {"text": "x"}),
]


@pytest.mark.parametrize(("kind", "name", "value"), BAD_FIELDS)
def test_wrong_field_types_raise(kind: str, name: str, value: object) -> None:
    document = {**GOOD[kind], name: value}
    with pytest.raises(ProtocolError):
        decode(raw(document))
    with pytest.raises(ProtocolError):
        list(FrameDecoder().feed(frame(raw(document))))


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("hello", "zone"),
        ("hello", "have"),
        ("inventory", "full"),
        ("inventory", "last"),
        ("ack", "version"),
        ("welcome", "version"),
        ("table", "version"),
        ("table", "base"),
        ("error", "message"),
    ],
)
def test_missing_required_fields_raise(kind: str, name: str) -> None:
    document = {k: v for k, v in GOOD[kind].items() if k != name}
    with pytest.raises(ProtocolError):
        decode(raw(document))


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


# -- part messages ----------------------------------------------------------------

MANY = 100_000


def many_keys(count: int = MANY) -> list[tuple[str, str]]:
    """Realistic Kuma service names, in several meshes."""
    return [
        (f"mesh-{i % 7}", f"service-{i:06d}_namespace-{i % 97}_svc_{8000 + i % 1000}")
        for i in range(count)
    ]


def check_parts(parts: list[Any]) -> None:
    assert [p.part for p in parts] == list(range(len(parts)))
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    for part in parts:
        data = encode(part)  # raises if over MAX_FRAME
        assert len(data) - 4 <= MAX_FRAME
        assert decode(data[4:]) == part


def test_inventory_of_100000_services_goes_in_parts() -> None:
    keys = many_keys()
    parts = inventory_messages(keys)
    assert len(parts) > 1
    check_parts(parts)
    assert all(p.full for p in parts)
    assert all(len(p.add) <= CHUNK_ITEMS for p in parts)
    collected = [k for p in parts for k in p.add]
    assert len(collected) == len(keys)
    assert set(collected) == set(keys)
    assert all(p.remove == () for p in parts)


def test_inventory_change_of_100000_adds_and_removes_goes_in_parts() -> None:
    keys = many_keys()
    add, remove = keys[: MANY // 2], [*keys[MANY // 2 :], ("other", "x")]
    parts = inventory_messages(add, remove, full=False)
    check_parts(parts)
    assert not any(p.full for p in parts)
    assert sorted(k for p in parts for k in p.add) == sorted(add)
    assert sorted(k for p in parts for k in p.remove) == sorted(remove)


def test_uneven_adds_and_removes_are_all_sent() -> None:
    add = [("m", f"a{i}") for i in range(5)]
    remove = [("m", f"r{i}") for i in range(1)]
    parts = inventory_messages(add, remove, full=False, size=2)
    check_parts(parts)
    assert len(parts) == 3
    assert sorted(k for p in parts for k in p.add) == sorted(add)
    assert [k for p in parts for k in p.remove] == remove


def test_table_of_100000_rows_goes_in_parts() -> None:
    keys = many_keys()
    zones = ("zone-1", "zone-2", "zone-eu-west-3")
    upsert = [Row(m, s, 268_435_000 - i, zones[: 1 + i % 3]) for i, (m, s) in enumerate(keys)]
    parts = table_messages(99, 0, True, upsert)
    assert len(parts) > 1
    check_parts(parts)
    assert all(p.version == 99 and p.base == 0 and p.full for p in parts)
    assert [r for p in parts for r in p.upsert] == upsert


def test_table_change_of_100000_rows_goes_in_parts() -> None:
    keys = many_keys()
    upsert = [Row(m, s, i, ("zone-1",)) for i, (m, s) in enumerate(keys[:30_000])]
    remove = keys[30_000:]
    parts = table_messages(12, 11, False, upsert, remove)
    check_parts(parts)
    assert all(p.version == 12 and p.base == 11 and not p.full for p in parts)
    assert [r for p in parts for r in p.upsert] == upsert
    assert [k for p in parts for k in p.remove] == remove


def test_parts_stay_below_max_frame_for_the_longest_names() -> None:
    # Resource names stop at 253 characters, mesh names at 63.
    keys = [(f"m{i % 3}".ljust(63, "m"), f"s{i:06d}".ljust(253, "s")) for i in range(10_000)]
    check_parts(inventory_messages(keys))
    check_parts(table_messages(1, 0, True, [Row(m, s, 2**28, ("zone-1",)) for m, s in keys]))


def test_table_parts_stay_below_max_frame_when_services_are_in_many_zones() -> None:
    # Services deployed in every zone of a 30-zone federation: each row lists 30 zones.
    zones = tuple(f"zone-{region}-{n:02d}" for region in ("eu-west", "us-east") for n in range(15))
    keys = many_keys(10_000)
    upsert = [Row(m, s, i, zones) for i, (m, s) in enumerate(keys)]
    parts = table_messages(1, 0, True, upsert)
    check_parts(parts)
    assert [r for p in parts for r in p.upsert] == upsert


def test_parts_stay_below_max_frame_for_long_service_tags() -> None:
    # A kuma.io/service tag value has no length limit in the resource validator, and
    # the design gives such a service a VIP (without a DNS name): its inventory and
    # table rows must still travel.
    keys = [("default", f"s{i:06d}".ljust(600, "s")) for i in range(4000)]
    check_parts(inventory_messages(keys))
    check_parts(
        table_messages(1, 0, True, [Row(m, s, i, ("zone-1",)) for i, (m, s) in enumerate(keys)])
    )


def test_empty_full_inventory_is_one_message() -> None:
    parts = inventory_messages([])
    assert parts == [Inventory(True, 0, True, (), ())]
    check_parts(parts)


def test_empty_full_table_is_one_message() -> None:
    parts = table_messages(7, 0, True, [])
    assert parts == [TableUpdate(7, 0, True, 0, True, (), ())]
    check_parts(parts)


def test_empty_change_is_one_message() -> None:
    assert inventory_messages([], [], full=False) == [Inventory(False, 0, True, (), ())]
    assert table_messages(8, 7, False, [], []) == [TableUpdate(8, 7, False, 0, True, (), ())]


@given(
    st.sets(keys, max_size=60),
    st.sets(keys, max_size=60),
    st.booleans(),
    st.integers(1, 7),
)
def test_inventory_parts_reassemble(add, remove, full, size) -> None:
    parts = inventory_messages(add, remove, full=full, size=size)
    check_parts(parts)
    assert all(p.full == full for p in parts)
    assert all(len(p.add) <= size and len(p.remove) <= size for p in parts)
    collected_add = [k for p in parts for k in p.add]
    collected_remove = [k for p in parts for k in p.remove]
    assert sorted(collected_add) == sorted(add) and len(collected_add) == len(add)
    assert sorted(collected_remove) == sorted(remove) and len(collected_remove) == len(remove)
    expected = max(1, -(-len(add) // size), -(-len(remove) // size))
    assert len(parts) == expected


@given(
    st.lists(rows, max_size=60),
    st.lists(keys, max_size=60),
    versions,
    versions,
    st.booleans(),
    st.integers(1, 7),
)
def test_table_parts_reassemble(upsert, remove, version, base, full, size) -> None:
    parts = table_messages(version, base, full, upsert, remove, size=size)
    check_parts(parts)
    assert all((p.version, p.base, p.full) == (version, base, full) for p in parts)
    assert [r for p in parts for r in p.upsert] == upsert
    assert [k for p in parts for k in p.remove] == remove


# -- exact sizes, hostile documents, other versions ---------------------------------


def test_non_ascii_names_are_sized_as_encoded_so_no_part_exceeds_a_frame() -> None:
    # 1,500 names of 300 'é': escaped to 6 octets each, 2.7 MB as one message.
    upsert = [Row("default", f"{i}-" + "é" * 300, i, ("zone-1",), i) for i in range(1500)]
    parts = table_messages(9, 0, True, upsert)
    assert len(parts) > 1
    for part in parts:
        assert len(encode(part)) <= MAX_FRAME
    assert [r for p in parts for r in p.upsert] == upsert


def test_largest_valid_names_fill_parts_without_exceeding_a_frame() -> None:
    service = "s" * 1024  # the longest service a resource may name
    adds = [("m" * 63, f"{i:05d}{service[5:]}") for i in range(3000)]
    for message in inventory_messages(adds, adds[:1500], full=False):
        assert len(encode(message)) <= MAX_FRAME


def test_json_nested_too_deeply_is_a_protocol_error() -> None:
    body = b'{"v":3,"t":"ping","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode(body)


def test_a_peer_of_another_version_is_told_why_and_its_error_is_readable() -> None:
    for version in (1, 2):  # a version 2 peer is refused as a version 1 peer is
        with pytest.raises(
            ProtocolError, match=rf"sync protocol version {version}.*speaks version 3"
        ):
            decode(raw({"v": version, "t": "hello", "zone": "z"}))
    # An older (or newer) peer's refusal still reads as what it says.
    assert decode(raw({"v": 1, "t": "error", "message": "go away"})) == Error("go away")


def test_numbers_beyond_a_stored_integer_are_refused() -> None:
    with pytest.raises(ProtocolError, match="must be an integer"):
        decode(raw({"t": "ack", "version": 2**64}))
    assert decode(raw({"t": "ack", "version": MAX_NUMBER})) == Ack(MAX_NUMBER)


# -- the columnar encoding (version 3) ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, as the keys and indexes that reach it."""
    places = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            places += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            places += _paths(v, (*prefix, i))
    return places


@settings(max_examples=300)
@given(st.sampled_from(["inventory", "table"]), st.data(), json_values)
def test_any_field_replaced_decodes_or_is_a_protocol_error(kind: str, data, value) -> None:
    document = json.loads(json.dumps(GOOD[kind]))
    path = data.draw(st.sampled_from([p for p in _paths(document) if len(p) > 0]))
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    try:
        message = decode(raw(document))
    except ProtocolError:
        return
    assert decode(encode(message)[4:]) == message  # whatever decodes is a good message


def test_rows_in_the_same_zones_share_one_zone_tuple_and_one_set_on_the_wire() -> None:
    upsert = tuple(Row("default", f"s{i}", i, ("zone-1", "zone-2"), i) for i in range(50))
    data = encode(TableUpdate(2, 1, False, 0, True, upsert))
    document = json.loads(data[4:])
    assert document["sets"] == [[0, 1]] and document["zones"] == ["zone-1", "zone-2"]
    assert document["meshes"] == ["default"]
    decoded = decode(data[4:])
    assert isinstance(decoded, TableUpdate) and decoded.upsert == upsert
    assert len({id(row.zones) for row in decoded.upsert}) == 1


def test_a_full_table_of_100000_rows_is_compact() -> None:
    keys = many_keys()
    upsert = [Row(m, s, i, ("zone-1",), i) for i, (m, s) in enumerate(keys)]
    wire = b"".join(encode(part) for part in table_messages(3, 0, True, upsert))
    names = sum(len(s) for _m, s in keys)
    # The service names, and about 20 octets per row for the rest.
    assert len(wire) < names + 20 * len(keys)
    assert [r for p in decode_stream(wire) for r in p.upsert] == upsert  # type: ignore[union-attr]


# -- the dataplane messages ---------------------------------------------------------


def test_dataplane_messages_round_trip():
    from kumazone.core.messages import DpAck, DpHello, DpRow, DpTable, DpWelcome

    messages = [
        DpHello("default", "web-1", 41, "t-1"),
        DpHello(),
        DpWelcome("default", "web-1", 42, "t-1", "mesh", "240.0.0.0/4", "fd00::/64", 60, ("::1",)),
        DpTable(
            43,
            42,
            False,
            0,
            True,
            (DpRow("web", 7, 1, False), DpRow("a_b", 9, 3, True)),
            ("gone",),
        ),
        DpAck(43),
    ]
    decoder = FrameDecoder()
    assert list(decoder.feed(b"".join(encode(m) for m in messages))) == messages


def test_one_service_change_to_a_dataplane_is_under_200_octets_in_a_tls_record():
    from kumazone.core.messages import DpRow, dp_table_messages

    # A Kubernetes-style service name, a large version and offset; TLS 1.3 adds 22
    # octets (header, content type, AEAD tag) to the frame.
    (message,) = dp_table_messages(
        123_456, 123_455, False, [DpRow("backend_kuma-demo_svc_3001", 1_048_575, 1, False)]
    )
    assert len(encode(message)) + 22 < 200


def test_a_dataplane_table_leaves_out_what_is_at_its_default():
    from kumazone.core.messages import DpRow, DpTable

    for message in (
        DpTable(2, 1, False),
        DpTable(2, 0, True, 3, False, (DpRow("a", 1),), ()),
        DpTable(2, 1, False, upsert=(DpRow("a_b", 1, 2, True),), remove=("x",)),
    ):
        assert decode(encode(message)[4:]) == message
    assert encode(DpTable(2, 1, False))[4:] == b'{"v":3,"t":"dptable","version":2,"base":1}'


@pytest.mark.parametrize(
    "fields",
    [
        {"upsert": {"service": ["a"], "offset": [1], "forms": [4], "prov": [0]}},
        {"upsert": {"service": ["a"], "offset": [1], "forms": [1], "prov": [2]}},
        {"upsert": {"service": [""], "offset": [1], "forms": [1], "prov": [0]}},
        {"upsert": {"service": ["a"], "offset": [-1], "forms": [1], "prov": [0]}},
        {"upsert": {"service": ["a", "b"], "offset": [1], "forms": [1], "prov": [0]}},
        {"remove": [1]},
        {"remove": "a"},
    ],
)
def test_bad_dataplane_tables_are_protocol_errors(fields):
    document = {
        "v": PROTOCOL_VERSION,
        "t": "dptable",
        "version": 2,
        "base": 1,
        "full": False,
        "part": 0,
        "last": True,
        **fields,
    }
    with pytest.raises(ProtocolError):
        decode(json.dumps(document).encode())


def test_dataplane_welcome_ttl_is_range_checked():
    document = {
        "v": PROTOCOL_VERSION,
        "t": "dpwelcome",
        "mesh": "m",
        "name": "n",
        "version": 1,
        "table": "t",
        "domain": "mesh",
        "cidr": "240.0.0.0/4",
        "cidr6": "fd00::/64",
        "ttl": 1 << 31,
    }
    with pytest.raises(ProtocolError, match="ttl"):
        decode(json.dumps(document).encode())


def test_a_large_dataplane_table_goes_in_parts_below_a_frame():
    from kumazone.core.messages import DpRow, dp_table_messages

    rows = [DpRow("é" * 200 + str(i), i, 1, False) for i in range(3000)]
    parts = dp_table_messages(5, 0, True, rows, [f"x{i}" for i in range(10)])
    assert len(parts) > 1 and parts[-1].last and not parts[0].last
    assert all(len(encode(p)) <= MAX_FRAME for p in parts)
    assert [r for p in parts for r in p.upsert] == rows


@pytest.mark.parametrize("service", [5, 1.5, True, "abc", {"a": 1}])
def test_a_dataplane_table_with_a_column_of_the_wrong_type_is_a_protocol_error(service):
    body = json.dumps(
        {
            "v": PROTOCOL_VERSION,
            "t": "dptable",
            "version": 1,
            "base": 0,
            "upsert": {"service": service},
        }
    )
    with pytest.raises(ProtocolError):
        decode(body.encode())
