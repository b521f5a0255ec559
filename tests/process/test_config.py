"""Configuration through the real process: file, then environment, then flags."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import dns.rcode
import dns.rdatatype
import pytest

from tests.kzprocess import REPO, TWISTD, ZoneProcess


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no free port")


def write_config(path: Path, **keys: Any) -> Path:
    path.write_text(
        "dnsServer:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in keys.items())
    )
    return path


def records(answer: Any, rdtype: str) -> list[Any]:
    wanted = dns.rdatatype.from_text(rdtype)
    return [rrset for rrset in answer.answer if rrset.rdtype == wanted]


def addresses(answer: Any, rdtype: str = "A") -> list[str]:
    return sorted(rdata.address for rrset in records(answer, rdtype) for rdata in rrset)


def item(zone: ZoneProcess, service: str, mesh: str = "default") -> dict[str, Any]:
    found = [i for i in zone.vips()["items"] if (i["mesh"], i["service"]) == (mesh, service)]
    assert len(found) == 1, zone.vips()
    return found[0]


# -- good values are honoured ------------------------------------------------------


def test_config_file_sets_domain_cidrs_and_ttl(zone_process, tmp_path) -> None:
    config = write_config(
        tmp_path / "kumazone.yaml",
        domain="mesh.internal",
        CIDR="10.64.0.0/16",
        CIDRv6="fd12:3456:789a::/64",
        ttl=30,
    )
    zone: ZoneProcess = zone_process(args=[f"--config={config}"])
    redis = item(zone, "redis")
    assert ipaddress.ip_address(redis["vip"]) in ipaddress.ip_network("10.64.0.0/16")
    assert ipaddress.ip_address(redis["vip6"]) in ipaddress.ip_network("fd12:3456:789a::/64")
    assert redis["names"] == ["redis.mesh.internal"]

    answer = zone.query("redis.mesh.internal")
    assert answer.rcode() == dns.rcode.NOERROR
    assert addresses(answer) == [redis["vip"]]
    assert [rrset.ttl for rrset in answer.answer] == [30]
    answer = zone.query("redis.mesh.internal", "AAAA")
    assert addresses(answer, "AAAA") == [redis["vip6"]]
    assert [rrset.ttl for rrset in answer.answer] == [30]
    assert addresses(zone.query("echo-server.echo-example.svc.1010.mesh.internal")) == [
        item(zone, "echo-server_echo-example_svc_1010")["vip"]
    ]

    # The old domain is no longer ours.
    assert zone.query("redis.mesh").rcode() == dns.rcode.REFUSED
    # SOA of the new apex, with the TTL as its minimum (negative caching).
    soa = records(zone.query("mesh.internal", "SOA"), "SOA")
    assert len(soa) == 1 and soa[0].ttl == 30 and soa[0][0].minimum == 30
    nx = zone.query("nope.mesh.internal")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert [r.name.to_text() for r in nx.authority] == ["mesh.internal."]
    # PTR under the new reverse zone.
    reverse = ipaddress.ip_address(redis["vip"]).reverse_pointer
    ptr = records(zone.query(reverse, "PTR"), "PTR")
    assert [r.target.to_text() for r in ptr[0]] == ["redis.mesh.internal."]


def test_environment_overrides_the_file(zone_process, tmp_path) -> None:
    config = write_config(
        tmp_path / "kumazone.yaml",
        domain="mesh.internal",
        CIDR="10.64.0.0/16",
        CIDRv6="fd12:3456:789a::/64",
        ttl=30,
    )
    zone: ZoneProcess = zone_process(
        args=[f"--config={config}"],
        env={
            "KUMA_DNS_SERVER_DOMAIN": "svc.example",
            "KUMA_DNS_SERVER_CIDR": "10.99.0.0/16",
            "KUMA_DNS_SERVER_CIDR_V6": "fd99::/64",
            "KUMA_DNS_SERVER_TTL": "45",
        },
    )
    redis = item(zone, "redis")
    assert ipaddress.ip_address(redis["vip"]) in ipaddress.ip_network("10.99.0.0/16")
    assert ipaddress.ip_address(redis["vip6"]) in ipaddress.ip_network("fd99::/64")
    answer = zone.query("redis.svc.example")
    assert addresses(answer) == [redis["vip"]]
    assert [rrset.ttl for rrset in answer.answer] == [45]
    assert zone.query("redis.mesh.internal").rcode() == dns.rcode.REFUSED


def test_environment_overrides_only_what_it_names(zone_process, tmp_path) -> None:
    config = write_config(tmp_path / "kumazone.yaml", domain="mesh.internal", ttl=30)
    zone: ZoneProcess = zone_process(args=[f"--config={config}"], env={"KUMA_DNS_SERVER_TTL": "90"})
    answer = zone.query("redis.mesh.internal")
    assert answer.rcode() == dns.rcode.NOERROR
    assert [rrset.ttl for rrset in answer.answer] == [90]
    # The default CIDR stays.
    assert ipaddress.ip_address(item(zone, "redis")["vip"]) in ipaddress.ip_network("240.0.0.0/4")


def test_dns_port_flag_overrides_file_and_environment(zone_process, tmp_path) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = write_config(tmp_path / "kumazone.yaml", port=file_port)
    zone: ZoneProcess = zone_process(
        args=[f"--config={config}", f"--dns-port={flag_port}"],
        env={"KUMA_DNS_SERVER_PORT": str(env_port)},
    )
    ports = json.loads((zone.data_dir / "ports.json").read_text())
    assert ports["dns"] == flag_port
    assert zone.ports["dns"] == flag_port
    assert zone.query("redis.mesh").rcode() == dns.rcode.NOERROR
    assert zone.query("redis.mesh", tcp=True).rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("with_environment", [True, False], ids=["environment", "file"])
def test_dns_port_from_the_environment_or_the_file(tmp_path, with_environment: bool) -> None:
    file_port, env_port = free_port(), free_port()
    config = write_config(tmp_path / "kumazone.yaml", port=file_port)
    workdir = tmp_path
    process = ZoneProcess(workdir, REPO / "zones" / "zone-1", args=[f"--config={config}"])
    # ZoneProcess passes --dns-port=0 itself, which would override both: run without it.
    command = [a for a in process.command() if a != "--dns-port=0"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KUMA_")}
    if with_environment:
        environment["KUMA_DNS_SERVER_PORT"] = str(env_port)
    child = subprocess.Popen(
        command, cwd=workdir, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        ports_file = process.data_dir / "ports.json"
        deadline = time.monotonic() + 30
        while not ports_file.exists() and time.monotonic() < deadline:
            assert child.poll() is None, process.log()
            time.sleep(0.05)
        assert ports_file.exists(), process.log()
        process.ports = json.loads(ports_file.read_text())
        assert process.ports["dns"] == (env_port if with_environment else file_port)
        assert process.query("redis.mesh").rcode() == dns.rcode.NOERROR
    finally:
        child.kill()
        child.wait()


# -- bad values stop start-up with one line -------------------------------------------


def run_bad(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    config: dict[str, Any] | str | None = None,
) -> tuple[int, list[str], float]:
    """Run twistd with a bad setting; returns status, output lines and seconds taken."""
    command = [
        TWISTD,
        "-n",
        "--pidfile=",
        "kumazone",
        "--role=zone",
        "--zone=zone-1",
        f"--data-dir={tmp_path / 'data'}",
        "--dns-port=0",
        "--api-port=0",
        "--diagnostics-port=0",
        "--dns-interface=127.0.0.1",
        f"--resources={REPO / 'zones' / 'zone-1'}",
    ]
    if config is not None:
        path = tmp_path / "kumazone.yaml"
        if isinstance(config, str):
            path.write_text(config)
        else:
            write_config(path, **config)
        command.append(f"--config={path}")
    command += list(args)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KUMA_")}
    environment.update(env or {})
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"kumazone started with a bad setting and ran on: {e.stdout!r}")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, lines, time.monotonic() - started


BAD = {
    # case: (args, env, config, words the one line must contain)
    "CIDR does not parse": ((), None, {"CIDR": "300.0.0.0/4"}, ["dnsServer.CIDR", "300.0.0.0/4"]),
    "CIDR is garbage": ((), None, {"CIDR": "not-a-cidr"}, ["dnsServer.CIDR", "not-a-cidr"]),
    "CIDR with host bits": ((), None, {"CIDR": "10.0.0.1/8"}, ["dnsServer.CIDR", "10.0.0.1/8"]),
    "CIDR is IPv6": ((), None, {"CIDR": "fd00::/64"}, ["dnsServer.CIDR", "fd00::/64"]),
    "CIDRv6 does not parse": (
        (),
        None,
        {"CIDRv6": "fd00::/200"},
        ["dnsServer.CIDRv6", "fd00::/200"],
    ),
    "CIDRv6 smaller than CIDR": (
        (),
        None,
        {"CIDR": "10.0.0.0/8", "CIDRv6": "fd00::/120"},
        ["CIDRv6", "fd00::/120"],
    ),
    "port 70000 in the file": ((), None, {"port": 70000}, ["dnsServer.port", "70000"]),
    "port 70000 in the environment": (
        (),
        {"KUMA_DNS_SERVER_PORT": "70000"},
        None,
        ["KUMA_DNS_SERVER_PORT", "70000"],
    ),
    "port 70000 as --dns-port": (("--dns-port=70000",), None, None, ["--dns-port", "70000"]),
    "port 70000 as --api-port": (("--api-port=70000",), None, None, ["--api-port", "70000"]),
    "port 70000 as --diagnostics-port": (
        ("--diagnostics-port=70000",),
        None,
        None,
        ["--diagnostics-port", "70000"],
    ),
    "unknown key": ((), None, {"bogus": 1}, ["dnsServer.bogus"]),
    "unknown top-level key": ((), None, "dnsServer: {}\nnetworking: {}\n", ["networking"]),
    "ttl abc in the file": ((), None, {"ttl": "abc"}, ["dnsServer.ttl", "abc"]),
    "ttl abc in the environment": (
        (),
        {"KUMA_DNS_SERVER_TTL": "abc"},
        None,
        ["KUMA_DNS_SERVER_TTL", "abc"],
    ),
    "ttl zero": ((), None, {"ttl": 0}, ["dnsServer.ttl", "0"]),
    "bad domain": ((), None, {"domain": "bad domain!"}, ["dnsServer.domain", "bad domain!"]),
    "bad domain in the environment": (
        (),
        {"KUMA_DNS_SERVER_DOMAIN": "a..b"},
        None,
        ["KUMA_DNS_SERVER_DOMAIN", "a..b"],
    ),
    "bad CIDR in the environment": (
        (),
        {"KUMA_DNS_SERVER_CIDR": "10.0.0.0/33"},
        None,
        ["KUMA_DNS_SERVER_CIDR", "10.0.0.0/33"],
    ),
    "zone with upper case": (("--zone=Zone-1",), None, None, ["--zone", "Zone-1"]),
    "config file that is not YAML": ((), None, "dnsServer: [unclosed\n", ["kumazone.yaml"]),
    "config file missing": (
        ("--config=/nonexistent/kz.yaml",),
        None,
        None,
        ["--config", "/nonexistent/kz.yaml"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_value_stops_start_up_with_one_line(tmp_path, case: str) -> None:
    args, env, config, words = BAD[case]
    status, lines, seconds = run_bad(tmp_path, *args, env=env, config=config)
    assert status != 0, lines
    assert seconds < 10
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert len(lines) == 1, "\n".join(lines)
    for word in words:
        assert word in lines[0], lines[0]
    # Nothing was started: no ports were written.
    assert not (tmp_path / "data" / "ports.json").exists()


def test_a_port_in_use_stops_start_up_with_one_line(tmp_path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, lines, seconds = run_bad(tmp_path, f"--api-port={port}")
    assert status != 0
    assert seconds < 10
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert [line for line in lines if "kumazone" in line and str(port) in line], lines
