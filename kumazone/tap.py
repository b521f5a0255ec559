"""twistd plugin options and service assembly: `twistd -n kumazone --role=zone ...`.

Three roles: C{zone}, C{global} and C{dataplane}; a flag of another role than
the one given is an error, as is any bad value.

Options are validated in L{Options.postOptions}; a bad value stops start-up with
one line naming it.  L{makeService} only assembles: nothing binds until the
service starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Any

from twisted.python import usage

from kumazone.core.config import ConfigError, DnsServerConfig, load_config, parse_port
from kumazone.core.limits import Cooldowns, ZoneLimits
from kumazone.core.names import ZONE_NAME
from kumazone.core.resources import ResourceError, check_mesh_name
from kumazone.global_service import GlobalService, GlobalSettings
from kumazone.sync.tls import TLSFiles, dataplane_identity
from kumazone.zone_service import ZoneService, ZoneSettings

__all__ = ["Options", "makeService"]


_ROLES = ("zone", "global", "dataplane")
#: Flags that only some roles take (every other flag, every role).
_ZONE_ONLY = frozenset({"zone", "global", "resources", "dp-port", "dp-interface"})
_CONTROL_PLANE_ONLY = frozenset(
    {"config", "store", "nameserver-addresses", "api-port", "api-interface"}
)
_DATAPLANE_ONLY = frozenset({"cp-address", "mesh", "name", "resolv-conf"})
_GLOBAL_ONLY = frozenset({"advertise-address"})
#: A dataplane's name: as a resource's name (it is a Dataplane's, in Kuma).
_DATAPLANE_NAME = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?\Z")
#: The dataplane role's defaults that differ from the control planes'.
DATAPLANE_DNS_PORT = 15053
DATAPLANE_DNS_INTERFACES = "127.0.0.1,::1"
DATAPLANE_CP_PORT = 5678
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"


def _roles_of(flag: str) -> tuple[str, ...] | None:
    """The roles that take C{flag}, or None for every role."""
    if flag in _ZONE_ONLY:
        return ("zone",)
    if flag in _CONTROL_PLANE_ONLY or flag.startswith("kds-"):
        return ("zone", "global")
    if flag in _DATAPLANE_ONLY:
        return ("dataplane",)
    if flag in _GLOBAL_ONLY:
        return ("global",)
    return None


def _fail(message: str) -> SystemExit:
    """Start-up stops with this one line on stderr and exit status 1."""
    return SystemExit(f"kumazone: {message}")


class Options(usage.Options):
    """Command-line options of the kumazone plugin."""

    synopsis = "[options]"
    longdesc = (
        "Runs a kumazone control plane. --role=zone --zone=NAME runs a zone serving .mesh "
        "DNS from --resources and the HTTP API, standalone or synced with --global=HOST. "
        "--role=global runs the global control plane that zones sync with. "
        "--role=dataplane --cp-address=HOST runs a DNS resolver beside a workload, fed its "
        "mesh's names by its zone control plane."
    )
    optParameters = [
        ["role", None, "zone", "zone, global or dataplane."],
        ["zone", None, None, "The zone's name (role zone)."],
        [
            "global",
            None,
            None,
            "HOST[:PORT] of the global control plane (role zone); several replicas of "
            "it as HOST[:PORT],HOST[:PORT],...: tried in turn when one cannot be reached.",
        ],
        ["config", None, None, "YAML file with Kuma's dnsServer keys."],
        ["resources", None, None, "Directory of resource files (*.yaml, *.yml, *.json), watched."],
        [
            "data-dir",
            None,
            None,
            "State directory (default ./kumazone-data/<zone, global or dataplane name>).",
        ],
        [
            "store",
            None,
            None,
            "Store URL (default sqlite:///<data-dir>/kumazone.sqlite3); "
            "postgresql://USER@HOST[:PORT]/DB for replicas of the global or of a "
            "standalone zone sharing one database (the password from PGPASSWORD or "
            "~/.pgpass).",
        ],
        [
            "dns-port",
            None,
            None,
            "DNS port, UDP and TCP (default 5653, dataplane 15053; 0 picks a free one).",
        ],
        [
            "dns-interface",
            None,
            None,
            "Address the DNS server listens on (default 0.0.0.0; dataplane: addresses, "
            "comma-separated, default 127.0.0.1,::1).",
        ],
        [
            "diagnostics-port",
            None,
            None,
            "Port of /ready, /healthy, /metrics (default 5680, dataplane 9902; 0: free).",
        ],
        ["diagnostics-interface", None, "127.0.0.1", "Address the diagnostics port listens on."],
        [
            "nameserver-addresses",
            None,
            None,
            "Addresses of the apex NS name, comma-separated (dnsServer.nameserverAddresses; "
            "default: --dns-interface, or loopback when that is a wildcard).",
        ],
        ["api-port", None, "5681", "HTTP API port (0: free)."],
        ["api-interface", None, "127.0.0.1", "Address the HTTP API listens on."],
        ["kds-port", None, "5685", "Zone sync port (role global)."],
        [
            "kds-interface",
            None,
            None,
            "Address zone sync listens on (role global; default 0.0.0.0, "
            "127.0.0.1 with --insecure).",
        ],
        [
            "advertise-address",
            None,
            None,
            "Host the global's other replicas reach this one at: while it leads, they "
            "forward zone sync and the API to it (role global, --store=postgresql:// only; "
            "default --kds-interface, or this host's name when that is a wildcard).",
        ],
        ["kds-zone-max-services", None, "10000", "Services one zone may have (role global)."],
        ["kds-zone-max-parts", None, "64", "Parts of one zone's inventory (role global)."],
        [
            "kds-zone-max-messages-per-second",
            None,
            "100",
            "Messages per second one zone may send, twice as many at once (role global).",
        ],
        [
            "kds-zone-max-pending-bytes",
            None,
            str(32 << 20),
            "Bytes queued for a zone that does not read before it is dropped (role global).",
        ],
        [
            "kds-zone-refusal-cooldown",
            None,
            "5",
            "Seconds a zone refused after its hello waits before it is heard again, "
            "doubling with each refusal in a row up to 300; 0: no wait (role global).",
        ],
        [
            "kds-zone-max-range-share",
            None,
            "0.5",
            "The fraction of the VIP range one zone's services may take (role global).",
        ],
        ["dp-port", None, None, "Dataplane sync port (role zone; default 5678; 0: free)."],
        [
            "dp-interface",
            None,
            None,
            "Address dataplane sync listens on (role zone; default 0.0.0.0, "
            "127.0.0.1 with --insecure and no TLS).",
        ],
        [
            "cp-address",
            None,
            None,
            "HOST[:PORT] of the zone control plane's dataplane port (role dataplane; "
            "port 5678 by default).",
        ],
        [
            "mesh",
            None,
            None,
            "The dataplane's mesh (role dataplane, with --insecure; default 'default'; "
            "with TLS, the certificate's).",
        ],
        [
            "name",
            None,
            None,
            "The dataplane's name (role dataplane, with --insecure; default the host name; "
            "with TLS, the certificate's).",
        ],
        [
            "resolv-conf",
            None,
            None,
            "Where the nameservers to forward to are listed (role dataplane; "
            "default /etc/resolv.conf).",
        ],
        ["tls-cert", None, None, "PEM certificate for zone or dataplane sync."],
        ["tls-key", None, None, "PEM private key for zone or dataplane sync."],
        ["tls-ca", None, None, "PEM CA certificate that signs the peers' certificates."],
    ]
    optFlags = [
        ["insecure", None, "Allow zone or dataplane sync without TLS certificates."],
    ]

    def postOptions(self) -> None:
        """Check every option; a bad one stops start-up with one line naming it."""
        role = self["role"]
        self._check_role(role)
        if self["diagnostics-port"] is None:
            self["diagnostics-port"] = "9902" if role == "dataplane" else "5680"
        if role == "dataplane":
            self._dataplane_options()
            return
        if self["dns-interface"] is None:
            self["dns-interface"] = "0.0.0.0"
        for flag in ("diagnostics-port", "api-port", "kds-port"):
            try:
                self[flag] = parse_port(self[flag])
            except ValueError as e:
                raise _fail(f"--{flag}: {self[flag]!r} {e}") from None
        self.global_addresses = () if self["global"] is None else parse_globals(self["global"])
        self.global_address = self.global_addresses[0] if self.global_addresses else None
        self.tls = self._tls(syncs=role == "global" or self.global_address is not None)
        if self["kds-interface"] is None:
            # Without TLS anyone who reaches the port can be any zone: loopback only.
            insecure = self["insecure"] and self.tls is None
            self["kds-interface"] = "127.0.0.1" if insecure else "0.0.0.0"
        self.limits = self._limits()
        self.dns = self._dns_config()
        if self["resources"] is not None and not os.path.isdir(self["resources"]):
            raise _fail(f"--resources: {self['resources']!r} is not a directory")
        data_dir = self["data-dir"] or os.path.join(
            "kumazone-data", self["zone"] if role == "zone" else "global"
        )
        self["data-dir"] = data_dir
        self.store_url: str | None = None
        if self["store"] is not None and self["store"].startswith(("postgresql:", "postgres:")):
            self.store_url = self._postgres_url(self["store"], role)
            self.store_path = ""
        else:
            self.store_path = self._store_path(self["store"], data_dir)
        if self["advertise-address"] is not None and self.store_url is None:
            raise _fail(
                "--advertise-address: only replicas of the global take it (--store=postgresql://...)"
            )
        if role == "zone":
            self._zone_dataplane_port()

    def _zone_dataplane_port(self) -> None:
        """The zone's dataplane port: over the zone's TLS files, or without with --insecure."""
        value = self["dp-port"] if self["dp-port"] is not None else "5678"
        try:
            self["dp-port"] = parse_port(value)
        except ValueError as e:
            raise _fail(f"--dp-port: {value!r} {e}") from None
        self.dp_insecure = bool(self["insecure"])
        if self["dp-interface"] is None:
            # Without TLS anyone who reaches the port can be any dataplane: loopback only.
            alone = self.dp_insecure and self.tls is None
            self["dp-interface"] = "127.0.0.1" if alone else "0.0.0.0"

    def _check_role(self, role: str) -> None:
        """The role is known, and the flags given are ones it takes."""
        if role not in _ROLES:
            raise _fail(f"--role: {role!r} must be zone, global or dataplane")
        for parameter in self.optParameters:
            flag, default = str(parameter[0]), parameter[2]
            roles = _roles_of(flag)
            # A flag whose value is its default is taken as not given.
            if roles is not None and role not in roles and self[flag] != default:
                raise _fail(
                    f"--{flag}: {self[flag]!r} is for --role={' or '.join(roles)}, not {role}"
                )
        if role != "zone":
            return
        zone = self["zone"]
        if zone is None:
            raise _fail("--zone: a zone name is required with --role=zone")
        if not ZONE_NAME.match(zone):
            raise _fail(
                f"--zone: {zone!r} is not a valid zone name "
                "(lower-case letters, digits and '-', at most 63)"
            )

    def _dataplane_options(self) -> None:
        """The dataplane role's options: where the zone is, who this is, where to serve."""
        for flag, given, default in (
            ("dns-port", self["dns-port"], DATAPLANE_DNS_PORT),
            ("diagnostics-port", self["diagnostics-port"], None),
        ):
            value = given if given is not None else default
            try:
                self[flag] = parse_port(value)
            except ValueError as e:
                raise _fail(f"--{flag}: {value!r} {e}") from None
        self.dns = DnsServerConfig(port=self["dns-port"])
        given = self["dns-interface"]
        interfaces = given if given is not None else DATAPLANE_DNS_INTERFACES
        self.dns_interfaces_default = given is None
        self.dns_interfaces = parse_interfaces(interfaces, "--dns-interface")
        self["dns-interface"] = interfaces
        if self["cp-address"] is None:
            raise _fail(
                "--cp-address: the zone control plane's HOST[:PORT] is required "
                "with --role=dataplane"
            )
        self.cp_address = parse_address(self["cp-address"], "--cp-address", DATAPLANE_CP_PORT)
        self.tls = self._tls(syncs=True, dataplane=True)
        self.mesh, self.name = self._dataplane_identity()
        resolv_conf = self["resolv-conf"] or DEFAULT_RESOLV_CONF
        if os.path.isdir(resolv_conf):
            raise _fail(f"--resolv-conf: {resolv_conf!r} is a directory")
        self["resolv-conf"] = resolv_conf
        self["data-dir"] = self["data-dir"] or os.path.join("kumazone-data", self.name)

    def _dataplane_identity(self) -> tuple[str, str]:
        """(mesh, name): the certificate's with TLS, else --mesh and --name."""
        if self.tls is not None:
            identity = dataplane_identity(self.tls.private.original)
            if identity is None:
                raise _fail(
                    f"--tls-cert: {self['tls-cert']!r} names no dataplane "
                    "(make one with `kumazone certs --dataplane MESH/NAME`)"
                )
            for flag, held in zip(("mesh", "name"), identity, strict=True):
                if self[flag] is not None and self[flag] != held:
                    raise _fail(
                        f"--{flag}: {self[flag]!r} is not the certificate's {held!r} "
                        "(with TLS the certificate says who this dataplane is)"
                    )
            mesh, name = identity
        else:
            mesh = self["mesh"] if self["mesh"] is not None else "default"
            name = self["name"] if self["name"] is not None else socket.gethostname()
            try:
                check_mesh_name(mesh)
            except ResourceError:
                raise _fail(
                    f"--mesh: {mesh!r} is not a valid mesh name (letters, digits, '.', '-' "
                    "and '_', starting and ending with a letter or digit, at most 63)"
                ) from None
        if not _DATAPLANE_NAME.match(name):
            raise _fail(
                f"--name: {name!r} is not a valid dataplane name (letters, digits, '.', '-' "
                "and '_', starting and ending with a letter or digit, at most 253)"
            )
        return mesh, name

    def _limits(self) -> ZoneLimits:
        """The per-zone limits of the global, from the C{--kds-zone-max-*} flags."""
        values: dict[str, float] = {}
        for flag, field, kind in (
            ("kds-zone-max-services", "max_services", int),
            ("kds-zone-max-parts", "max_parts", int),
            ("kds-zone-max-messages-per-second", "max_messages_per_second", float),
            ("kds-zone-max-pending-bytes", "max_pending_octets", int),
        ):
            try:
                value = kind(self[flag])
            except ValueError:
                value = 0
            if not 0 < value < 1 << 62:
                raise _fail(f"--{flag}: {self[flag]!r} must be a positive number")
            values[field] = value
        flag = "kds-zone-refusal-cooldown"
        try:
            cooldown = float(self[flag])
        except ValueError:
            cooldown = -1.0
        if not 0 <= cooldown <= Cooldowns.LONGEST:
            raise _fail(f"--{flag}: {self[flag]!r} must be a number of seconds in [0, 300]")
        values["refusal_cooldown"] = cooldown
        flag = "kds-zone-max-range-share"
        try:
            share = float(self[flag])
        except ValueError:
            share = 0.0
        if not 0 < share <= 1:
            raise _fail(f"--{flag}: {self[flag]!r} must be a fraction in (0, 1]")
        values["max_range_share"] = share
        return ZoneLimits(**values)  # type: ignore[arg-type]

    def _dns_config(self) -> DnsServerConfig:
        """The dnsServer config: the --config file, the environment, then the flags."""
        text = None
        if self["config"] is not None:
            try:
                with open(self["config"], encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise _fail(f"--config: {self['config']!r} cannot be read ({e})") from None
        try:
            return load_config(
                text,
                os.environ,
                {"port": self["dns-port"], "nameserver_addresses": self["nameserver-addresses"]},
                source_name=self["config"] or "",
            )
        except ConfigError as e:
            raise _fail(str(e)) from None

    def _tls(self, syncs: bool, dataplane: bool = False) -> TLSFiles | None:
        """The TLS files, loaded and checked whenever given; required when C{syncs}."""
        given = [f for f in ("tls-cert", "tls-key", "tls-ca") if self[f] is not None]
        if not given:
            if self["insecure"] or not syncs:
                return None
            if dataplane:
                raise _fail(
                    "dataplane sync needs --tls-cert, --tls-key and --tls-ca (make them with "
                    "`kumazone certs --dataplane MESH/NAME`), or --insecure to sync without TLS"
                )
            raise _fail(
                "zone sync needs --tls-cert, --tls-key and --tls-ca "
                "(make them with `kumazone certs`), or --insecure to sync without TLS"
            )
        if len(given) != 3:
            missing = sorted({"tls-cert", "tls-key", "tls-ca"} - set(given))
            raise _fail(f"--{missing[0]}: missing (TLS needs --tls-cert, --tls-key and --tls-ca)")
        try:
            return TLSFiles(self["tls-cert"], self["tls-key"], self["tls-ca"])
        except ValueError as e:
            raise _fail(f"--tls-cert: {e}") from None

    def _postgres_url(self, url: str, role: str) -> str:
        from kumazone.store.urls import check_url

        try:
            check_url(url)
        except ValueError as e:
            raise _fail(f"--store: {e}") from None
        if role == "global" and self["kds-port"] in ("0", 0):
            raise _fail("--kds-port: replicas of the global need a fixed zone sync port")
        return url

    @staticmethod
    def _store_path(url: str | None, data_dir: str) -> str:
        if url is None:
            return os.path.join(data_dir, "kumazone.sqlite3")
        if url.startswith("sqlite:///"):
            return url[len("sqlite://") :]
        if url.startswith("sqlite://"):
            return url[len("sqlite://") :]
        raise _fail(
            f"--store: {url!r} is not supported (use sqlite:///PATH or postgresql://USER@HOST/DB)"
        )


def parse_global(value: str) -> tuple[str, int]:
    """C{HOST}, C{HOST:PORT} or C{[IPv6]:PORT} to (host, port); port 5685 by default."""
    return parse_address(value, "--global", 5685)


def parse_globals(value: str) -> tuple[tuple[str, int], ...]:
    """Comma-separated L{parse_global} addresses (the global's replicas), each once, in order."""
    found: list[tuple[str, int]] = []
    for item in value.split(","):
        text = item.strip()
        if not text and "," in value:
            raise _fail(f"--global: {value!r} has an empty address")
        address = parse_global(text)
        if address not in found:
            found.append(address)
    return tuple(found)


def parse_address(value: str, flag: str, default_port: int) -> tuple[str, int]:
    """C{HOST}, C{HOST:PORT} or C{[IPv6]:PORT} to (host, port), errors naming C{flag}."""
    host, port = value, str(default_port)
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise _fail(f"{flag}: {value!r} is not HOST[:PORT]")
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host:
        raise _fail(f"{flag}: {value!r} has no host")
    try:
        number = parse_port(port)
    except ValueError as e:
        raise _fail(f"{flag}: {value!r} port {e}") from None
    if number == 0:
        raise _fail(f"{flag}: {value!r} needs a port other than 0")
    return host, number


def parse_interfaces(value: str, flag: str) -> tuple[str, ...]:
    """Comma-separated IP addresses to listen on (each once), errors naming C{flag}."""
    addresses: list[str] = []
    for item in value.split(","):
        text = item.strip()
        if not text:
            continue
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            raise _fail(f"{flag}: {value!r} holds {text!r}, which is not an IP address") from None
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _fail(f"{flag}: {value!r} names no address")
    return tuple(addresses)


def makeService(options: Options) -> Any:
    """Assemble the service; binds nothing."""
    from twisted.internet import reactor

    if options["role"] == "dataplane":
        # Imported here: the control planes need none of the dataplane's machinery.
        from kumazone.dataplane.service import DataplaneService, DataplaneSettings

        return DataplaneService(
            DataplaneSettings(
                mesh=options.mesh,
                name=options.name,
                cp_address=options.cp_address,
                data_dir=options["data-dir"],
                tls=options.tls,
                dns_port=options["dns-port"],
                dns_interfaces=options.dns_interfaces,
                dns_interfaces_default=options.dns_interfaces_default,
                diagnostics_port=options["diagnostics-port"],
                diagnostics_interface=options["diagnostics-interface"],
                resolv_conf=options["resolv-conf"],
            ),
            reactor,
        )

    # What both roles take alike.
    common: dict[str, Any] = {
        "dns": options.dns,
        "data_dir": options["data-dir"],
        "store_path": options.store_path,
        "api_port": options["api-port"],
        "api_interface": options["api-interface"],
        "diagnostics_port": options["diagnostics-port"],
        "diagnostics_interface": options["diagnostics-interface"],
        "tls": options.tls,
    }
    if options["role"] == "global":
        settings = GlobalSettings(
            kds_port=options["kds-port"],
            kds_interface=options["kds-interface"],
            limits=options.limits,
            store_url=options.store_url,
            advertise_address=options["advertise-address"],
            **common,
        )
        return GlobalService(settings, reactor)
    return ZoneService(
        ZoneSettings(
            zone=options["zone"],
            resources_dir=options["resources"],
            dns_interface=options["dns-interface"],
            global_address=options.global_address,
            global_fallbacks=options.global_addresses[1:],
            store_url=options.store_url,
            dp_port=options["dp-port"],
            dp_interface=options["dp-interface"],
            dp_tls=options.tls,
            dp_insecure=options.dp_insecure,
            **common,
        ),
        reactor,
    )
