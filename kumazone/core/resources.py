"""Kuma Universal resources: parsing and validation, pure.

A resource that does not validate raises L{ResourceError} naming the field that is
wrong, in Kuma's dotted form (C{networking.inbound[0].tags}).  Only what kumazone
uses is checked in depth; other well-known Kuma fields are accepted as they are,
unknown top-level fields are refused.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import socket
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple

import yaml

__all__ = [
    "DATAPLANE",
    "EXTERNAL_SERVICE",
    "MESH",
    "SERVICE_TAG",
    "Resource",
    "ResourceError",
    "ResourceKey",
    "check_mesh_name",
    "check_service_name",
    "pack_document",
    "parse_documents",
    "parse_resource",
    "parse_stored",
    "unpack_document",
]

DATAPLANE = "Dataplane"
EXTERNAL_SERVICE = "ExternalService"
MESH = "Mesh"
SERVICE_TAG = "kuma.io/service"

_COMMON_FIELDS = {"type", "name", "mesh", "labels", "creationTime", "modificationTime"}
_FIELDS = {
    DATAPLANE: _COMMON_FIELDS | {"networking", "metrics", "probes"},
    EXTERNAL_SERVICE: _COMMON_FIELDS | {"networking", "tags"},
    MESH: _COMMON_FIELDS - {"mesh"}
    | {
        "mtls",
        "logging",
        "tracing",
        "metrics",
        "networking",
        "routing",
        "constraints",
        "skipCreatingInitialPolicies",
        "meshServices",
    },
}
_TYPES = {kind: kind for kind in _FIELDS}
_NAME = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
_TAG_VALUE = re.compile(r"\A[A-Za-z0-9.\-_:/]+\Z")
_HOSTNAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"\A{_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*\Z")
MAX_NAME_LENGTH = 253
MAX_MESH_LENGTH = 63
#: Tag values (service names among them) are kept small enough to sync in bulk.
MAX_TAG_VALUE = 1024


class ResourceError(ValueError):
    """A resource that does not validate; C{field} names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


#: What most documents hold (Dataplanes most of all), as a preset dictionary for
#: L{pack_document}: a short document then deflates to a fraction of its size
#: (the most common strings last: nearer, cheaper to refer to).
_PRESET = (
    b'"labels":{"kuma.io/zone":"","version":"v1"},"servicePort":8080,"kuma.io/protocol":'
    b'"http","outbound":[{"port":,"tags":{}}],"type":"ExternalService","tags":{"kuma.io/'
    b'service":"",{"type":"Dataplane","mesh":"default","name":"","networking":{"address":'
    b'"10.0.0.0","inbound":[{"port":8080,"tags":{"kuma.io/service":""}}]}}'
)
#: Raw deflate with a 512-octet window (documents are short, and a stream set up
#: for a bigger one costs more to set up than to run), the fastest level.
_PACK_WBITS, _PACK_LEVEL, _PACK_MEMLEVEL = -9, 1, 1
#: The first octet of a deflated document: never the first of a JSON object.
_PACKED = 0
_compressobj, _decompressobj = zlib.compressobj, zlib.decompressobj
_DEFLATED, _Z_DEFAULT_STRATEGY = zlib.DEFLATED, zlib.Z_DEFAULT_STRATEGY


def pack_document(raw: bytes) -> bytes:
    """C{raw} (a document's compact JSON) deflated with L{_PRESET}, marked with a
    leading NUL octet; C{raw} itself when that is no shorter.

    Deterministic: equal documents give equal octets (a resource compares them).
    About 3 us for a usual Dataplane of 150 octets, which becomes some 25.
    """
    if not raw or raw[0] == _PACKED:
        raise ValueError("not a JSON document")
    packer = _compressobj(
        _PACK_LEVEL, _DEFLATED, _PACK_WBITS, _PACK_MEMLEVEL, _Z_DEFAULT_STRATEGY, _PRESET
    )
    packed = b"\0" + packer.compress(raw) + packer.flush()
    return packed if len(packed) < len(raw) else raw


def unpack_document(packed: bytes) -> bytes:
    """What L{pack_document} was given."""
    if packed[0] != _PACKED:
        return packed
    unpacker = _decompressobj(_PACK_WBITS, _PRESET)
    return unpacker.decompress(packed[1:]) + unpacker.flush()


class ResourceKey(NamedTuple):
    """Identity of a resource: type, mesh ('' for a Mesh) and name."""

    type: str
    mesh: str
    name: str

    def __str__(self) -> str:
        return f"{self.type} {self.mesh}/{self.name}" if self.mesh else f"{self.type} {self.name}"


@dataclass(frozen=True, slots=True, init=False)
class Resource:
    """A validated resource: its document as given, and what kumazone uses of it.

    The document is kept as compact JSON (a zone may hold 100,000 of them: a
    decoded tree costs ten times as much memory), deflated (L{packed}; a million
    services' Dataplanes were a tenth of a zone's memory as text) and given back
    by L{raw} and L{document} when asked for.
    """

    key: ResourceKey
    #: The compact JSON as L{pack_document} keeps it: what two equal resources share.
    packed: bytes
    #: C{kuma.io/service} values a Dataplane provides (L{services}): the one
    #: value itself (nearly every Dataplane), else a tuple of none or several.
    provides: str | tuple[str, ...]
    #: The Dataplane's networking address, if it is an IP address.
    address: str | None

    def __init__(
        self,
        key: ResourceKey,
        raw: bytes,
        services: tuple[str, ...] = (),
        address: str | None = None,
    ) -> None:
        _fill(self, key, raw, _provides(services), address)

    @property
    def services(self) -> tuple[str, ...]:
        """The C{kuma.io/service} values a Dataplane provides (none for other types)."""
        provides = self.provides
        return (provides,) if provides.__class__ is str else provides  # type: ignore[return-value]

    @property
    def raw(self) -> bytes:
        """The document's compact JSON (UTF-8), as given."""
        return unpack_document(self.packed)

    @property
    def document(self) -> dict[str, Any]:
        """The resource as given (a fresh copy each time)."""
        decoded: dict[str, Any] = json.loads(unpack_document(self.packed))
        return decoded

    @property
    def type(self) -> str:
        """The resource type (C{Dataplane}, C{ExternalService}, C{Mesh})."""
        return self.key.type

    @property
    def mesh(self) -> str:
        """The mesh the resource belongs to ('' for a Mesh itself)."""
        return self.key.mesh

    @property
    def name(self) -> str:
        """The resource's name."""
        return self.key.name


_set_resource_fields = [
    Resource.__dict__[field.name].__set__ for field in dataclasses.fields(Resource)
]


def _require_mapping(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ResourceError(field, f"must be a mapping, not {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ResourceError(field, f"keys must be strings, found {key!r}")
    return value


def _require_string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ResourceError(field, f"must be a string, not {_kind(value)}")
    if value == "":
        raise ResourceError(field, "must not be empty")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _check_name(value: object, field: str, limit: int) -> str:
    name = _require_string(value, field)
    if len(name) > limit:
        raise ResourceError(field, f"must be at most {limit} characters, is {len(name)}")
    if not _NAME.match(name):
        raise ResourceError(
            field,
            f"{name!r} is not a valid name: letters, digits, '.', '-' and '_', "
            "starting and ending with a letter or digit",
        )
    return name


def check_mesh_name(value: object, field: str = "mesh") -> str:
    """C{value} if it is a valid mesh name (as a resource's C{mesh}), else L{ResourceError}."""
    return _check_name(value, field, MAX_MESH_LENGTH)


def check_service_name(value: object, field: str = "service") -> str:
    """C{value} if it is a valid service (a C{kuma.io/service} tag value), else L{ResourceError}."""
    text = _require_string(value, field)
    if len(text) > MAX_TAG_VALUE:
        raise ResourceError(field, f"must be at most {MAX_TAG_VALUE} characters, is {len(text)}")
    if not _TAG_VALUE.match(text):
        raise ResourceError(field, f"{text[:40]!r} has characters outside [A-Za-z0-9.-_:/]")
    return text


def _check_port(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResourceError(field, f"must be a number, not {_kind(value)}")
    if not 1 <= value <= 65535:
        raise ResourceError(field, f"must be in the range [1, 65535], is {value}")
    return value


def _check_tags(value: object, field: str, need_service: bool) -> Mapping[str, str]:
    tags = _require_mapping(value, field)
    for tag, tag_value in tags.items():
        if tag == "":
            raise ResourceError(field, "tag names must not be empty")
        check_service_name(tag_value, f'{field}["{tag}"]')
    if need_service and SERVICE_TAG not in tags:
        raise ResourceError(f'{field}["{SERVICE_TAG}"]', "tag is required")
    return tags


def _check_address(value: object, field: str) -> tuple[str, bool]:
    """An IP address (in canonical form) or a hostname; and whether it is an IP."""
    address = _require_string(value, field)
    try:
        # An IPv4 address already in canonical form (the common case) costs one C call.
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, address)) == address:
            return address, True
    except OSError:
        pass
    try:
        # The canonical form, as a socket reports a client's address.
        return str(ipaddress.ip_address(address)), True
    except ValueError:
        pass
    if len(address) > MAX_NAME_LENGTH or not _HOSTNAME.match(address):
        raise ResourceError(field, f"{address!r} is neither an IP address nor a hostname")
    return address, False


def _check_unknown(document: Mapping[str, Any], allowed: set[str], prefix: str = "") -> None:
    for key in document:
        if key not in allowed:
            raise ResourceError(f"{prefix}{key}", "unknown field")


def _dataplane(document: Mapping[str, Any]) -> tuple[tuple[str, ...], str | None]:
    networking = _require_mapping(document.get("networking"), "networking")
    _check_unknown(
        networking,
        {
            "address",
            "advertisedAddress",
            "inbound",
            "outbound",
            "gateway",
            "admin",
            "transparentProxying",
        },
        "networking.",
    )
    address, is_ip = _check_address(networking.get("address"), "networking.address")
    services: list[str] = []
    inbounds = networking.get("inbound", [])
    if not isinstance(inbounds, list):
        raise ResourceError("networking.inbound", f"must be a list, not {_kind(inbounds)}")
    for index, inbound in enumerate(inbounds):
        field = f"networking.inbound[{index}]"
        inbound = _require_mapping(inbound, field)
        _check_port(inbound.get("port"), f"{field}.port")
        if "servicePort" in inbound:
            _check_port(inbound["servicePort"], f"{field}.servicePort")
        for key in ("address", "serviceAddress"):
            if key in inbound:
                _check_address(inbound[key], f"{field}.{key}")
        tags = _check_tags(inbound.get("tags"), f"{field}.tags", need_service=True)
        services.append(tags[SERVICE_TAG])
    gateway = networking.get("gateway")
    if gateway is not None:
        gateway = _require_mapping(gateway, "networking.gateway")
        tags = _check_tags(gateway.get("tags"), "networking.gateway.tags", need_service=True)
        kind = gateway.get("type", "DELEGATED")
        if kind not in ("DELEGATED", "BUILTIN"):
            raise ResourceError(
                "networking.gateway.type", f"must be DELEGATED or BUILTIN, is {kind!r}"
            )
        services.append(tags[SERVICE_TAG])
    if not services:
        raise ResourceError("networking", "has neither an inbound nor a gateway")
    if gateway is not None and inbounds:
        raise ResourceError("networking.inbound", "must be empty on a gateway Dataplane")
    return tuple(dict.fromkeys(services)), address if is_ip else None


def _external_service(document: Mapping[str, Any]) -> None:
    _check_tags(document.get("tags"), "tags", need_service=True)
    networking = _require_mapping(document.get("networking"), "networking")
    _check_unknown(networking, {"address", "tls", "disableHostDNSEntry"}, "networking.")
    address = _require_string(networking.get("address"), "networking.address")
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ResourceError("networking.address", f"{address!r} must be host:port")
    if not re.fullmatch(r"[0-9]{1,5}", port):
        raise ResourceError("networking.address", f"port {port!r} is not a number")
    _check_port(int(port), "networking.address")
    _check_address(host.strip("[]"), "networking.address")


# libyaml's loader when PyYAML has it (much faster on large resource files).
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):
    """YAML as Kuma reads it: timestamps (creationTime) stay the strings they were."""


_Loader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    lambda loader, node: loader.construct_scalar(node),
)


#: Deeper documents are refused (no Kuma resource nests half as deep).
MAX_DEPTH = 32


def _check_json(value: object, field: str, seen: set[int] | None = None, depth: int = 0) -> None:
    """Refuse what JSON cannot hold (YAML's !!binary, !!set, ...), naming where.

    Also refuses YAML aliases (a node used twice: a few hundred octets of
    aliases can stand for billions of nodes) and nesting deeper than MAX_DEPTH.
    """
    where = field or "(resource)"
    if isinstance(value, dict | list):
        if depth > MAX_DEPTH:
            raise ResourceError(where, f"nested deeper than {MAX_DEPTH} levels")
        seen = set() if seen is None else seen
        if id(value) in seen:
            raise ResourceError(where, "YAML aliases are not allowed in resources")
        seen.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ResourceError(where, f"keys must be strings, found {key!r}")
            _check_json(item, f"{field}.{key}" if field else key, seen, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{field}[{index}]", seen, depth + 1)
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise ResourceError(where, f"{type(value).__name__} is not allowed here")


def parse_stored(text: str) -> Resource:
    """Validate a document as a store keeps it (L{Resource.raw}, decoded).

    As thorough as L{parse_resource}, without what JSON cannot need: no check
    for YAML types, and the text itself is kept as the compact document.
    Raises L{ResourceError} (a ValueError, as bad JSON does).
    """
    try:
        document = json.loads(text)
    except RecursionError:
        raise ResourceError("(document)", "nested too deeply") from None
    return parse_resource(document, from_json=True, raw=text.encode("utf-8"))


def parse_resource(document: object, from_json: bool = False, raw: bytes | None = None) -> Resource:
    """Validate one resource document (already decoded from YAML or JSON).

    C{from_json}: the document came from JSON, so it holds only JSON types.
    C{raw}: the document's compact JSON, when the caller has it already.
    """
    if not from_json:
        _check_json(_require_mapping(document, "(resource)"), "")
    fast = _usual_dataplane(document, raw)
    return fast if fast is not None else _parse_checked(document, raw)


def _parse_checked(document: object, raw: bytes | None) -> Resource:
    """L{parse_resource} of a document that holds only JSON types, every rule checked."""
    document = _require_mapping(document, "(resource)")
    kind = document.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ResourceError("type", f"must be one of {', '.join(sorted(_FIELDS))}, is {kind!r}")
    kind = _TYPES[kind]  # one string for every resource of a type
    _check_unknown(document, _FIELDS[kind])
    name = _check_name(document.get("name"), "name", MAX_NAME_LENGTH)
    if "labels" in document:
        labels = _require_mapping(document["labels"], "labels")
        for label, value in labels.items():
            _require_string(value, f'labels["{label}"]')
    if kind == MESH:
        if len(name) > MAX_MESH_LENGTH:
            raise ResourceError("name", f"a mesh name must be at most {MAX_MESH_LENGTH} characters")
        return Resource(ResourceKey(MESH, "", name), raw or _compact(document))
    # Few meshes, many resources: one string per mesh.
    mesh = sys.intern(_check_name(document.get("mesh", "default"), "mesh", MAX_MESH_LENGTH))
    key = ResourceKey(kind, mesh, name)
    if kind == DATAPLANE:
        services, address = _dataplane(document)
        return Resource(key, raw or _compact(document), services, address)
    _external_service(document)
    return Resource(key, raw or _compact(document))


_DATAPLANE_FIELDS = frozenset(_FIELDS[DATAPLANE])
#: The networking fields of a Dataplane the fast path takes (with a gateway, the
#: full checks run; the others are taken as they are on either path).
_USUAL_NETWORKING = frozenset(
    ("address", "advertisedAddress", "inbound", "outbound", "admin", "transparentProxying")
)
_inet_pton, _inet_ntop, _AF_INET = socket.inet_pton, socket.inet_ntop, socket.AF_INET
_name_match, _tag_match = _NAME.match, _TAG_VALUE.match
#: Mesh names seen valid, each as the one (interned) string for that mesh.
_valid_meshes: dict[str, str] = {}
#: Distinct mesh names remembered (there are a few; bad input may hold many).
_MESHES_KEPT = 1024


def _canonical_ipv4(value: object) -> bool:
    """Whether C{value} is an IPv4 address in canonical form (what L{_check_address}
    accepts at once)."""
    if type(value) is not str:
        return False
    try:
        return _inet_ntop(_AF_INET, _inet_pton(_AF_INET, value)) == value
    except OSError:
        return False


def _valid_mesh(mesh: object) -> str | None:
    """C{mesh} as the one string of that mesh if it is a valid mesh name, else None."""
    if type(mesh) is not str:
        return None
    known = _valid_meshes.get(mesh)
    if known is not None:
        return known
    if len(mesh) > MAX_MESH_LENGTH or not _name_match(mesh):
        return None
    mesh = sys.intern(mesh)
    if len(_valid_meshes) < _MESHES_KEPT:
        _valid_meshes[mesh] = mesh
    return mesh


def _usual_dataplane(document: object, raw: bytes | None) -> Resource | None:
    """L{parse_resource}'s result for a valid Dataplane of the usual shape, else None.

    The usual shape: plain dicts, lists and strings; IPv4 addresses in canonical
    form; inbounds only (no gateway).  Every check of the full path holds for
    what this accepts; for anything else (and for every invalid document) it
    gives None and the full path runs, which names what is wrong.  A zone loads
    100,000 Dataplanes at start-up: this is most of that work, in a few
    operations per field.
    """
    if (
        type(document) is not dict
        or document.get("type") != DATAPLANE
        or not document.keys() <= _DATAPLANE_FIELDS
    ):
        return None
    name = document.get("name")
    if type(name) is not str or len(name) > MAX_NAME_LENGTH or not _name_match(name):
        return None
    mesh = _valid_mesh(document.get("mesh", "default"))
    if mesh is None:
        return None
    if "labels" in document:
        labels = document["labels"]
        if type(labels) is not dict or not all(map(isinstance, labels, repeat(str))):
            return None
        for value in labels.values():
            if type(value) is not str or not value:
                return None
    networking = document.get("networking")
    if type(networking) is not dict or not networking.keys() <= _USUAL_NETWORKING:
        return None
    address = networking.get("address")
    if type(address) is not str:
        return None
    try:
        if _inet_ntop(_AF_INET, _inet_pton(_AF_INET, address)) != address:
            return None
    except OSError:
        return None
    inbounds = networking.get("inbound")
    if type(inbounds) is not list or not inbounds:
        return None
    services: list[str] = []
    for inbound in inbounds:
        if type(inbound) is not dict or not all(map(isinstance, inbound, repeat(str))):
            return None
        port = inbound.get("port")
        if type(port) is not int or not 1 <= port <= 65535:
            return None
        if len(inbound) > 2:  # more than port and tags
            if "servicePort" in inbound:
                port = inbound["servicePort"]
                if type(port) is not int or not 1 <= port <= 65535:
                    return None
            if "address" in inbound and not _canonical_ipv4(inbound["address"]):
                return None
            if "serviceAddress" in inbound and not _canonical_ipv4(inbound["serviceAddress"]):
                return None
        tags = inbound.get("tags")
        if type(tags) is not dict:
            return None
        for tag, value in tags.items():
            if (
                type(tag) is not str
                or not tag
                or type(value) is not str
                or len(value) > MAX_TAG_VALUE
                or not _tag_match(value)
            ):
                return None
        service = tags.get(SERVICE_TAG)
        if service is None:
            return None
        services.append(service)
    return _resource(
        _new_key(ResourceKey, (DATAPLANE, mesh, name)),
        raw or _compact(document),
        _provides(services),
        address,
    )


def _provides(services: Sequence[str]) -> str | tuple[str, ...]:
    """L{Resource.provides} of the C{kuma.io/service} values of a Dataplane's inbounds."""
    if len(services) == 1:
        return services[0]
    unique = tuple(dict.fromkeys(services))
    return unique[0] if len(unique) == 1 else unique


_new_key = tuple.__new__


def _resource(
    key: ResourceKey, raw: bytes, provides: str | tuple[str, ...], address: str | None
) -> Resource:
    """C{Resource(key, raw, services, address)} given C{provides} as
    L{Resource.provides} holds it, without the constructor's call and its
    normalising of the services (a load makes 100,000)."""
    resource = object.__new__(Resource)
    _fill(resource, key, raw, provides, address)
    return resource


def _fill(
    resource: Resource,
    key: ResourceKey,
    raw: bytes,
    provides: str | tuple[str, ...],
    address: str | None,
) -> None:
    """Set a new resource's slots (past the frozen C{__setattr__})."""
    set_key, set_packed, set_provides, set_address = _set_resource_fields
    set_key(resource, key)
    set_packed(resource, pack_document(raw))
    set_provides(resource, provides)
    set_address(resource, address)


_compact_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: The C encoder behind L{_compact_encoder} (what C{json.dumps} runs), made once:
#: C{json.dumps} with these options builds an encoder per call, a third of its cost.
#: No marker dict: documents come from JSON or from YAML without aliases, so they
#: hold no cycles (a cycle would raise RecursionError instead of ValueError).
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_compact: Any = (
    _c_encoder(
        None,
        _compact_encoder.default,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        False,
        False,
        True,
    )
    if _c_encoder is not None
    else None
)


def _compact(document: Mapping[str, Any]) -> bytes:
    """C{json.dumps(document, separators=(",", ":"), ensure_ascii=False)}, UTF-8 encoded."""
    if _encode_compact is not None and type(document) is dict:
        return "".join(_encode_compact(document, 0)).encode("utf-8")
    return _compact_encoder.encode(document).encode("utf-8")


def load_documents(text: str, json_only: bool = False) -> Iterator[object]:
    """Decode a YAML (multi-document) or JSON text; raises L{ResourceError} if unreadable."""
    if json_only:
        try:
            decoded = json.loads(text)
        except ValueError as e:
            raise ResourceError("(document)", f"not valid JSON: {e}") from None
        except RecursionError:
            raise ResourceError("(document)", "nested too deeply") from None
        yield decoded
        return
    try:
        documents = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ResourceError("(document)", f"not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ResourceError("(document)", "nested too deeply") from None
    for document in documents:
        if document is not None:
            yield document


def parse_documents(text: str, json_only: bool = False) -> list[Resource | ResourceError]:
    """Every resource in a file's text, or the error for each one that is bad.

    A text that cannot be decoded at all gives one error.
    """
    results: list[Resource | ResourceError] = []
    try:
        documents = list(load_documents(text, json_only))
    except ResourceError as e:
        return [e]
    # Each document is let go once parsed, so that the resources made take the
    # room the documents leave: a file of half a million Dataplanes is decoded
    # whole first, and both at once were the peak of a zone's memory (the
    # interpreter keeps the room of its peak).
    documents.reverse()
    while documents:
        document = documents.pop()
        if isinstance(document, list) and json_only:
            items: list[object] = document
            document = None
            items.reverse()
        else:
            items = [document]
            document = None
        while items:
            item = items.pop()
            try:
                results.append(parse_resource(item, from_json=json_only))
            except ResourceError as e:
                results.append(e)
    return results
