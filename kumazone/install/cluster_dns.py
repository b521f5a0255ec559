"""Cluster and host DNS configuration that sends the domain to the control plane. Pure.

C{kumazone install dns} prints one of four things, each forwarding the configured
domain and the reverse zones of both VIP ranges (exactly the names the zone's
authority answers for) to the control plane:

 - coredns: the C{coredns} ConfigMap with one server block added (or replaced)
   between two marker comments; every other byte of the Corefile is kept;
 - kube-dns: the C{kube-dns} ConfigMap with C{stubDomains} entries for the zones;
 - dnsmasq and unbound: a drop-in file the server loads as it is.

Every function here takes text and returns text; reading files and running
C{kubectl} happen at the edge (L{kumazone.install.kubectl}).  A bad input raises
L{InstallError}, whose text is one line.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import yaml

from kumazone.core.config import DnsServerConfig

__all__ = [
    "DEFAULT_CP_PORT",
    "FLAVORS",
    "ControlPlaneAddress",
    "InstallError",
    "ServerBlock",
    "coredns_install",
    "coredns_uninstall",
    "dnsmasq_dropin",
    "forwarded_zones",
    "is_dropin",
    "kube_dns_install",
    "kube_dns_uninstall",
    "parse_cp_address",
    "reverse_zones",
    "server_blocks",
    "unbound_dropin",
]

FLAVORS = ("coredns", "kube-dns", "dnsmasq", "unbound")
#: The control plane's DNS port (Kuma's).
DEFAULT_CP_PORT = 5653
#: The ConfigMap in kube-system that each cluster flavor patches.
CONFIGMAP_NAMES = {"coredns": "coredns", "kube-dns": "kube-dns"}

_BEGIN = "# kumazone install dns: begin"
_END = "# kumazone install dns: end"
_OUR_BLOCK = re.compile(
    rf"\n?^{re.escape(_BEGIN)}\b.*?^{re.escape(_END)}\b[^\n]*(?:\n|\Z)", re.M | re.S
)
#: Where the server block's key list wraps.
_DROPIN_HEADER = "# Written by `kumazone install dns --flavor {flavor}`"


class InstallError(ValueError):
    """An input that cannot be patched; the text is one line."""


# -- what is forwarded, and where ------------------------------------------------------


@dataclass(frozen=True)
class ControlPlaneAddress:
    """The control plane's DNS address: an IP and a port."""

    host: IPv4Address | IPv6Address
    port: int = DEFAULT_CP_PORT

    def host_port(self) -> str:
        """C{10.0.0.1:5653}, C{[fd00::1]:5653}: the form CoreDNS and kube-dns take."""
        if isinstance(self.host, IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_cp_address(text: str, default_port: int = DEFAULT_CP_PORT) -> ControlPlaneAddress:
    """C{HOST[:PORT]} (C{[V6]:PORT} or a bare IPv6 address), HOST an IP address."""
    text = text.strip()
    host, port = text, str(default_port)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InstallError(f"--cp-address: {text!r} is not HOST[:PORT] or [IPV6]:PORT")
        port = rest[1:] if rest else port
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InstallError(
            f"--cp-address: {host!r} is not an IP address "
            "(CoreDNS, kube-dns, dnsmasq and unbound forward to addresses, not names)"
        ) from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InstallError(f"--cp-address: port {port!r} is not a port number (1-65535)")
    return ControlPlaneAddress(address, int(port))


def reverse_zones(network: IPv4Network | IPv6Network) -> list[str]:
    """The reverse zones (octet or nibble aligned) that exactly cover C{network}.

    The same names as L{kumazone.dns.authority.reverse_domains}, without importing
    Twisted: C{240.0.0.0/4} gives C{240.in-addr.arpa} to C{255.in-addr.arpa}.
    """
    step, suffix = (8, "in-addr.arpa") if isinstance(network, IPv4Network) else (4, "ip6.arpa")
    aligned = -(-network.prefixlen // step) * step
    keep = aligned // step
    zones = []
    for subnet in network.subnets(new_prefix=aligned):
        address_labels = subnet.network_address.reverse_pointer.split(".")[:-2]
        kept = address_labels[len(address_labels) - keep :] if keep else []
        zones.append(".".join([*kept, suffix]))
    return zones


def forwarded_zones(config: DnsServerConfig) -> list[str]:
    """The domain, then the reverse zones of the IPv4 and the IPv6 VIP ranges."""
    return [config.domain, *reverse_zones(config.cidr), *reverse_zones(config.cidr6)]


# -- the Corefile ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServerBlock:
    """One top-level block of a Corefile: its keys, where it is, its directives."""

    keys: tuple[str, ...]
    #: Offsets of the first key and just past the closing brace.
    start: int
    end: int
    line: int
    directives: tuple[str, ...]


def _tokens(text: str) -> list[tuple[str, int, int, int, bool]]:
    """(token, start, end, line, first on its line) of a Caddyfile, comments dropped."""
    found = []
    i, line, first = 0, 1, True
    while i < len(text):
        char = text[i]
        if char == "\n":
            line, first, i = line + 1, True, i + 1
        elif char.isspace():
            i += 1
        elif char == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
        else:
            start, start_line = i, line
            quoted = char == '"'
            i += 1
            while i < len(text):
                char = text[i]
                if quoted:
                    if char == "\\":
                        i += 1
                    elif char == '"':
                        i += 1
                        break
                    elif char == "\n":
                        line += 1
                elif char.isspace():
                    break
                i += 1
            found.append((text[start:i], start, i, start_line, first))
            first = False
    return found


def server_blocks(corefile: str, source: str = "Corefile") -> list[ServerBlock]:
    """The top-level server blocks of a Corefile (snippets too); C{import} lines skipped.

    Raises L{InstallError} for unbalanced braces or keys without a block.
    """
    blocks: list[ServerBlock] = []
    keys: list[tuple[str, int, int]] = []
    depth = 0
    importing_line = 0
    opened: tuple[tuple[str, ...], int, int] | None = None
    directives: list[str] = []
    for token, start, end, line, first in _tokens(corefile):
        if depth == 0 and importing_line == line:
            continue
        if token == "{":
            if depth == 0:
                if not keys:
                    raise InstallError(f"{source}: line {line}: '{{' with no server address")
                opened = (tuple(k for k, _, _ in keys), keys[0][1], keys[0][2])
                keys, directives = [], []
            depth += 1
        elif token == "}":
            depth -= 1
            if depth < 0:
                raise InstallError(f"{source}: line {line}: '}}' closes no block")
            if depth == 0 and opened is not None:
                block_keys, block_start, block_line = opened
                blocks.append(
                    ServerBlock(block_keys, block_start, end, block_line, tuple(directives))
                )
                opened = None
        elif depth == 0:
            if token == "import" and first and not keys:
                importing_line = line
            elif token.rstrip(","):
                keys.append((token.rstrip(","), start, line))
        elif depth == 1 and first:
            directives.append(token)
    if depth > 0:
        raise InstallError(
            f"{source}: a block opened at line {opened[2] if opened else '?'} is never closed"
        )
    if keys:
        raise InstallError(
            f"{source}: line {keys[0][2]}: {keys[0][0]!r} is not followed by a block in braces "
            "(a Corefile without braces is not supported)"
        )
    return blocks


def _zone_of_key(key: str) -> str | None:
    """The zone a server block key serves on port 53, or None (another port or scheme)."""
    key = key.lower()
    if "://" in key:
        scheme, _, key = key.partition("://")
        if scheme != "dns":
            return None
    zone, colon, port = key.rpartition(":")
    if not colon:
        zone, port = key, "53"
    if port != "53":
        return None
    return zone.rstrip(".") or "."


def _without_our_block(corefile: str, source: str) -> str:
    """The Corefile with the block that kumazone wrote taken out (if there is one)."""
    kept = _OUR_BLOCK.sub("", corefile)
    for marker in (_BEGIN, _END):
        at = re.search(rf"^{re.escape(marker)}\b", kept, re.M)
        if at is not None:
            line = kept.count("\n", 0, at.start()) + 1
            raise InstallError(
                f"{source}: line {line}: {marker!r} without its pair: "
                "restore or remove kumazone's block by hand"
            )
    return kept


def _coredns_block(zones: list[str], address: ControlPlaneAddress, ttl: int, plugin: str) -> str:
    # All keys on the block's first line: the one form every CoreDNS parses alike.
    keys = ", ".join(f"{zone}:53" for zone in zones)
    return (
        f"{_BEGIN} ({zones[0]} and the VIP reverse zones to the kumazone control plane)\n"
        f"{keys} {{\n"
        "    errors\n"
        f"    cache {ttl}\n"
        f"    {plugin} . {address.host_port()}\n"
        "}\n"
        f"{_END}\n"
    )


def _patched_corefile(
    corefile: str, config: DnsServerConfig, address: ControlPlaneAddress, source: str
) -> str:
    base = _without_our_block(corefile, source)
    blocks = server_blocks(base, source)
    zones = forwarded_zones(config)
    ours = set(zones)
    for block in blocks:
        for key in block.keys:
            if _zone_of_key(key) in ours:
                raise InstallError(
                    f"{source}: line {block.line}: the server block {key!r} was not written "
                    "by kumazone; remove it, then run kumazone install dns again"
                )
    used = {directive for block in blocks for directive in block.directives}
    # CoreDNS before 1.4 has no forward; 1.7 and later have no proxy.
    plugin = "proxy" if "proxy" in used and "forward" not in used else "forward"
    ours_text = _coredns_block(zones, address, config.ttl, plugin)
    if not base:
        return ours_text
    return base + ("" if base.endswith("\n") else "\n") + "\n" + ours_text


# -- ConfigMaps ------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that keeps timestamps as the strings they were written as."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Dumper(yaml.SafeDumper):
    """A safe dumper that writes multi-line strings (the Corefile) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _load_configmap(text: str, source: str) -> dict[str, Any]:
    try:
        documents = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InstallError(f"{source}: not valid YAML{where}") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise InstallError(f"{source}: not a ConfigMap (expected one YAML mapping)")
    document = documents[0]
    if document.get("kind") != "ConfigMap":
        raise InstallError(f"{source}: not a ConfigMap (kind: {document.get('kind')!r})")
    data = document.get("data")
    if data is not None and not isinstance(data, dict):
        raise InstallError(f"{source}: the ConfigMap's data is not a mapping")
    metadata = document.get("metadata")
    if isinstance(metadata, dict):
        # Server-side bookkeeping that kubectl apply refuses to take back.
        metadata.pop("managedFields", None)
    return document


def _dump(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 16)


def _corefile_of(document: dict[str, Any], source: str) -> str:
    corefile = (document.get("data") or {}).get("Corefile")
    if not isinstance(corefile, str):
        raise InstallError(f"{source}: the ConfigMap has no data.Corefile key")
    return corefile


def coredns_install(
    configmap: str,
    config: DnsServerConfig,
    address: ControlPlaneAddress,
    source: str = "ConfigMap",
) -> str:
    """The C{coredns} ConfigMap with kumazone's server block added or replaced."""
    document = _load_configmap(configmap, source)
    corefile = _corefile_of(document, source)
    document["data"]["Corefile"] = _patched_corefile(corefile, config, address, source)
    return _dump(document)


def coredns_uninstall(configmap: str, source: str = "ConfigMap") -> str:
    """The C{coredns} ConfigMap without kumazone's server block."""
    document = _load_configmap(configmap, source)
    corefile = _corefile_of(document, source)
    document["data"]["Corefile"] = _without_our_block(corefile, source)
    return _dump(document)


def _stub_domains(document: dict[str, Any], source: str) -> dict[str, Any]:
    text = (document.get("data") or {}).get("stubDomains")
    if text is None:
        return {}
    try:
        stubs = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        stubs = None
    if not isinstance(stubs, dict):
        raise InstallError(f"{source}: data.stubDomains is not a JSON object")
    return stubs


def _stub_text(stubs: dict[str, Any]) -> str:
    return json.dumps(stubs, indent=2) + "\n"


def kube_dns_install(
    configmap: str,
    config: DnsServerConfig,
    address: ControlPlaneAddress,
    source: str = "ConfigMap",
) -> str:
    """The C{kube-dns} ConfigMap with C{stubDomains} for the domain and reverse zones."""
    document = _load_configmap(configmap, source)
    stubs = _stub_domains(document, source)
    for zone in forwarded_zones(config):
        stubs[zone] = [address.host_port()]
    if document.get("data") is None:
        document["data"] = {}
    document["data"]["stubDomains"] = _stub_text(stubs)
    return _dump(document)


def kube_dns_uninstall(configmap: str, config: DnsServerConfig, source: str = "ConfigMap") -> str:
    """The C{kube-dns} ConfigMap without the C{stubDomains} entries install added."""
    document = _load_configmap(configmap, source)
    stubs = _stub_domains(document, source)
    for zone in forwarded_zones(config):
        stubs.pop(zone, None)
    data = document.get("data")
    if data is not None:
        if stubs:
            data["stubDomains"] = _stub_text(stubs)
        else:
            data.pop("stubDomains", None)
            if not data:
                del document["data"]
    return _dump(document)


# -- host forwarders -------------------------------------------------------------------


def _header(flavor: str, config: DnsServerConfig, address: ControlPlaneAddress) -> str:
    return (
        f"{_DROPIN_HEADER.format(flavor=flavor)}: sends {config.domain}. and the VIP\n"
        f"# reverse zones ({config.cidr}, {config.cidr6}) to the kumazone control plane at\n"
        f"# {address.host} port {address.port}.\n"
    )


def is_dropin(text: str, flavor: str) -> bool:
    """Whether C{text} is a drop-in that C{kumazone install dns --flavor flavor} wrote."""
    return text.startswith(_DROPIN_HEADER.format(flavor=flavor))


def dnsmasq_dropin(config: DnsServerConfig, address: ControlPlaneAddress) -> str:
    """A dnsmasq configuration file: C{conf-file=} it, or put it in C{/etc/dnsmasq.d/}."""
    target = f"{address.host}#{address.port}"
    lines = [
        _header("dnsmasq", config, address)
        + "# Load it as it is: dnsmasq --conf-file=THIS-FILE, or copy it to /etc/dnsmasq.d/.",
        "# VIPs may be in ranges that stop-dns-rebind would drop.",
        f"rebind-domain-ok=/{config.domain}/",
        *(f"server=/{zone}/{target}" for zone in forwarded_zones(config)),
    ]
    return "\n".join(lines) + "\n"


def unbound_dropin(config: DnsServerConfig, address: ControlPlaneAddress) -> str:
    """An unbound configuration file: C{include:} it, or put it in C{unbound.conf.d/}."""
    zones = forwarded_zones(config)
    lines = [
        _header("unbound", config, address)
        + "# Load it as it is: include: it from unbound.conf, or copy it to "
        "/etc/unbound/unbound.conf.d/.",
        "server:",
        "    # The control plane's answers are unsigned: a validating resolver takes them",
        "    # as insecure instead of asking the root for a chain of trust.",
        *(f'    domain-insecure: "{zone}."' for zone in zones),
        "    # unbound answers some reverse zones itself (RFC 6303, e.g. d.f.ip6.arpa for",
        "    # fd00::/8): these are resolved, through the forward-zones below.",
        *(f'    local-zone: "{zone}." transparent' for zone in zones),
        "    # VIPs are never stripped as private addresses (private-address).",
        f'    private-domain: "{config.domain}."',
    ]
    if address.host.is_loopback:
        lines += [
            "    # The control plane is on this host: let unbound query a loopback address.",
            "    do-not-query-localhost: no",
        ]
    for zone in zones:
        lines += [
            "forward-zone:",
            f'    name: "{zone}."',
            f"    forward-addr: {address.host}@{address.port}",
        ]
    return "\n".join(lines) + "\n"
