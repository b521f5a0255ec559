"""The twistd plugin, the kumazone command, and the diagnostics endpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import dns.rcode
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from tests.builders import as_yaml, dataplane, external_service
from tests.kzprocess import REPO, TWISTD, ZoneProcess

#: Every flag DESIGN.md names (ports table and "Other flags").
DESIGN_FLAGS = [
    "dns-port",
    "dns-interface",
    "diagnostics-port",
    "api-port",
    "api-interface",
    "kds-port",
    "kds-interface",
    "role",
    "zone",
    "global",
    "config",
    "resources",
    "data-dir",
    "store",
    "tls-cert",
    "tls-key",
    "tls-ca",
    "insecure",
]
FLAGS_WITH_VALUES = [flag for flag in DESIGN_FLAGS if flag != "insecure"]


def run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=60)


def kumazone_command() -> list[str]:
    script = Path(sys.executable).parent / "kumazone"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kumazone"]


# -- the plugin ------------------------------------------------------------------------


def test_kumazone_is_an_iservicemaker_plugin_with_every_design_flag() -> None:
    makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "kumazone"]
    assert makers, "the kumazone plugin is not found by twisted.plugin"
    options = makers[0].options()
    long_options = {name.rstrip("=") for name in options.longOpt}
    assert set(DESIGN_FLAGS) <= long_options, set(DESIGN_FLAGS) - long_options
    for flag in FLAGS_WITH_VALUES:
        assert f"{flag}=" in options.longOpt, f"--{flag} takes no value"
    assert "insecure" in options.longOpt  # a flag, without a value
    assert makers[0].description


def test_plugin_options_defaults_are_kumas_ports(monkeypatch) -> None:
    for variable in [v for v in os.environ if v.startswith("KUMA_")]:
        monkeypatch.delenv(variable)
    maker = next(p for p in getPlugins(IServiceMaker) if p.tapname == "kumazone")
    options = maker.options()
    options.parseOptions(["--zone=zone-1"])
    assert options["role"] == "zone"
    assert options["api-port"] == 5681
    assert options["diagnostics-port"] == 5680
    assert options["kds-port"] == 5685
    assert options.dns.port == 5653
    assert options["api-interface"] == "127.0.0.1"


def test_twistd_kumazone_help() -> None:
    result = run(TWISTD, "kumazone", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    for flag in (
        "--dns-port",
        "--api-port",
        "--resources",
        "--config",
        *(f"--{flag}" for flag in DESIGN_FLAGS),
    ):
        assert flag in result.stdout, flag
    assert "Traceback" not in result.stdout + result.stderr


def test_twistd_lists_kumazone() -> None:
    result = run(TWISTD, "--help")
    assert result.returncode == 0
    assert re.search(r"^\s+kumazone\s", result.stdout, re.MULTILINE), result.stdout


# -- the kumazone command ----------------------------------------------------------------


def test_check_accepts_the_sample_zones() -> None:
    result = run(*kumazone_command(), "check", "zones/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s)" in result.stdout


def test_check_names_the_field_of_a_bad_file(tmp_path: Path) -> None:
    good = (REPO / "zones" / "zone-1" / "default.yaml").read_text()
    (tmp_path / "good.yaml").write_text(good)
    (tmp_path / "bad.yaml").write_text(
        as_yaml(dataplane("broken-1", "broken", address="192.0.2.1", port=70000))
    )
    result = run(*kumazone_command(), "check", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if "networking.inbound[0].port" in line]
    assert len(lines) == 1, output
    assert "bad.yaml" in lines[0]
    assert "Traceback" not in output


def test_check_a_single_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "es.yaml"
    document = external_service("x", address="example.com:443")
    document["tags"] = {"app": "x"}  # no kuma.io/service
    path.write_text(as_yaml(document))
    result = run(*kumazone_command(), "check", str(path))
    assert result.returncode == 1
    assert 'tags["kuma.io/service"]' in result.stdout + result.stderr


def test_check_a_missing_path_fails(tmp_path: Path) -> None:
    result = run(*kumazone_command(), "check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "nope.yaml" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_kumazone_run_starts_a_zone_as_the_readme_says(tmp_path: Path) -> None:
    """README: `kumazone run --role=zone --zone=zone-1 --resources=zones/zone-1`."""
    data_dir = tmp_path / "data"
    command = [
        *kumazone_command(),
        "run",
        "--role=zone",
        "--zone=zone-1",
        f"--resources={REPO / 'zones' / 'zone-1'}",
        f"--data-dir={data_dir}",
        "--dns-port=0",
        "--api-port=0",
        "--diagnostics-port=0",
        "--dns-interface=127.0.0.1",
    ]
    child = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        ports_file = data_dir / "ports.json"
        deadline = time.monotonic() + 30
        while not ports_file.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ports_file.exists():
            child.kill()
            output = child.communicate()[0].decode()
            raise AssertionError(f"kumazone run did not start ({child.returncode}):\n{output}")
        zone = ZoneProcess(tmp_path, data_dir=data_dir)
        zone.ports = json.loads(ports_file.read_text())
        assert zone.query("redis.mesh").rcode() == dns.rcode.NOERROR
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_kumazone_run_stops_on_a_bad_option_with_one_line(tmp_path: Path) -> None:
    result = run(
        *kumazone_command(),
        "run",
        "--role=zone",
        "--zone=Zone-1",
        f"--data-dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "--zone" in lines[0] and "Zone-1" in lines[0], lines


def test_python_m_kumazone_version() -> None:
    from kumazone import __version__

    result = run(sys.executable, "-m", "kumazone", "version")
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout
    assert result.stdout.strip() == f"kumazone {__version__}"


def test_python_m_kumazone_check() -> None:
    result = run(sys.executable, "-m", "kumazone", "check", "zones/")
    assert result.returncode == 0, result.stdout + result.stderr


# -- diagnostics -----------------------------------------------------------------------


def metric_lines(zone: ZoneProcess) -> list[str]:
    status, text = zone.http("diagnostics", "GET", "/metrics")
    assert status == 200
    return text.decode().splitlines()


def sample(lines: list[str], name: str, **labels: str) -> float | None:
    """The value of metric C{name} whose labels include C{labels}, or None."""
    for line in lines:
        match = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return None


def test_ready_and_healthy(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    for path in ("/ready", "/healthy"):
        status, body = zone.http("diagnostics", "GET", path)
        assert status == 200, body
    assert zone.http("diagnostics", "GET", "/nope")[0] == 404


def test_metrics_after_queries(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.query("redis.mesh").rcode() == dns.rcode.NOERROR
    assert zone.query("nope.mesh").rcode() == dns.rcode.NXDOMAIN
    assert zone.query("redis.mesh", "AAAA", tcp=True).rcode() == dns.rcode.NOERROR

    lines = metric_lines(zone)
    assert sample(lines, "kumazone_dns_queries_total", type="A", rcode="NOERROR") == 1
    assert sample(lines, "kumazone_dns_queries_total", type="A", rcode="NXDOMAIN") == 1
    assert sample(lines, "kumazone_dns_queries_total", type="AAAA", rcode="NOERROR") == 1
    assert any(line.startswith("# TYPE kumazone_dns_answer_seconds histogram") for line in lines)
    answered = sample(lines, "kumazone_dns_answer_seconds_count")
    assert answered is not None and answered >= 3

    items = zone.vips()["items"]
    assert sample(lines, "kumazone_vips_allocated") == len(items) == 6
    ratio = sample(lines, "kumazone_vip_range_used_ratio")
    assert ratio is not None and 0 < ratio < 1
    assert ratio == len(items) / (2**28 - 2)

    # The counter grows with each query.
    zone.query("redis.mesh")
    lines = metric_lines(zone)
    assert sample(lines, "kumazone_dns_queries_total", type="A", rcode="NOERROR") == 2


def test_metrics_follow_the_table(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    status, _ = zone.api(
        "PUT",
        "/meshes/default/dataplanes/m-1",
        dataplane("m-1", "metered", address="192.0.2.5", port=1),
    )
    assert status == 201
    lines = metric_lines(zone)
    assert sample(lines, "kumazone_vips_allocated") == 7
    assert sample(lines, "kumazone_vip_services_without_vip") == 0
