"""kumazone.tap: the twistd options and the service they assemble, in-process.

Every bad value stops start-up with one line, ``kumazone: --flag: 'value' ...``;
these tests read that line from the C{SystemExit} that L{Options.parseOptions}
raises.  No sockets and no processes: files live in C{tmp_path}, certificates are
made in-process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from kumazone.global_service import GlobalService
from kumazone.sync.certs import make_certs
from kumazone.sync.tls import TLSFiles
from kumazone.tap import Options, makeService, parse_global
from kumazone.zone_service import ZoneService

ZONE = "--zone=zone-1"


@pytest.fixture(autouse=True)
def no_kuma_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The options read KUMA_* variables; the tests' own environment must not leak in."""
    for variable in [v for v in os.environ if v.startswith("KUMA_")]:
        monkeypatch.delenv(variable)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(out, ["localhost"], ["zone-1"])
    return out


def tls_flags(certs: Path, stem: str) -> dict[str, str]:
    return {
        "tls-cert": str(certs / f"{stem}.pem"),
        "tls-key": str(certs / f"{stem}-key.pem"),
        "tls-ca": str(certs / "ca.pem"),
    }


def as_argv(flags: dict[str, str]) -> list[str]:
    return [f"--{flag}={value}" for flag, value in flags.items()]


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def refused(*argv: str) -> str:
    """The one line start-up stops with."""
    with pytest.raises(SystemExit) as stopped:
        parse(*argv)
    message = stopped.value.code
    assert isinstance(message, str), message
    assert message.startswith("kumazone: "), message
    assert "\n" not in message, message
    return message


def assert_names(message: str, *words: str) -> None:
    for word in words:
        assert word in message, (word, message)


# -- every flag: its default and a given value ----------------------------------------

PARAMETERS = {flag for flag, _short, _default, _doc in Options.optParameters}
FLAGS = {flag for flag, _short, _doc in Options.optFlags}

#: What parseOptions leaves in options[flag] when the flag is not given (role zone).
DEFAULTS: dict[str, Any] = {
    "role": "zone",
    "zone": None,  # required with --role=zone: given as zone-1 here
    "global": None,
    "config": None,
    "resources": None,
    "data-dir": os.path.join("kumazone-data", "zone-1"),
    "store": None,
    "dns-port": None,
    "dns-interface": "0.0.0.0",
    "diagnostics-port": 5680,
    "diagnostics-interface": "127.0.0.1",
    "nameserver-addresses": None,
    "api-port": 5681,
    "api-interface": "127.0.0.1",
    "kds-port": 5685,
    "kds-interface": "0.0.0.0",
    "advertise-address": None,
    "kds-zone-max-services": "10000",
    "kds-zone-max-parts": "64",
    "kds-zone-max-messages-per-second": "100",
    "kds-zone-max-pending-bytes": str(32 << 20),
    "kds-zone-refusal-cooldown": "5",
    "kds-zone-max-range-share": "0.5",
    "dp-port": 5678,
    "dp-interface": "0.0.0.0",
    "cp-address": None,  # the dataplane's flags: see "role dataplane" below
    "mesh": None,
    "name": None,
    "resolv-conf": None,
    "tls-cert": None,
    "tls-key": None,
    "tls-ca": None,
    "insecure": 0,
}


def test_every_flag_has_a_default_here() -> None:
    assert set(DEFAULTS) == PARAMETERS | FLAGS


@pytest.mark.parametrize("flag", sorted(set(DEFAULTS) - {"zone"}))
def test_default(flag: str) -> None:
    assert parse(ZONE)[flag] == DEFAULTS[flag]


def test_defaults_of_what_the_options_compute() -> None:
    options = parse(ZONE)
    assert options.global_address is None
    assert options.tls is None
    assert options.dns.port == 5653
    assert options.dns.domain == "mesh"
    assert options.store_path == os.path.join("kumazone-data", "zone-1", "kumazone.sqlite3")


#: flag -> (value given, what options[flag] holds after parsing)
GIVEN: dict[str, tuple[str, Any]] = {
    "data-dir": ("/srv/kumazone/zone-1", "/srv/kumazone/zone-1"),
    "dns-port": ("53", "53"),  # parsed into options.dns.port, see below
    "dns-interface": ("127.0.0.1", "127.0.0.1"),
    "diagnostics-port": ("9000", 9000),
    "diagnostics-interface": ("0.0.0.0", "0.0.0.0"),
    "nameserver-addresses": ("192.0.2.53", "192.0.2.53"),  # and options.dns, see below
    "api-port": ("0", 0),
    "api-interface": ("::1", "::1"),
    "kds-port": ("65535", 65535),
    "kds-interface": ("192.0.2.1", "192.0.2.1"),
    "dp-port": ("0", 0),
    "dp-interface": ("192.0.2.1", "192.0.2.1"),
}


#: Flags whose given values have tests of their own (below) rather than a GIVEN entry.
GIVEN_ELSEWHERE = {"role", "zone", "global", "config", "resources", "store", "insecure"}
GIVEN_ELSEWHERE |= {"tls-cert", "tls-key", "tls-ca"}
# Replicas of the global: test_advertise_address_is_for_replicas_of_the_global.
GIVEN_ELSEWHERE |= {"advertise-address"}
# The per-zone limits: tests/unit/test_limits.py.
GIVEN_ELSEWHERE |= {f"kds-zone-max-{n}" for n in ("services", "parts", "pending-bytes")}
GIVEN_ELSEWHERE |= {"kds-zone-max-messages-per-second", "kds-zone-refusal-cooldown"}
GIVEN_ELSEWHERE |= {"kds-zone-max-range-share"}
# The dataplane role's own flags: "role dataplane" below.
GIVEN_ELSEWHERE |= {"cp-address", "mesh", "name", "resolv-conf"}


def test_every_flag_has_a_given_value_test() -> None:
    assert set(GIVEN) | GIVEN_ELSEWHERE == PARAMETERS | FLAGS
    assert not set(GIVEN) & GIVEN_ELSEWHERE


@pytest.mark.parametrize("flag", sorted(GIVEN))
def test_given_value(flag: str) -> None:
    value, expected = GIVEN[flag]
    options = parse(ZONE, f"--{flag}={value}")
    assert options[flag] == expected
    others = {f: DEFAULTS[f] for f in DEFAULTS if f not in (flag, "zone", "data-dir")}
    assert {f: options[f] for f in others} == others


def test_given_zone() -> None:
    options = parse("--zone=zone-7")
    assert options["zone"] == "zone-7"
    assert options["data-dir"] == os.path.join("kumazone-data", "zone-7")


def test_given_dns_port_sets_the_dns_config() -> None:
    assert parse(ZONE, "--dns-port=53").dns.port == 53
    assert parse(ZONE, "--dns-port=0").dns.port == 0


def test_given_data_dir_holds_the_default_store() -> None:
    options = parse(ZONE, "--data-dir=/srv/kz")
    assert options.store_path == os.path.join("/srv/kz", "kumazone.sqlite3")


def test_given_role_global() -> None:
    options = parse("--role=global", "--insecure")
    assert options["role"] == "global"
    assert options["insecure"] == 1
    assert options["zone"] is None


def test_insecure_on_a_standalone_zone_changes_nothing() -> None:
    options = parse(ZONE, "--insecure")
    assert options["insecure"] == 1
    assert options.tls is None
    assert options.global_address is None


def test_unknown_flag_is_a_usage_error() -> None:
    with pytest.raises(usage.UsageError, match="bogus"):
        parse(ZONE, "--bogus=1")


# -- --role and --zone --------------------------------------------------------------------


@pytest.mark.parametrize("role", ["Dataplane", "Zone", "", "global,zone", "data-plane"])
def test_bad_role(role: str) -> None:
    message = refused(f"--role={role}", ZONE)
    assert_names(message, "--role", repr(role), "zone, global or dataplane")


def test_zone_is_required_with_role_zone() -> None:
    assert_names(refused(), "--zone", "--role=zone", "required")
    assert_names(refused("--role=zone"), "--zone", "--role=zone", "required")


@pytest.mark.parametrize(
    "zone", ["Zone-1", "zone_1", "-zone", "zone-", "zone.1", "", "z" * 64, "zöne"]
)
def test_invalid_zone(zone: str) -> None:
    assert_names(refused(f"--zone={zone}"), "--zone", repr(zone), "not a valid zone name")


def test_longest_zone_name_is_accepted() -> None:
    assert parse("--zone=" + "z" * 63)["zone"] == "z" * 63


@pytest.mark.parametrize("flag", ["zone", "global", "resources"])
def test_zone_only_flags_with_role_global(flag: str, tmp_path: Path) -> None:
    value = {"zone": "zone-1", "global": "global.example", "resources": str(tmp_path)}[flag]
    message = refused("--role=global", "--insecure", f"--{flag}={value}")
    assert_names(message, f"--{flag}", repr(value), "--role=zone")


# -- ports ------------------------------------------------------------------------------

PORT_FLAGS = ["dns-port", "diagnostics-port", "api-port", "kds-port"]


@pytest.mark.parametrize("flag", PORT_FLAGS)
@pytest.mark.parametrize("value", ["65536", "70000", "-1"])
def test_port_out_of_range(flag: str, value: str) -> None:
    assert_names(refused(ZONE, f"--{flag}={value}"), f"--{flag}", repr(value), "out of range")


@pytest.mark.parametrize("flag", PORT_FLAGS)
@pytest.mark.parametrize("value", ["http", "", "80.5", "0x50"])
def test_port_not_a_number(flag: str, value: str) -> None:
    message = refused(ZONE, f"--{flag}={value}")
    assert_names(message, f"--{flag}", repr(value), "not a port number")


@pytest.mark.parametrize("flag", PORT_FLAGS)
@pytest.mark.parametrize("value", [0, 65535])
def test_port_at_the_ends_of_the_range(flag: str, value: int) -> None:
    options = parse(ZONE, f"--{flag}={value}")
    assert (options.dns.port if flag == "dns-port" else options[flag]) == value


# -- TLS and --insecure -----------------------------------------------------------------


@pytest.mark.parametrize("missing", ["tls-cert", "tls-key", "tls-ca"])
@pytest.mark.parametrize("role", ["global", "zone"])
def test_partial_tls_flags(certs: Path, missing: str, role: str) -> None:
    stem = "global" if role == "global" else "zone-1"
    given = {flag: path for flag, path in tls_flags(certs, stem).items() if flag != missing}
    syncs = ["--role=global"] if role == "global" else [ZONE, "--global=localhost"]
    message = refused(*syncs, *as_argv(given))
    assert_names(message, f"--{missing}: missing", "--tls-cert, --tls-key and --tls-ca")


def test_two_tls_flags_missing_names_the_first() -> None:
    message = refused("--role=global", "--tls-key=/k.pem")
    assert_names(message, "--tls-ca: missing")


def test_all_tls_flags_load_the_files(certs: Path) -> None:
    options = parse("--role=global", *as_argv(tls_flags(certs, "global")))
    assert isinstance(options.tls, TLSFiles)
    options = parse(ZONE, "--global=localhost", *as_argv(tls_flags(certs, "zone-1")))
    assert isinstance(options.tls, TLSFiles)
    assert options["tls-cert"] == str(certs / "zone-1.pem")


def test_tls_files_that_cannot_be_read(tmp_path: Path) -> None:
    flags = {f: str(tmp_path / f"{f}.pem") for f in ("tls-cert", "tls-key", "tls-ca")}
    message = refused("--role=global", *as_argv(flags))
    assert_names(message, "--tls-cert", "cannot read TLS files", str(tmp_path / "tls-cert.pem"))


def test_tls_files_that_do_not_load(tmp_path: Path) -> None:
    flags = {}
    for flag in ("tls-cert", "tls-key", "tls-ca"):
        path = tmp_path / f"{flag}.pem"
        path.write_text("not a certificate\n")
        flags[flag] = str(path)
    message = refused("--role=global", *as_argv(flags))
    assert_names(message, "--tls-cert", "do not load", flags["tls-cert"])


def test_global_without_tls_or_insecure_is_refused() -> None:
    message = refused("--role=global")
    assert_names(message, "--tls-cert", "--tls-key", "--tls-ca", "--insecure")


def test_global_with_insecure_has_no_tls() -> None:
    assert parse("--role=global", "--insecure").tls is None


def test_zone_syncing_without_tls_or_insecure_is_refused() -> None:
    message = refused(ZONE, "--global=global.example")
    assert_names(message, "--tls-cert", "--tls-key", "--tls-ca", "--insecure")


def test_zone_syncing_with_insecure_has_no_tls() -> None:
    options = parse(ZONE, "--global=global.example", "--insecure")
    assert options.tls is None
    assert options.global_address == ("global.example", 5685)


def test_insecure_beside_tls_flags_keeps_tls(certs: Path) -> None:
    options = parse("--role=global", "--insecure", *as_argv(tls_flags(certs, "global")))
    assert isinstance(options.tls, TLSFiles)


# -- --global -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, address",
    [
        ("global.example", ("global.example", 5685)),
        ("global.example:7000", ("global.example", 7000)),
        ("192.0.2.1", ("192.0.2.1", 5685)),
        ("192.0.2.1:65535", ("192.0.2.1", 65535)),
        ("[2001:db8::1]:7000", ("2001:db8::1", 7000)),
        ("[2001:db8::1]", ("2001:db8::1", 5685)),
        ("2001:db8::1", ("2001:db8::1", 5685)),
    ],
)
def test_parse_global(value: str, address: tuple[str, int]) -> None:
    assert parse_global(value) == address
    assert parse(ZONE, f"--global={value}", "--insecure").global_address == address


@pytest.mark.parametrize(
    "value, words",
    [
        ("", ["has no host"]),
        (":7000", ["has no host"]),
        ("[]:7000", ["has no host"]),
        ("[]", ["has no host"]),
        ("global.example:0", ["a port other than 0"]),
        ("[2001:db8::1]:0", ["a port other than 0"]),
        ("global.example:70000", ["port", "out of range"]),
        ("global.example:http", ["port", "not a port number"]),
        ("global.example:", ["port", "not a port number"]),
        ("[2001:db8::1]:", ["port", "not a port number"]),
        ("[2001:db8::1]x", ["is not HOST[:PORT]"]),
        ("[2001:db8::1]7000", ["is not HOST[:PORT]"]),
    ],
)
def test_bad_global(value: str, words: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_global(value)
    message = str(stopped.value.code)
    assert message.startswith("kumazone: --global: "), message
    assert_names(message, repr(value), *words)
    # The same line through the options.
    assert refused(ZONE, f"--global={value}", "--insecure") == message


def test_the_replicas_of_the_global_are_a_list_tried_in_its_order() -> None:
    options = parse(
        ZONE, "--global=g1.example, g2.example:7000,[2001:db8::1]:7001,g1.example", "--insecure"
    )
    assert options.global_addresses == (
        ("g1.example", 5685),
        ("g2.example", 7000),
        ("2001:db8::1", 7001),
    )
    assert options.global_address == ("g1.example", 5685)
    service = makeService(options)
    assert isinstance(service, ZoneService)
    assert service.settings.global_fallbacks == (("g2.example", 7000), ("2001:db8::1", 7001))


@pytest.mark.parametrize("value", ["g1.example,,g2.example", "g1.example,", ",g1.example"])
def test_a_list_of_globals_with_an_empty_entry_is_refused(value: str) -> None:
    message = refused(ZONE, f"--global={value}", "--insecure")
    assert message.startswith("kumazone: --global: "), message
    assert "empty address" in message


# -- --store ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, path",
    [
        ("sqlite:///var/lib/kumazone/zone-1.sqlite3", "/var/lib/kumazone/zone-1.sqlite3"),
        ("sqlite://state/zone-1.sqlite3", "state/zone-1.sqlite3"),
        ("sqlite://:memory:", ":memory:"),
    ],
)
def test_store(url: str, path: str) -> None:
    options = parse(ZONE, f"--store={url}", "--data-dir=/srv/kz")
    assert options["store"] == url
    assert options.store_path == path


@pytest.mark.parametrize("url", ["sqlite:/relative", "/var/lib/kz.sqlite3", "", "SQLITE:///x"])
def test_unsupported_store(url: str) -> None:
    assert_names(refused(ZONE, f"--store={url}"), "--store", repr(url), "not supported")


def test_a_postgresql_store_makes_replicas_of_the_global() -> None:
    url = "postgresql://kumazone@db.example/kumazone"
    options = parse("--role=global", "--insecure", f"--store={url}")
    service = makeService(options)
    assert service.settings.store_url == url  # type: ignore[attr-defined]


def test_a_postgresql_store_makes_replicas_of_a_standalone_zone() -> None:
    url = "postgresql://kumazone@db.example:5432/kumazone"
    options = parse(ZONE, f"--store={url}")
    assert options.store_url == url
    service = makeService(options)
    assert isinstance(service, ZoneService)
    assert service.settings.store_url == url


def test_a_postgresql_store_makes_replicas_of_a_zone_synced_with_a_global() -> None:
    url = "postgresql://kumazone@db.example:5432/kumazone"
    options = parse(ZONE, f"--store={url}", "--global=g1.example,g2.example", "--insecure")
    service = makeService(options)
    assert isinstance(service, ZoneService)
    assert service.settings.store_url == url
    assert service.settings.global_address == ("g1.example", 5685)
    assert service.settings.global_fallbacks == (("g2.example", 5685),)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--store=postgresql://kz:s3cret@db.example/kz"], ["PGPASSWORD"]),
        (["--store=postgres://db.example"], ["names a host and a database"]),
        (
            [
                "--role=global",
                "--insecure",
                "--kds-port=0",
                "--store=postgresql://kz@db.example/kz",
            ],
            ["--kds-port", "fixed"],
        ),
        (["--role=global", "--insecure", "--advertise-address=g1"], ["--advertise-address"]),
        (["--advertise-address=g1", "--store=postgresql://kz@db.example/kz"], ["--role=global"]),
    ],
)
def test_postgresql_stores_refused_say_why(argv: list[str], words: list[str]) -> None:
    message = refused(ZONE, *argv) if argv[0].startswith("--store") else refused(*argv)
    assert_names(message, *words)
    assert "s3cret" not in message


# -- --config -----------------------------------------------------------------------------


def test_config_file_sets_the_dns_config(tmp_path: Path) -> None:
    config = tmp_path / "kumazone.yaml"
    config.write_text(
        "dnsServer:\n  domain: mesh.internal\n  port: 5300\n  CIDR: 10.64.0.0/16\n  ttl: 30\n"
    )
    options = parse(ZONE, f"--config={config}")
    assert options["config"] == str(config)
    assert (options.dns.domain, options.dns.port, str(options.dns.cidr), options.dns.ttl) == (
        "mesh.internal",
        5300,
        "10.64.0.0/16",
        30,
    )


def test_environment_over_the_file_and_the_flag_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kumazone.yaml"
    config.write_text("dnsServer:\n  port: 5300\n  ttl: 30\n")
    monkeypatch.setenv("KUMA_DNS_SERVER_PORT", "5400")
    options = parse(ZONE, f"--config={config}")
    assert (options.dns.port, options.dns.ttl) == (5400, 30)
    assert parse(ZONE, f"--config={config}", "--dns-port=5500").dns.port == 5500


def test_config_file_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.yaml")
    assert_names(refused(ZONE, f"--config={path}"), "--config", repr(path), "cannot be read")


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    assert_names(
        refused(ZONE, f"--config={tmp_path}"), "--config", repr(str(tmp_path)), "cannot be read"
    )


def test_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"dnsServer:\n  domain: caf\xe9\n")
    assert_names(refused(ZONE, f"--config={path}"), "--config", repr(str(path)), "cannot be read")


@pytest.mark.parametrize(
    "text, words",
    [
        ("dnsServer:\n  bogus: 1\n", ["dnsServer.bogus", "1", "unknown key"]),
        ("dnsServer: {}\nnetworking: {}\n", ["networking", "unknown key"]),
        ("dnsServer:\n  ttl: abc\n", ["dnsServer.ttl", "'abc'"]),
        ("dnsServer:\n  port: 70000\n", ["dnsServer.port", "70000"]),
    ],
)
def test_config_file_with_a_bad_key_or_value(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "kumazone.yaml"
    path.write_text(text)
    assert_names(refused(ZONE, f"--config={path}"), *words)


def test_config_file_that_is_not_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kumazone.yaml"
    path.write_text("dnsServer: [unclosed\n")
    assert_names(refused(ZONE, f"--config={path}"), str(path), "not valid YAML")


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUMA_DNS_SERVER_CIDR", "10.0.0.0/33")
    assert_names(refused(ZONE), "KUMA_DNS_SERVER_CIDR", "10.0.0.0/33")


# -- --resources and --data-dir -------------------------------------------------------------


def test_resources_directory(tmp_path: Path) -> None:
    assert parse(ZONE, f"--resources={tmp_path}")["resources"] == str(tmp_path)


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_resources_not_a_directory(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "resources"
    if kind == "a file":
        path.write_text("type: Mesh\nname: default\n")
    message = refused(ZONE, f"--resources={path}")
    assert_names(message, "--resources", repr(str(path)), "not a directory")


@pytest.mark.parametrize(
    "argv, data_dir",
    [
        ([ZONE], os.path.join("kumazone-data", "zone-1")),
        (["--zone=eu-west"], os.path.join("kumazone-data", "eu-west")),
        (["--role=global", "--insecure"], os.path.join("kumazone-data", "global")),
        ([ZONE, "--data-dir=/srv/kz"], "/srv/kz"),
        (["--role=global", "--insecure", "--data-dir=/srv/kz"], "/srv/kz"),
    ],
)
def test_data_dir_default_per_role(argv: list[str], data_dir: str) -> None:
    options = parse(*argv)
    assert options["data-dir"] == data_dir
    assert options.store_path == os.path.join(data_dir, "kumazone.sqlite3")


# -- makeService ------------------------------------------------------------------------------


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a socket fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("makeService opened a socket")

    monkeypatch.setattr(socket.socket, "__init__", refuse)


def test_make_service_for_a_zone_binds_nothing(tmp_path: Path, no_sockets: None) -> None:
    resources = tmp_path / "resources"
    resources.mkdir()
    options = parse(
        "--zone=zone-7",
        f"--data-dir={tmp_path / 'data'}",
        f"--resources={resources}",
        "--global=[2001:db8::1]:7000",
        "--insecure",
        "--dns-port=0",
        "--api-port=0",
        "--diagnostics-port=0",
        "--dns-interface=127.0.0.1",
    )
    service = makeService(options)
    assert isinstance(service, ZoneService)
    settings = service.settings
    assert (settings.zone, settings.resources_dir, settings.global_address) == (
        "zone-7",
        str(resources),
        ("2001:db8::1", 7000),
    )
    assert (settings.api_port, settings.diagnostics_port, settings.dns.port) == (0, 0, 0)
    assert settings.dns_interface == "127.0.0.1"
    assert settings.store_path == str(tmp_path / "data" / "kumazone.sqlite3")
    assert settings.tls is None
    assert not service.running
    assert service.ports == {}
    assert list(service) == []
    assert service.zone is None
    assert not (tmp_path / "data").exists()


def test_make_service_for_the_global_binds_nothing(
    tmp_path: Path, certs: Path, no_sockets: None
) -> None:
    options = parse(
        "--role=global",
        f"--data-dir={tmp_path / 'data'}",
        "--kds-port=0",
        "--kds-interface=127.0.0.1",
        "--api-port=0",
        *as_argv(tls_flags(certs, "global")),
    )
    service = makeService(options)
    assert isinstance(service, GlobalService)
    settings = service.settings
    assert (settings.kds_port, settings.kds_interface, settings.api_port) == (0, "127.0.0.1", 0)
    assert settings.diagnostics_port == 5680
    assert settings.tls is options.tls
    assert not service.running
    assert service.ports == {}
    assert service.hub is None
    assert not (tmp_path / "data").exists()


def test_nameserver_addresses_flag_sets_the_dns_config() -> None:
    options = parse(ZONE, "--nameserver-addresses", "192.0.2.53, 2001:db8::53")
    assert options.dns.nameserver_addresses == ("192.0.2.53", "2001:db8::53")


def test_a_bad_nameserver_address_is_one_line() -> None:
    with pytest.raises(SystemExit) as e:
        parse(ZONE, "--nameserver-addresses", "ns.example")
    assert str(e.value) == (
        "kumazone: --nameserver-addresses: 'ns.example' holds 'ns.example', "
        "which is not an IP address"
    )


# -- the zone's dataplane port ------------------------------------------------------------


def test_zone_dataplane_port_is_off_without_tls_or_insecure() -> None:
    options = parse(ZONE)
    assert (options["dp-port"], options["dp-interface"]) == (5678, "0.0.0.0")
    assert options.tls is None
    assert not options.dp_insecure


def test_zone_dataplane_port_insecure_listens_on_loopback() -> None:
    options = parse(ZONE, "--insecure")
    assert options.dp_insecure
    assert options["dp-interface"] == "127.0.0.1"
    assert parse(ZONE, "--insecure", "--dp-interface=0.0.0.0")["dp-interface"] == "0.0.0.0"


def test_standalone_zone_loads_its_tls_files_for_the_dataplane_port(certs: Path) -> None:
    options = parse(ZONE, *as_argv(tls_flags(certs, "zone-1")))
    assert isinstance(options.tls, TLSFiles)
    assert options["dp-interface"] == "0.0.0.0"
    # --insecure beside the files: TLS all the same, and not loopback only.
    options = parse(ZONE, "--insecure", *as_argv(tls_flags(certs, "zone-1")))
    assert isinstance(options.tls, TLSFiles)
    assert options["dp-interface"] == "0.0.0.0"


@pytest.mark.parametrize("missing", ["tls-cert", "tls-key", "tls-ca"])
def test_standalone_zone_with_partial_tls_flags(certs: Path, missing: str) -> None:
    given = {flag: path for flag, path in tls_flags(certs, "zone-1").items() if flag != missing}
    message = refused(ZONE, *as_argv(given))
    assert_names(message, f"--{missing}: missing")


def test_standalone_zone_with_tls_files_that_do_not_load(tmp_path: Path) -> None:
    flags = {f: str(tmp_path / f"{f}.pem") for f in ("tls-cert", "tls-key", "tls-ca")}
    assert_names(refused(ZONE, *as_argv(flags)), "--tls-cert", "cannot read TLS files")


@pytest.mark.parametrize("value", ["65536", "http"])
def test_bad_dp_port(value: str) -> None:
    assert_names(refused(ZONE, f"--dp-port={value}"), "--dp-port", repr(value))


def test_make_service_for_a_zone_fills_the_dataplane_settings(
    tmp_path: Path, certs: Path, no_sockets: None
) -> None:
    options = parse(
        ZONE, f"--data-dir={tmp_path}", "--dp-port=0", *as_argv(tls_flags(certs, "zone-1"))
    )
    settings = makeService(options).settings
    assert (settings.dp_port, settings.dp_interface) == (0, "0.0.0.0")
    assert settings.dp_tls is options.tls
    assert not settings.dp_insecure
    settings = makeService(parse(ZONE, f"--data-dir={tmp_path}", "--insecure")).settings
    assert (settings.dp_tls, settings.dp_insecure, settings.dp_interface) == (
        None,
        True,
        "127.0.0.1",
    )


@pytest.mark.parametrize("flag", ["dp-port", "dp-interface"])
def test_dataplane_port_flags_with_role_global(flag: str) -> None:
    message = refused("--role=global", "--insecure", f"--{flag}=1")
    assert_names(message, f"--{flag}", "'1'", "is for --role=zone, not global")


# -- role dataplane -------------------------------------------------------------------------

DATAPLANE = ["--role=dataplane", "--cp-address=zone.example"]


@pytest.fixture(scope="module")
def dp_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp-certs")
    make_certs(
        out,
        ["localhost"],
        ["zone-1"],
        zone_hosts=["127.0.0.1"],
        dataplanes=["default/web-1", "other/db-1"],
    )
    return out


def test_dataplane_defaults() -> None:
    options = parse(*DATAPLANE, "--insecure")
    assert options.cp_address == ("zone.example", 5678)
    assert options["dns-port"] == 15053
    assert options.dns_interfaces == ("127.0.0.1", "::1")
    assert options.dns_interfaces_default
    assert options["diagnostics-port"] == 9902
    assert options["diagnostics-interface"] == "127.0.0.1"
    assert options["resolv-conf"] == "/etc/resolv.conf"
    assert options.tls is None
    assert options.mesh == "default"
    assert options.name == socket.gethostname()
    assert options["data-dir"] == os.path.join("kumazone-data", socket.gethostname())


def test_dataplane_given_values(tmp_path: Path) -> None:
    options = parse(
        "--role=dataplane",
        "--cp-address=[2001:db8::1]:7000",
        "--insecure",
        "--mesh=other",
        "--name=db-1",
        "--dns-port=0",
        "--dns-interface=127.0.0.1, 127.0.0.2,127.0.0.1",
        "--diagnostics-port=0",
        "--diagnostics-interface=0.0.0.0",
        f"--resolv-conf={tmp_path / 'resolv.conf'}",
        f"--data-dir={tmp_path / 'data'}",
    )
    assert options.cp_address == ("2001:db8::1", 7000)
    assert (options.mesh, options.name) == ("other", "db-1")
    assert options["dns-port"] == 0
    assert options.dns_interfaces == ("127.0.0.1", "127.0.0.2")
    assert not options.dns_interfaces_default
    assert (options["diagnostics-port"], options["diagnostics-interface"]) == (0, "0.0.0.0")
    assert options["resolv-conf"] == str(tmp_path / "resolv.conf")
    assert options["data-dir"] == str(tmp_path / "data")


def test_dataplane_data_dir_is_named_after_the_dataplane() -> None:
    options = parse(*DATAPLANE, "--insecure", "--name=web-1")
    assert options["data-dir"] == os.path.join("kumazone-data", "web-1")


def test_dataplane_needs_the_cp_address() -> None:
    message = refused("--role=dataplane", "--insecure")
    assert_names(message, "--cp-address", "required", "--role=dataplane")


@pytest.mark.parametrize(
    "value, words",
    [
        ("", ["has no host"]),
        ("zone.example:0", ["a port other than 0"]),
        ("zone.example:70000", ["port", "out of range"]),
        ("[2001:db8::1]x", ["is not HOST[:PORT]"]),
    ],
)
def test_bad_cp_address(value: str, words: list[str]) -> None:
    message = refused("--role=dataplane", f"--cp-address={value}", "--insecure")
    assert message.startswith("kumazone: --cp-address: "), message
    assert_names(message, repr(value), *words)


def test_dataplane_without_tls_or_insecure_is_refused() -> None:
    message = refused(*DATAPLANE)
    assert_names(message, "--tls-cert", "--tls-key", "--tls-ca", "--insecure", "--dataplane")


def test_dataplane_with_tls_takes_mesh_and_name_from_the_certificate(dp_certs: Path) -> None:
    options = parse(*DATAPLANE, *as_argv(tls_flags(dp_certs, "dp-other-db-1")))
    assert isinstance(options.tls, TLSFiles)
    assert (options.mesh, options.name) == ("other", "db-1")
    assert options["data-dir"] == os.path.join("kumazone-data", "db-1")
    # The same ones given again are fine.
    options = parse(
        *DATAPLANE, "--mesh=other", "--name=db-1", *as_argv(tls_flags(dp_certs, "dp-other-db-1"))
    )
    assert (options.mesh, options.name) == ("other", "db-1")


@pytest.mark.parametrize("flag, value", [("mesh", "default"), ("name", "web-1")])
def test_dataplane_with_tls_and_another_mesh_or_name(dp_certs: Path, flag: str, value: str) -> None:
    message = refused(
        *DATAPLANE, f"--{flag}={value}", *as_argv(tls_flags(dp_certs, "dp-other-db-1"))
    )
    assert_names(message, f"--{flag}", repr(value), "certificate")


def test_dataplane_with_a_certificate_that_names_no_dataplane(dp_certs: Path) -> None:
    message = refused(*DATAPLANE, *as_argv(tls_flags(dp_certs, "zone-1")))
    assert_names(message, "--tls-cert", "zone-1.pem", "names no dataplane")


@pytest.mark.parametrize("missing", ["tls-cert", "tls-key", "tls-ca"])
def test_dataplane_with_partial_tls_flags(dp_certs: Path, missing: str) -> None:
    flags = tls_flags(dp_certs, "dp-default-web-1")
    given = {flag: path for flag, path in flags.items() if flag != missing}
    assert_names(refused(*DATAPLANE, *as_argv(given)), f"--{missing}: missing")


@pytest.mark.parametrize("mesh", ["", "-bad", "a/b", "m" * 64])
def test_dataplane_bad_mesh(mesh: str) -> None:
    message = refused(*DATAPLANE, "--insecure", f"--mesh={mesh}")
    assert_names(message, "--mesh", repr(mesh), "not a valid mesh name")


@pytest.mark.parametrize("name", ["", "web/1", "-web", "n" * 254])
def test_dataplane_bad_name(name: str) -> None:
    message = refused(*DATAPLANE, "--insecure", f"--name={name}")
    assert_names(message, "--name", repr(name), "not a valid dataplane name")


@pytest.mark.parametrize("flag", ["dns-port", "diagnostics-port"])
@pytest.mark.parametrize("value", ["65536", "dns"])
def test_dataplane_bad_port(flag: str, value: str) -> None:
    assert_names(refused(*DATAPLANE, "--insecure", f"--{flag}={value}"), f"--{flag}", repr(value))


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1,nope", ",", ""])
def test_dataplane_bad_dns_interface(value: str) -> None:
    message = refused(*DATAPLANE, "--insecure", f"--dns-interface={value}")
    assert_names(message, "--dns-interface", repr(value))


def test_dataplane_resolv_conf_that_is_a_directory(tmp_path: Path) -> None:
    message = refused(*DATAPLANE, "--insecure", f"--resolv-conf={tmp_path}")
    assert_names(message, "--resolv-conf", repr(str(tmp_path)), "directory")


#: A flag of the control planes, and a value to give it.
CONTROL_PLANE_FLAGS = {
    "zone": "zone-1",
    "global": "global.example",
    "config": "kumazone.yaml",
    "resources": "zones",
    "store": "sqlite:///x",
    "nameserver-addresses": "192.0.2.53",
    "api-port": "0",
    "api-interface": "::1",
    "kds-port": "0",
    "kds-interface": "127.0.0.1",
    "kds-zone-max-services": "5",
    "kds-zone-max-parts": "5",
    "kds-zone-max-messages-per-second": "5",
    "kds-zone-max-pending-bytes": "5",
    "kds-zone-refusal-cooldown": "1",
    "kds-zone-max-range-share": "0.25",
    "dp-port": "0",
    "dp-interface": "127.0.0.1",
}


def test_every_flag_is_sorted_by_role() -> None:
    dataplane_flags = {"cp-address", "mesh", "name", "resolv-conf"}
    every_role = {"role", "data-dir", "dns-port", "dns-interface", "diagnostics-port"}
    every_role |= {"diagnostics-interface", "tls-cert", "tls-key", "tls-ca"}
    global_flags = {"advertise-address"}
    assert set(CONTROL_PLANE_FLAGS) | dataplane_flags | every_role | global_flags == PARAMETERS


@pytest.mark.parametrize("argv", [[ZONE], [*DATAPLANE, "--insecure"]])
def test_advertise_address_is_for_replicas_of_the_global(argv: list[str]) -> None:
    message = refused(*argv, "--advertise-address=g1.example")
    assert_names(message, "--advertise-address", "is for --role=global")
    url = "postgresql://kz@db.example/kz"
    options = parse("--role=global", "--insecure", f"--store={url}", "--advertise-address=g1")
    service = makeService(options)
    assert service.settings.advertise_address == "g1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("flag", sorted(CONTROL_PLANE_FLAGS))
def test_control_plane_flags_with_role_dataplane(flag: str) -> None:
    value = CONTROL_PLANE_FLAGS[flag]
    message = refused(*DATAPLANE, "--insecure", f"--{flag}={value}")
    roles = (
        "zone"
        if flag in ("zone", "global", "resources", "dp-port", "dp-interface")
        else ("zone or global")
    )
    assert_names(message, f"--{flag}", repr(value), f"is for --role={roles}, not dataplane")


@pytest.mark.parametrize("role", ["zone", "global"])
@pytest.mark.parametrize("flag", ["cp-address", "mesh", "name", "resolv-conf"])
def test_dataplane_flags_with_other_roles(role: str, flag: str) -> None:
    argv = [ZONE] if role == "zone" else ["--role=global", "--insecure"]
    message = refused(*argv, f"--{flag}=x")
    assert_names(message, f"--{flag}", "'x'", f"is for --role=dataplane, not {role}")


def test_make_service_for_a_dataplane_binds_nothing(
    tmp_path: Path, dp_certs: Path, no_sockets: None
) -> None:
    from kumazone.dataplane.service import DataplaneService

    options = parse(
        "--role=dataplane",
        "--cp-address=127.0.0.1:7000",
        f"--data-dir={tmp_path / 'data'}",
        "--dns-port=0",
        "--diagnostics-port=0",
        f"--resolv-conf={tmp_path / 'resolv.conf'}",
        *as_argv(tls_flags(dp_certs, "dp-default-web-1")),
    )
    service = makeService(options)
    assert isinstance(service, DataplaneService)
    settings = service.settings
    assert (settings.mesh, settings.name, settings.cp_address) == (
        "default",
        "web-1",
        ("127.0.0.1", 7000),
    )
    assert (settings.dns_port, settings.dns_interfaces, settings.diagnostics_port) == (
        0,
        ("127.0.0.1", "::1"),
        0,
    )
    assert settings.tls is options.tls
    assert settings.resolv_conf == str(tmp_path / "resolv.conf")
    assert not service.running
    assert service.ports == {}
    assert list(service) == []
    assert not (tmp_path / "data").exists()
