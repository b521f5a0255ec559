"""Configuration: Kuma's C{dnsServer} keys from YAML, environment, then flags. Pure.

Every bad value raises L{ConfigError} whose text is one line naming the key and the
value, so start-up can stop with that line and no traceback.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import yaml

from kumazone.core.names import name_problem

__all__ = [
    "ConfigError",
    "DnsServerConfig",
    "default_nameserver_addresses",
    "load_config",
    "parse_port",
]

#: Never hand a freed VIP to another service sooner than this (seconds).
DEFAULT_HOLD_DOWN = 3600.0


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


@dataclass(frozen=True)
class DnsServerConfig:
    """The C{dnsServer} section, validated."""

    domain: str = "mesh"
    port: int = 5653
    # Networks are immutable, so one shared default instance is safe.
    cidr: IPv4Network = IPv4Network("240.0.0.0/4")  # noqa: RUF009
    cidr6: IPv6Network = IPv6Network("fd00:fd00::/64")  # noqa: RUF009
    ttl: int = 60
    #: The addresses of the apex NS name (and SOA MNAME); empty: chosen from where
    #: the DNS server listens (L{default_nameserver_addresses}).
    nameserver_addresses: tuple[str, ...] = ()

    @property
    def hold_down(self) -> float:
        """How long a freed VIP is held back: one hour, and at least 10 x TTL."""
        return max(DEFAULT_HOLD_DOWN, 10.0 * self.ttl)


def _domain(value: object) -> str:
    if not isinstance(value, str) or not value.strip("."):
        raise ValueError("must be a non-empty DNS name")
    domain = value.strip().rstrip(".").lower()
    problem = name_problem(domain)
    if problem is not None:
        raise ValueError(f"is not a DNS name ({problem})")
    if "_" in domain:
        raise ValueError("must not contain '_'")
    return domain


def parse_port(value: object) -> int:
    """A TCP/UDP port number, 0 meaning 'pick a free one'."""
    if isinstance(value, bool):
        raise ValueError("is not a port number")
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ValueError("is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError("is out of range (0-65535)")
    return port


def _cidr(value: object) -> IPv4Network:
    try:
        network = ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"is not a CIDR ({e})") from None
    if not isinstance(network, IPv4Network):
        raise ValueError("must be an IPv4 CIDR")
    if network.prefixlen > 30:
        raise ValueError("is too small: use a prefix of /30 or shorter")
    return network


def _cidr6(value: object) -> IPv6Network:
    try:
        network = ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"is not a CIDR ({e})") from None
    if not isinstance(network, IPv6Network):
        raise ValueError("must be an IPv6 CIDR")
    return network


def _ttl(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("is not a number of seconds")
    try:
        ttl = int(str(value).strip())
    except ValueError:
        raise ValueError("is not a number of seconds") from None
    if not 1 <= ttl <= 86400:
        raise ValueError("is out of range (1-86400 seconds)")
    return ttl


def _addresses(value: object) -> tuple[str, ...]:
    """IP addresses: a YAML list, or one string of them separated by commas."""
    if isinstance(value, str):
        items: list[object] = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ValueError("must be a list of IP addresses")
    if not items or len(items) > 16:
        raise ValueError("must list 1 to 16 IP addresses")
    addresses: list[str] = []
    for item in items:
        try:
            address = ipaddress.ip_address(str(item).strip())
        except ValueError:
            raise ValueError(f"holds {str(item)!r}, which is not an IP address") from None
        if address.is_unspecified or address.is_multicast:
            raise ValueError(f"holds {str(address)!r}, which no client can reach")
        if str(address) not in addresses:
            addresses.append(str(address))
    return tuple(addresses)


def default_nameserver_addresses(dns_interface: str) -> tuple[str, ...]:
    """Where the apex NS name points when not configured: the address the DNS listens on.

    On a wildcard (C{0.0.0.0}, C{::}, empty) that address says nothing a client can
    use; then the loopback addresses of the families listened on, which an operator
    serving other hosts replaces with C{dnsServer.nameserverAddresses}.
    """
    text = dns_interface.strip().split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text) if text else None
    except ValueError:
        address = None
    if address is not None and not address.is_unspecified:
        return (str(address),)
    if address is not None and address.version == 4:
        return ("127.0.0.1",)
    return ("127.0.0.1", "::1")


# YAML key -> (field, environment variable, parser)
_KEYS: dict[str, tuple[str, str, Callable[[object], Any]]] = {
    "domain": ("domain", "KUMA_DNS_SERVER_DOMAIN", _domain),
    "port": ("port", "KUMA_DNS_SERVER_PORT", parse_port),
    "CIDR": ("cidr", "KUMA_DNS_SERVER_CIDR", _cidr),
    "CIDRv6": ("cidr6", "KUMA_DNS_SERVER_CIDR_V6", _cidr6),
    "ttl": ("ttl", "KUMA_DNS_SERVER_TTL", _ttl),
    "nameserverAddresses": (
        "nameserver_addresses",
        "KUMA_DNS_SERVER_NAMESERVER_ADDRESSES",
        _addresses,
    ),
}


def _show(key: object) -> str:
    """A key as written, or quoted when it could break the one-line message."""
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_.-]+", text) else repr(key)


def _brief(value: object) -> str:
    """A value for an error line: its repr, cut to stay short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse(source: str, value: object, parser: Callable[[object], Any]) -> Any:
    try:
        return parser(value)
    except ValueError as e:
        raise ConfigError(f"{source}: {value!r} {e}") from None


def load_config(
    yaml_text: str | None,
    environ: Mapping[str, str],
    flags: Mapping[str, object] | None = None,
    source_name: str = "config",
) -> DnsServerConfig:
    """The config from a YAML text, overridden by C{environ}, overridden by C{flags}.

    C{flags} maps field names (C{port}) to raw values; a flag of None is not given.
    Raises L{ConfigError} with one line naming the key and the value.
    """
    values: dict[str, Any] = {}
    if yaml_text is not None:
        values.update(_from_file(_dns_server_section(yaml_text, source_name)))
    values.update(_from_environment(environ))
    values.update(_from_flags(flags or {}))
    return _checked(replace(DnsServerConfig(), **values))


def _dns_server_section(yaml_text: str, source_name: str) -> dict[Any, Any]:
    """The C{dnsServer} mapping of a config file; every other top-level key is an error."""
    try:
        document = yaml.safe_load(yaml_text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source_name}: not valid YAML{where}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{source_name}: must be a mapping with a dnsServer key")
    for key, value in document.items():
        if key != "dnsServer":
            raise ConfigError(f"{_show(key)}: {_brief(value)} unknown key (only dnsServer is read)")
    section = document.get("dnsServer")
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"dnsServer: {section!r} must be a mapping")
    return section


def _from_file(section: Mapping[Any, Any]) -> dict[str, Any]:
    """Field values from the file's C{dnsServer} keys."""
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _KEYS:
            known = ", ".join(_KEYS)
            raise ConfigError(
                f"dnsServer.{_show(key)}: {_brief(value)} unknown key (known: {known})"
            )
        field, _, parser = _KEYS[key]
        values[field] = _parse(f"dnsServer.{key}", value, parser)
    return values


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Field values from the C{KUMA_DNS_SERVER_*} variables that are set."""
    return {
        field: _parse(variable, environ[variable], parser)
        for field, variable, parser in _KEYS.values()
        if variable in environ
    }


#: The command-line flag that sets a field, for error lines.
_FLAG_NAMES = {"port": "--dns-port", "nameserver_addresses": "--nameserver-addresses"}


def _from_flags(flags: Mapping[str, object]) -> dict[str, Any]:
    """Field values from the flags that were given."""
    values: dict[str, Any] = {}
    for field, value in flags.items():
        if value is None:
            continue
        parser = next(p for f, _, p in _KEYS.values() if f == field)
        values[field] = _parse(_FLAG_NAMES.get(field, field), value, parser)
    return values


def _checked(config: DnsServerConfig) -> DnsServerConfig:
    """C{config}, if its values agree with one another."""
    if config.cidr6.num_addresses < config.cidr.num_addresses:
        raise ConfigError(
            f"dnsServer.CIDRv6: {str(config.cidr6)!r} is smaller than dnsServer.CIDR "
            f"{str(config.cidr)!r} (each IPv4 VIP needs an IPv6 VIP at the same offset)"
        )
    return config
