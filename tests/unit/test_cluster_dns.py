"""kumazone install dns / uninstall dns: ConfigMaps and drop-ins, checked as text.

The CoreDNS and kube-dns inputs are real-world ConfigMaps kept under
tests/fixtures/cluster_dns/ (each says where it comes from).  The drop-ins are loaded
by real dnsmasq and unbound in tests/lab/test_cluster_dns.py.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml

from kumazone import cli
from kumazone.core.config import DnsServerConfig, load_config
from kumazone.dns.authority import reverse_domains
from kumazone.install import cluster_dns
from kumazone.install.cluster_dns import (
    ControlPlaneAddress,
    InstallError,
    coredns_install,
    coredns_uninstall,
    dnsmasq_dropin,
    forwarded_zones,
    is_dropin,
    kube_dns_install,
    kube_dns_uninstall,
    parse_cp_address,
    reverse_zones,
    server_blocks,
    unbound_dropin,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cluster_dns"
COREDNS = sorted(FIXTURES.glob("coredns-*.yaml"))
KUBE_DNS = sorted(FIXTURES.glob("kube-dns*.yaml"))
DEFAULT = DnsServerConfig()
CP = ControlPlaneAddress(ip_address("10.96.0.53"))
OTHER_CP = ControlPlaneAddress(ip_address("10.96.0.54"), 1053)
CUSTOM = load_config(
    "dnsServer: {domain: kuma.internal, CIDR: 10.64.0.0/10, CIDRv6: 'fd12:3456::/48', ttl: 5}",
    {},
)


def corefile(configmap: str) -> str:
    return str(yaml.safe_load(configmap)["data"]["Corefile"])


def without_bookkeeping(document: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(json.dumps(document, default=str))
    document.get("metadata", {}).pop("managedFields", None)
    return document


def test_fixtures_are_there() -> None:
    assert len(COREDNS) >= 5 and len(KUBE_DNS) >= 2
    for path in [*COREDNS, *KUBE_DNS]:
        assert path.read_text().startswith("# "), f"{path.name}: say where it comes from"


# -- reverse zones ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr",
    [
        "240.0.0.0/4",
        "10.0.0.0/8",
        "10.64.0.0/10",
        "192.0.2.0/24",
        "198.51.100.0/22",
        "203.0.113.128/25",
        "100.64.0.0/30",
        "fd00:fd00::/64",
        "fd12:3456::/48",
        "2001:db8::/32",
        "2001:db8:0:10::/62",
        "fd00::/8",
    ],
)
def test_reverse_zones_are_the_authoritys(cidr: str) -> None:
    network = ip_network(cidr)
    assert reverse_zones(network) == reverse_domains(network)


def test_reverse_zones_of_the_defaults() -> None:
    assert reverse_zones(IPv4Network("240.0.0.0/4")) == [
        f"{octet}.in-addr.arpa" for octet in range(240, 256)
    ]
    assert reverse_zones(IPv6Network("fd00:fd00::/64")) == [
        "0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa"
    ]
    assert forwarded_zones(DEFAULT)[0] == "mesh" and len(forwarded_zones(DEFAULT)) == 18


def test_install_imports_no_twisted() -> None:
    """The install modules are pure: they import the config core and nothing of Twisted."""
    package = Path(cluster_dns.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("twisted"), f"{source.name} imports {name}"
                if name.startswith("kumazone."):
                    assert name.startswith(("kumazone.core.", "kumazone.install")), name


# -- the control plane's address -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host_port"),
    [
        ("10.96.0.53", "10.96.0.53:5653"),
        ("10.96.0.53:53", "10.96.0.53:53"),
        ("127.0.0.1", "127.0.0.1:5653"),
        ("::1", "[::1]:5653"),
        ("[fd00::53]", "[fd00::53]:5653"),
        ("[fd00::53]:1053", "[fd00::53]:1053"),
    ],
)
def test_cp_address(text: str, host_port: str) -> None:
    assert parse_cp_address(text).host_port() == host_port


def test_cp_address_default_port_is_the_configs() -> None:
    assert parse_cp_address("10.0.0.1", 1053).port == 1053


@pytest.mark.parametrize(
    "text", ["kumazone-cp.kuma-system", "10.0.0.1:0", "10.0.0.1:70000", "10.0.0.1:x", "[::1", ""]
)
def test_cp_address_refused(text: str) -> None:
    with pytest.raises(InstallError) as raised:
        parse_cp_address(text)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("--cp-address: ")


# -- CoreDNS ---------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", COREDNS, ids=lambda p: p.stem)
def test_coredns_install_keeps_everything_else(fixture: Path) -> None:
    original = fixture.read_text()
    patched = coredns_install(original, DEFAULT, CP, fixture.name)
    before, after = yaml.safe_load(original), yaml.safe_load(patched)
    old, new = before["data"]["Corefile"], after["data"]["Corefile"]
    # Every byte of the original Corefile is kept, and its blocks still parse alike.
    assert new.startswith(old)
    old_blocks = server_blocks(old)
    new_blocks = server_blocks(new)
    assert old_blocks and new_blocks[: len(old_blocks)] == old_blocks
    for block in old_blocks:
        assert new[block.start : block.end] == old[block.start : block.end]
    # One block more, for the domain and every reverse zone, forwarding to the CP.
    (ours,) = new_blocks[len(old_blocks) :]
    assert ours.keys == tuple(f"{zone}:53" for zone in forwarded_zones(DEFAULT))
    assert ours.directives[:2] == ("errors", "cache")
    assert ours.directives[2] in ("forward", "proxy")
    body = new[ours.start : ours.end]
    assert f"{ours.directives[2]} . 10.96.0.53:5653\n" in body
    assert int(body.split("cache ")[1].split()[0]) <= DEFAULT.ttl
    # The rest of the ConfigMap is as it was (kubectl apply refuses managedFields).
    del before["data"]["Corefile"], after["data"]["Corefile"]
    assert without_bookkeeping(after) == without_bookkeeping(before)
    assert "managedFields" not in patched


@pytest.mark.parametrize("fixture", COREDNS, ids=lambda p: p.stem)
def test_coredns_install_is_idempotent_and_replaces_its_block(fixture: Path) -> None:
    once = coredns_install(fixture.read_text(), DEFAULT, CP)
    assert coredns_install(once, DEFAULT, CP) == once
    moved = coredns_install(once, CUSTOM, OTHER_CP)
    assert coredns_install(moved, CUSTOM, OTHER_CP) == moved
    new = corefile(moved)
    assert new.count("kumazone install dns: begin") == 1
    assert "10.96.0.53" not in new and "forward . 10.96.0.54:1053" in new.replace(
        "proxy", "forward"
    )
    assert new.startswith(corefile(fixture.read_text()))
    keys = server_blocks(new)[-1].keys
    assert keys[0] == "kuma.internal:53" and "127.10.in-addr.arpa:53" in keys
    assert len(keys) == 1 + 64 + 1 and "cache 5\n" in new


@pytest.mark.parametrize("fixture", COREDNS, ids=lambda p: p.stem)
def test_coredns_uninstall_gives_the_original_corefile(fixture: Path) -> None:
    original = fixture.read_text()
    removed = coredns_uninstall(coredns_install(original, DEFAULT, CP))
    assert corefile(removed) == corefile(original)
    assert coredns_uninstall(removed) == removed
    # Uninstalling from a ConfigMap install never touched changes only bookkeeping.
    assert without_bookkeeping(yaml.safe_load(coredns_uninstall(original))) == (
        without_bookkeeping(yaml.safe_load(original))
    )


def test_coredns_forward_or_proxy_follows_the_corefile() -> None:
    for fixture in COREDNS:
        new = corefile(coredns_install(fixture.read_text(), DEFAULT, CP))
        plugin = server_blocks(new)[-1].directives[2]
        assert plugin == ("proxy" if "1.11-proxy" in fixture.name else "forward"), fixture.name


def configmap(corefile_text: str, **data: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile_text, **data},
        }
    )


def test_coredns_keeps_tabs_and_odd_spacing() -> None:
    odd = '.:53 {\n\terrors  \n\tforward . 192.0.2.1 "a b"\n}\nexample.org {\n\twhoami\n}'
    new = corefile(coredns_install(configmap(odd), DEFAULT, CP))
    assert new.startswith(odd + "\n\n")
    assert [b.keys for b in server_blocks(new)][:2] == [(".:53",), ("example.org",)]


def test_coredns_refuses_a_block_it_did_not_write() -> None:
    """Kuma's own block (mesh:53) would clash with ours: say so, change nothing."""
    kuma = ".:53 {\n    forward . /etc/resolv.conf\n}\nmesh:53 {\n    errors\n    cache 30\n" + (
        "    forward . 10.96.0.9:5653\n}\n"
    )
    with pytest.raises(InstallError) as raised:
        coredns_install(configmap(kuma), DEFAULT, CP, "coredns.yaml")
    assert str(raised.value).startswith("coredns.yaml: line 4: the server block 'mesh:53'")
    # Another port, or a name that merely ends like ours, is no clash.
    fine = ".:53 {\n    whoami\n}\nmesh:1053 {\n    whoami\n}\nnotmesh {\n    whoami\n}\n"
    assert corefile(coredns_install(configmap(fine), DEFAULT, CP)).startswith(fine)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (".:53 {\n    errors\n", "a block opened at line 1 is never closed"),
        (".:53 {\n}\n}\n", "line 3: '}' closes no block"),
        (".:53\nerrors\n", "line 1: '.:53' is not followed by a block"),
        ("# kumazone install dns: begin\nmesh {\n}\n", "without its pair"),
    ],
)
def test_coredns_bad_corefile(text: str, message: str) -> None:
    with pytest.raises(InstallError) as raised:
        coredns_install(configmap(text), DEFAULT, CP, "in.yaml")
    assert message in str(raised.value) and "\n" not in str(raised.value)


# -- kube-dns --------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", KUBE_DNS, ids=lambda p: p.stem)
def test_kube_dns_install_and_uninstall(fixture: Path) -> None:
    original = fixture.read_text()
    patched = kube_dns_install(original, DEFAULT, CP)
    before, after = yaml.safe_load(original), yaml.safe_load(patched)
    stubs = json.loads(after["data"]["stubDomains"])
    old_stubs = json.loads((before.get("data") or {}).get("stubDomains", "{}"))
    for zone in forwarded_zones(DEFAULT):
        assert stubs.pop(zone) == ["10.96.0.53:5653"]
    assert stubs == old_stubs
    for key, value in (before.get("data") or {}).items():
        if key != "stubDomains":
            assert after["data"][key] == value
    assert kube_dns_install(patched, DEFAULT, CP) == patched
    removed = yaml.safe_load(kube_dns_uninstall(patched, DEFAULT))
    if "stubDomains" in (before.get("data") or {}):
        removed["data"]["stubDomains"] = json.loads(removed["data"]["stubDomains"])
        before["data"]["stubDomains"] = json.loads(before["data"]["stubDomains"])
    assert removed == before


def test_kube_dns_bad_stub_domains() -> None:
    text = yaml.safe_dump({"kind": "ConfigMap", "data": {"stubDomains": "[1, 2"}})
    with pytest.raises(InstallError, match=r"data\.stubDomains is not a JSON object"):
        kube_dns_install(text, DEFAULT, CP)


# -- drop-ins --------------------------------------------------------------------------


def test_dnsmasq_dropin() -> None:
    text = dnsmasq_dropin(DEFAULT, parse_cp_address("127.0.0.1"))
    servers = [line for line in text.splitlines() if line.startswith("server=")]
    assert servers == [f"server=/{zone}/127.0.0.1#5653" for zone in forwarded_zones(DEFAULT)]
    assert is_dropin(text, "dnsmasq") and not is_dropin(text, "unbound")
    six = dnsmasq_dropin(CUSTOM, parse_cp_address("[fd00::53]:1053"))
    assert "server=/kuma.internal/fd00::53#1053\n" in six


def test_unbound_dropin() -> None:
    text = unbound_dropin(DEFAULT, parse_cp_address("127.0.0.1"))
    lines = [line.strip() for line in text.splitlines()]
    for zone in forwarded_zones(DEFAULT):
        assert f'domain-insecure: "{zone}."' in lines
        assert f'local-zone: "{zone}." transparent' in lines
        at = lines.index(f'name: "{zone}."')
        assert lines[at - 1] == "forward-zone:" and lines[at + 1] == "forward-addr: 127.0.0.1@5653"
    assert "do-not-query-localhost: no" in lines
    assert is_dropin(text, "unbound")
    remote = unbound_dropin(DEFAULT, parse_cp_address("192.0.2.53"))
    assert "do-not-query-localhost" not in remote and "forward-addr: 192.0.2.53@5653" in remote


# -- the command -----------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def no_kuma_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in list(os.environ):
        if variable.startswith("KUMA_"):
            monkeypatch.delenv(variable)


@pytest.mark.usefixtures("no_kuma_env")
def test_cli_install_and_uninstall_coredns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fixture = FIXTURES / "coredns-kubeadm-1.28.yaml"
    status, out, err = run(
        capsys, "install", "dns", "--flavor", "coredns", "--cp-address", "10.96.0.53",
        "--from", str(fixture),
    )  # fmt: skip
    assert (status, err) == (0, "") and out == coredns_install(fixture.read_text(), DEFAULT, CP)
    patched = tmp_path / "patched.yaml"
    patched.write_text(out)
    status, again, _ = run(
        capsys, "install", "dns", "--flavor", "coredns", "--cp-address", "10.96.0.53",
        "--from", str(patched),
    )  # fmt: skip
    assert (status, again) == (0, out)
    status, removed, _ = run(
        capsys, "uninstall", "dns", "--flavor", "coredns", "--from", str(patched)
    )
    assert status == 0 and corefile(removed) == corefile(fixture.read_text())


@pytest.mark.usefixtures("no_kuma_env")
def test_cli_honours_config_and_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kumazone.yaml"
    config.write_text("dnsServer:\n  CIDR: 10.64.0.0/10\n  port: 1053\n")
    monkeypatch.setenv("KUMA_DNS_SERVER_DOMAIN", "kuma.internal")
    status, out, err = run(
        capsys, "install", "dns", "--flavor", "dnsmasq", "--cp-address", "127.0.0.1",
        "--config", str(config),
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert "server=/kuma.internal/127.0.0.1#1053\n" in out
    assert "server=/64.10.in-addr.arpa/127.0.0.1#1053\n" in out
    monkeypatch.setenv("KUMA_DNS_SERVER_CIDR", "not-a-cidr")
    status, out, err = run(
        capsys, "install", "dns", "--flavor", "unbound", "--cp-address", "127.0.0.1"
    )
    assert status == 1 and out == ""
    assert err.startswith("kumazone: KUMA_DNS_SERVER_CIDR: 'not-a-cidr'") and err.count("\n") == 1


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.usefixtures("no_kuma_env")
@pytest.mark.parametrize(
    ("flavor", "make_input", "message"),
    [
        ("coredns", lambda d: str(d / "missing.yaml"), "cannot be read (No such file"),
        ("coredns", lambda d: write(d / "s.yaml", "kind: Secret\n"), "not a ConfigMap"),
        ("kube-dns", lambda d: write(d / "l.yaml", "- 1\n- 2\n"), "not a ConfigMap"),
        ("coredns", lambda d: write(d / "y.yaml", "kind: [\n"), "not valid YAML"),
        (
            "coredns",
            lambda d: write(d / "c.yaml", "kind: ConfigMap\ndata:\n  NodeHosts: x\n"),
            "has no data.Corefile key",
        ),
        ("coredns", lambda d: write(d / "d.yaml", "kind: ConfigMap\ndata: 3\n"), "not a mapping"),
        ("coredns", lambda d: str(d), "cannot be read"),
    ],
)
def test_cli_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    flavor: str,
    make_input: Callable[[Path], str],
    message: str,
) -> None:
    status, out, err = run(
        capsys, "install", "dns", "--flavor", flavor, "--cp-address", "10.96.0.53",
        "--from", make_input(tmp_path),
    )  # fmt: skip
    assert status == 1 and out == ""
    assert err.startswith("kumazone: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


@pytest.mark.usefixtures("no_kuma_env")
def test_cli_without_from_or_kubectl(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    status, out, err = run(capsys, "uninstall", "dns", "--flavor", "coredns")
    assert status == 1 and out == ""
    assert err.startswith("kumazone: kubectl is not on PATH: give the current ConfigMap")


@pytest.mark.usefixtures("no_kuma_env")
def test_cli_uninstall_dropin(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(
        capsys, "install", "dns", "--flavor", "unbound", "--cp-address", "127.0.0.1"
    )
    dropin = tmp_path / "kumazone.conf"
    dropin.write_text(out)
    foreign = tmp_path / "other.conf"
    foreign.write_text("server:\n    verbosity: 1\n")
    status, _, err = run(capsys, "uninstall", "dns", "--flavor", "unbound", "--file", str(foreign))
    assert status == 1 and "was not written by kumazone install dns" in err
    assert foreign.exists()
    status, _, err = run(capsys, "uninstall", "dns", "--flavor", "dnsmasq", "--file", str(dropin))
    assert status == 1 and dropin.exists()
    status, out, err = run(capsys, "uninstall", "dns", "--flavor", "unbound", "--file", str(dropin))
    assert status == 0 and not dropin.exists() and out.startswith(f"removed {dropin}")
    status, _, err = run(capsys, "uninstall", "dns", "--flavor", "unbound")
    assert status == 1 and err.startswith("kumazone: ") and "--file" in err
