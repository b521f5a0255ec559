"""Tests for kumazone.core.config: YAML, then environment, then flags."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumazone.core.config import (
    DEFAULT_HOLD_DOWN,
    ConfigError,
    DnsServerConfig,
    default_nameserver_addresses,
    load_config,
    parse_port,
)

FULL_YAML = """\
dnsServer:
  domain: "corp"
  port: 1053
  CIDR: "10.64.0.0/16"
  CIDRv6: "fd00:1::/96"
  ttl: 30
"""


def assert_one_line_error(error: ConfigError, *parts: str) -> None:
    text = str(error)
    assert len(text.splitlines()) == 1, text
    assert text.strip() == text and text
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"


# -- defaults and sources ------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(None, {})
    assert config == DnsServerConfig()
    assert config.domain == "mesh"
    assert config.port == 5653
    assert config.cidr == IPv4Network("240.0.0.0/4")
    assert config.cidr6 == IPv6Network("fd00:fd00::/64")
    assert config.ttl == 60
    assert config.hold_down == DEFAULT_HOLD_DOWN == 3600.0


@pytest.mark.parametrize("text", ["", "# nothing\n", "dnsServer:\n", "dnsServer: {}\n"])
def test_empty_yaml_gives_defaults(text: str) -> None:
    assert load_config(text, {}) == DnsServerConfig()


def test_yaml_keys() -> None:
    config = load_config(FULL_YAML, {})
    assert config == DnsServerConfig(
        domain="corp",
        port=1053,
        cidr=IPv4Network("10.64.0.0/16"),
        cidr6=IPv6Network("fd00:1::/96"),
        ttl=30,
    )


def test_partial_yaml_keeps_other_defaults() -> None:
    config = load_config("dnsServer:\n  ttl: 5\n", {})
    assert config == DnsServerConfig(ttl=5)


def test_yaml_port_may_be_a_string() -> None:
    assert load_config('dnsServer: {port: "1053"}', {}).port == 1053


def test_port_zero_means_pick_a_free_one() -> None:
    assert load_config("dnsServer: {port: 0}", {}).port == 0


def test_domain_is_normalised() -> None:
    assert load_config('dnsServer: {domain: "Mesh.Example."}', {}).domain == "mesh.example"


def test_env_without_yaml() -> None:
    environ = {
        "KUMA_DNS_SERVER_DOMAIN": "envmesh",
        "KUMA_DNS_SERVER_PORT": "2053",
        "KUMA_DNS_SERVER_CIDR": "10.1.0.0/24",
        "KUMA_DNS_SERVER_CIDR_V6": "fd00:2::/64",
        "KUMA_DNS_SERVER_TTL": "120",
    }
    assert load_config(None, environ) == DnsServerConfig(
        domain="envmesh",
        port=2053,
        cidr=IPv4Network("10.1.0.0/24"),
        cidr6=IPv6Network("fd00:2::/64"),
        ttl=120,
    )


def test_env_overrides_yaml_key_by_key() -> None:
    config = load_config(FULL_YAML, {"KUMA_DNS_SERVER_PORT": "2053", "KUMA_DNS_SERVER_TTL": "90"})
    assert config.port == 2053
    assert config.ttl == 90
    # Keys without an environment variable keep the YAML value.
    assert config.domain == "corp"
    assert config.cidr == IPv4Network("10.64.0.0/16")


def test_unrelated_env_is_ignored() -> None:
    config = load_config(FULL_YAML, {"KUMA_DNS_SERVER_PORTS": "x", "PATH": "/bin"})
    assert config.port == 1053


def test_flags_override_env_and_yaml() -> None:
    config = load_config(
        FULL_YAML,
        {"KUMA_DNS_SERVER_PORT": "2053", "KUMA_DNS_SERVER_TTL": "90"},
        {"port": "3053"},
    )
    assert config.port == 3053
    assert config.ttl == 90
    assert config.domain == "corp"


def test_flags_of_every_field() -> None:
    config = load_config(
        None,
        {"KUMA_DNS_SERVER_DOMAIN": "envmesh"},
        {"domain": "flagmesh", "cidr": "10.9.0.0/24", "cidr6": "fd00:9::/64", "ttl": 7, "port": 0},
    )
    assert config == DnsServerConfig(
        domain="flagmesh",
        port=0,
        cidr=IPv4Network("10.9.0.0/24"),
        cidr6=IPv6Network("fd00:9::/64"),
        ttl=7,
    )


def test_flag_none_means_not_given() -> None:
    config = load_config(FULL_YAML, {"KUMA_DNS_SERVER_PORT": "2053"}, {"port": None})
    assert config.port == 2053


def test_hold_down_is_at_least_ten_ttls() -> None:
    assert DnsServerConfig(ttl=60).hold_down == 3600.0
    assert DnsServerConfig(ttl=360).hold_down == 3600.0
    assert DnsServerConfig(ttl=600).hold_down == 6000.0
    assert load_config("dnsServer: {ttl: 86400}", {}).hold_down == 864000.0


def test_smallest_cidr_allowed_is_a_slash_30() -> None:
    assert load_config('dnsServer: {CIDR: "10.0.0.0/30"}', {}).cidr == IPv4Network("10.0.0.0/30")


def test_cidr6_as_large_as_cidr_is_accepted() -> None:
    config = load_config('dnsServer: {CIDR: "10.0.0.0/24", CIDRv6: "fd00::/120"}', {})
    assert config.cidr6 == IPv6Network("fd00::/120")


# -- bad values: one line, key and value -----------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key", "value"),
    [
        ('dnsServer: {CIDR: "240.0.0.0/33"}', "dnsServer.CIDR", "240.0.0.0/33"),
        ('dnsServer: {CIDR: "not-a-cidr"}', "dnsServer.CIDR", "not-a-cidr"),
        ('dnsServer: {CIDR: "240.0.0.1/4"}', "dnsServer.CIDR", "240.0.0.1/4"),
        ('dnsServer: {CIDR: "fd00::/64"}', "dnsServer.CIDR", "fd00::/64"),
        ('dnsServer: {CIDR: "10.0.0.0/31"}', "dnsServer.CIDR", "10.0.0.0/31"),
        ('dnsServer: {CIDRv6: "240.0.0.0/4"}', "dnsServer.CIDRv6", "240.0.0.0/4"),
        ('dnsServer: {CIDRv6: "fd00::1/64"}', "dnsServer.CIDRv6", "fd00::1/64"),
        ('dnsServer: {CIDRv6: "nope"}', "dnsServer.CIDRv6", "nope"),
        ("dnsServer: {port: 70000}", "dnsServer.port", "70000"),
        ("dnsServer: {port: -1}", "dnsServer.port", "-1"),
        ("dnsServer: {port: http}", "dnsServer.port", "http"),
        ("dnsServer: {port: true}", "dnsServer.port", "True"),
        ("dnsServer: {port: 53.5}", "dnsServer.port", "53.5"),
        ("dnsServer: {ttl: 0}", "dnsServer.ttl", "0"),
        ("dnsServer: {ttl: -5}", "dnsServer.ttl", "-5"),
        ("dnsServer: {ttl: 86401}", "dnsServer.ttl", "86401"),
        ("dnsServer: {ttl: soon}", "dnsServer.ttl", "soon"),
        ('dnsServer: {domain: ""}', "dnsServer.domain", "''"),
        ('dnsServer: {domain: "my_mesh"}', "dnsServer.domain", "my_mesh"),
        ('dnsServer: {domain: "my mesh"}', "dnsServer.domain", "my mesh"),
        ('dnsServer: {domain: "a..b"}', "dnsServer.domain", "a..b"),
        ("dnsServer: {domain: 5}", "dnsServer.domain", "5"),
        (
            'dnsServer: {CIDR: "10.0.0.0/24", CIDRv6: "fd00::/121"}',
            "dnsServer.CIDRv6",
            "fd00::/121",
        ),
        ("dnsServer: [1, 2]", "dnsServer", "[1, 2]"),
        ("dnsServer: bogus", "dnsServer", "bogus"),
    ],
)
def test_bad_yaml_value(yaml_text: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(yaml_text, {})
    assert_one_line_error(info.value, key, value)


def test_cidrv6_smaller_than_cidr_names_both() -> None:
    with pytest.raises(ConfigError) as info:
        load_config('dnsServer: {CIDR: "10.0.0.0/16", CIDRv6: "fd00::/113"}', {})
    assert_one_line_error(info.value, "dnsServer.CIDRv6", "fd00::/113", "10.0.0.0/16")


def test_cidrv6_smaller_than_default_cidr() -> None:
    with pytest.raises(ConfigError) as info:
        load_config('dnsServer: {CIDRv6: "fd00::/101"}', {})
    assert_one_line_error(info.value, "CIDRv6", "fd00::/101", "240.0.0.0/4")


def test_cidrv6_equal_in_size_to_default_cidr_is_accepted() -> None:
    assert load_config('dnsServer: {CIDRv6: "fd00::/100"}', {}).cidr6 == IPv6Network("fd00::/100")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KUMA_DNS_SERVER_PORT", "70000"),
        ("KUMA_DNS_SERVER_PORT", "dns"),
        ("KUMA_DNS_SERVER_CIDR", "240.0.0.1/4"),
        ("KUMA_DNS_SERVER_CIDR", "fd00::/8"),
        ("KUMA_DNS_SERVER_CIDR_V6", "10.0.0.0/8"),
        ("KUMA_DNS_SERVER_TTL", "0"),
        ("KUMA_DNS_SERVER_DOMAIN", "a b"),
    ],
)
def test_bad_env_value(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {variable: value})
    assert_one_line_error(info.value, variable, value)


def test_bad_env_value_wins_over_good_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FULL_YAML, {"KUMA_DNS_SERVER_TTL": "0"})
    assert_one_line_error(info.value, "KUMA_DNS_SERVER_TTL", "0")


def test_bad_yaml_value_is_refused_even_if_env_overrides_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("dnsServer: {port: 70000}", {"KUMA_DNS_SERVER_PORT": "53"})
    assert_one_line_error(info.value, "dnsServer.port", "70000")


def test_bad_port_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {"port": "70000"})
    assert_one_line_error(info.value, "--dns-port", "70000")


@pytest.mark.parametrize(
    ("field", "value"), [("ttl", 0), ("cidr", "10.0.0.1/24"), ("cidr6", "x"), ("domain", "a b")]
)
def test_bad_other_flags(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {field: value})
    assert_one_line_error(info.value, field, str(value))


def test_value_with_newline_stays_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"KUMA_DNS_SERVER_CIDR": "10.0.0.0/8\nmore"})
    assert_one_line_error(info.value, "KUMA_DNS_SERVER_CIDR", "10.0.0.0/8")


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("dnsServer:\n  prot: 5353\n", {})
    assert_one_line_error(info.value, "dnsServer", "prot", "unknown")


def test_unknown_top_level_key_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("dnsSever:\n  port: 5353\n", {})
    assert_one_line_error(info.value, "dnsSever", "unknown")


@pytest.mark.parametrize(
    ("yaml_text", "key", "value"),
    [
        ("dnsServer:\n  prot: 5353\n", "dnsServer.prot", "5353"),
        ("dnsSever:\n  port: 5353\n", "dnsSever", "5353"),
    ],
)
def test_unknown_key_names_key_and_value(yaml_text: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(yaml_text, {})
    assert_one_line_error(info.value, key, value)


def test_unknown_key_with_newline_stays_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config('dnsServer: {"po\\nrt": 1}', {})
    assert_one_line_error(info.value, "dnsServer")


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just text\n"])
def test_non_mapping_yaml(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, {}, source_name="/etc/kumazone.yaml")
    assert_one_line_error(info.value, "/etc/kumazone.yaml", "mapping")


@pytest.mark.parametrize(
    "text", ["dnsServer: []\n", "dnsServer: 0\n", 'dnsServer: ""\n', "dnsServer: false\n"]
)
def test_falsy_non_mapping_dnsserver_section_is_refused(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, {})
    assert_one_line_error(info.value, "dnsServer")


def test_unreadable_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("dnsServer:\n  port: [1\n", {}, source_name="kz.yaml")
    assert_one_line_error(info.value, "kz.yaml", "not valid YAML", "line")


# -- parse_port --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "port"), [(0, 0), ("53", 53), (" 5653 ", 5653), (65535, 65535)])
def test_parse_port(value: object, port: int) -> None:
    assert parse_port(value) == port


@pytest.mark.parametrize("value", [-1, 65536, "x", "", None, True, 1.5, "5653.0"])
def test_parse_port_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_port(value)


@given(st.integers())
def test_parse_port_property(value: int) -> None:
    if 0 <= value <= 65535:
        assert parse_port(value) == value
        assert parse_port(str(value)) == value
    else:
        with pytest.raises(ValueError):
            parse_port(value)


@given(
    st.sampled_from(
        [
            "KUMA_DNS_SERVER_DOMAIN",
            "KUMA_DNS_SERVER_PORT",
            "KUMA_DNS_SERVER_CIDR",
            "KUMA_DNS_SERVER_CIDR_V6",
            "KUMA_DNS_SERVER_TTL",
        ]
    ),
    st.text(max_size=40),
)
def test_any_env_value_is_a_config_or_a_one_line_error(variable: str, value: str) -> None:
    try:
        config = load_config(None, {variable: value})
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1, str(e)
        assert variable in str(e)
    else:
        assert isinstance(config, DnsServerConfig)


# -- nameserverAddresses -------------------------------------------------------------------


def test_nameserver_addresses_from_yaml_env_and_flag() -> None:
    text = "dnsServer:\n  nameserverAddresses: [192.0.2.53, '2001:DB8::53']\n"
    assert load_config(text, {}).nameserver_addresses == ("192.0.2.53", "2001:db8::53")
    env = {"KUMA_DNS_SERVER_NAMESERVER_ADDRESSES": "198.51.100.1,198.51.100.2"}
    assert load_config(text, env).nameserver_addresses == ("198.51.100.1", "198.51.100.2")
    flags = {"nameserver_addresses": "203.0.113.9"}
    assert load_config(text, env, flags).nameserver_addresses == ("203.0.113.9",)
    assert load_config(None, {}).nameserver_addresses == ()


@pytest.mark.parametrize(
    ("value", "line"),
    [
        (
            "[ns.example]",
            "dnsServer.nameserverAddresses: ['ns.example'] holds 'ns.example', "
            "which is not an IP address",
        ),
        ("[]", "dnsServer.nameserverAddresses: [] must list 1 to 16 IP addresses"),
        ("5", "dnsServer.nameserverAddresses: 5 must be a list of IP addresses"),
        (
            "['0.0.0.0']",
            "dnsServer.nameserverAddresses: ['0.0.0.0'] holds '0.0.0.0', which no client can reach",
        ),
    ],
)
def test_bad_nameserver_addresses_are_one_line(value: str, line: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(f"dnsServer:\n  nameserverAddresses: {value}\n", {})
    assert str(e.value) == line


def test_bad_nameserver_addresses_env_names_the_variable() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, {"KUMA_DNS_SERVER_NAMESERVER_ADDRESSES": "x"})
    assert str(e.value) == (
        "KUMA_DNS_SERVER_NAMESERVER_ADDRESSES: 'x' holds 'x', which is not an IP address"
    )


@pytest.mark.parametrize(
    ("interface", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53",)),
        ("2001:db8::53", ("2001:db8::53",)),
        ("0.0.0.0", ("127.0.0.1",)),
        ("::", ("127.0.0.1", "::1")),
        ("", ("127.0.0.1", "::1")),
    ],
)
def test_default_nameserver_addresses(interface: str, expected: tuple[str, ...]) -> None:
    assert default_nameserver_addresses(interface) == expected
