"""twistd plugin options and service assembly: `twistd -n kumazone --role=zone ...`.

Options are validated in L{Options.postOptions}; a bad value stops start-up with
one line naming it.  L{makeService} only assembles: nothing binds until the
service starts.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.python import usage

from kumazone.core.config import ConfigError, DnsServerConfig, load_config, parse_port
from kumazone.core.limits import Cooldowns, ZoneLimits
from kumazone.core.names import ZONE_NAME
from kumazone.global_service import GlobalService, GlobalSettings
from kumazone.sync.tls import TLSFiles
from kumazone.zone_service import ZoneService, ZoneSettings

__all__ = ["Options", "makeService"]


def _fail(message: str) -> SystemExit:
    """Start-up stops with this one line on stderr and exit status 1."""
    return SystemExit(f"kumazone: {message}")


class Options(usage.Options):
    """Command-line options of the kumazone plugin."""

    synopsis = "[options]"
    longdesc = (
        "Runs a kumazone control plane. --role=zone --zone=NAME runs a zone serving .mesh "
        "DNS from --resources and the HTTP API, standalone or synced with --global=HOST. "
        "--role=global runs the global control plane that zones sync with."
    )
    optParameters = [
        ["role", None, "zone", "zone or global."],
        ["zone", None, None, "The zone's name (role zone)."],
        ["global", None, None, "HOST[:PORT] of the global control plane (role zone)."],
        ["config", None, None, "YAML file with Kuma's dnsServer keys."],
        ["resources", None, None, "Directory of resource files (*.yaml, *.yml, *.json), watched."],
        ["data-dir", None, None, "State directory (default ./kumazone-data/<zone or global>)."],
        ["store", None, None, "Store URL (default sqlite:///<data-dir>/kumazone.sqlite3)."],
        ["dns-port", None, None, "DNS port, UDP and TCP (default 5653; 0 picks a free one)."],
        ["dns-interface", None, "0.0.0.0", "Address the DNS server listens on."],
        ["diagnostics-port", None, "5680", "Port of /ready, /healthy, /metrics (0: free)."],
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
        ["tls-cert", None, None, "PEM certificate for zone sync."],
        ["tls-key", None, None, "PEM private key for zone sync."],
        ["tls-ca", None, None, "PEM CA certificate that signs the peers' certificates."],
    ]
    optFlags = [
        ["insecure", None, "Allow zone sync without TLS certificates."],
    ]

    def postOptions(self) -> None:
        """Check every option; a bad one stops start-up with one line naming it."""
        role = self["role"]
        self._check_role(role)
        for flag in ("diagnostics-port", "api-port", "kds-port"):
            try:
                self[flag] = parse_port(self[flag])
            except ValueError as e:
                raise _fail(f"--{flag}: {self[flag]!r} {e}") from None
        self.global_address = None if self["global"] is None else parse_global(self["global"])
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
        self.store_path = self._store_path(self["store"], data_dir)

    def _check_role(self, role: str) -> None:
        """The role is known, and the flags given are ones it takes."""
        if role not in ("zone", "global"):
            raise _fail(f"--role: {role!r} must be zone or global")
        if role == "global":
            for flag in ("zone", "global", "resources"):
                if self[flag] is not None:
                    raise _fail(f"--{flag}: {self[flag]!r} is for --role=zone, not global")
            return
        zone = self["zone"]
        if zone is None:
            raise _fail("--zone: a zone name is required with --role=zone")
        if not ZONE_NAME.match(zone):
            raise _fail(
                f"--zone: {zone!r} is not a valid zone name "
                "(lower-case letters, digits and '-', at most 63)"
            )

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

    def _tls(self, syncs: bool) -> TLSFiles | None:
        given = [f for f in ("tls-cert", "tls-key", "tls-ca") if self[f] is not None]
        if not syncs:
            return None
        if not given:
            if self["insecure"]:
                return None
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

    @staticmethod
    def _store_path(url: str | None, data_dir: str) -> str:
        if url is None:
            return os.path.join(data_dir, "kumazone.sqlite3")
        if url.startswith("sqlite:///"):
            return url[len("sqlite://") :]
        if url.startswith("sqlite://"):
            return url[len("sqlite://") :]
        raise _fail(f"--store: {url!r} is not supported (use sqlite:///PATH)")


def parse_global(value: str) -> tuple[str, int]:
    """C{HOST}, C{HOST:PORT} or C{[IPv6]:PORT} to (host, port); port 5685 by default."""
    host, port = value, "5685"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise _fail(f"--global: {value!r} is not HOST[:PORT]")
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host:
        raise _fail(f"--global: {value!r} has no host")
    try:
        number = parse_port(port)
    except ValueError as e:
        raise _fail(f"--global: {value!r} port {e}") from None
    if number == 0:
        raise _fail(f"--global: {value!r} needs a port other than 0")
    return host, number


def makeService(options: Options) -> Any:
    """Assemble the service; binds nothing."""
    from twisted.internet import reactor

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
            **common,
        )
        return GlobalService(settings, reactor)
    return ZoneService(
        ZoneSettings(
            zone=options["zone"],
            resources_dir=options["resources"],
            dns_interface=options["dns-interface"],
            global_address=options.global_address,
            **common,
        ),
        reactor,
    )
