"""kumazone install / uninstall transparent-proxy on real iptables, in network namespaces
the test makes and removes.

 - The rule set: iptables-save and ip6tables-save after uninstall equal what they were
   before install, with or without rules of the namespace's own, in both modes, with
   the nf_tables and the legacy backend; installing twice doubles nothing.
 - The redirect: a "dataplane" (dnsmasq as the dataplane user on 127.0.0.1 and ::1, port
   15053) and an "upstream" (dnsmasq on the resolv.conf's nameservers, port 53) answer
   probe.test differently, so each query shows who answered it.  Another user's UDP and
   TCP queries reach the dataplane; the dataplane user's own reach the upstream, and so
   do the dataplane's forwarded queries.

Needs root, like tests/lab/test_lab.py: without namespaces the test fails and says why
(KUMAZONE_LAB=skip skips it).  The dataplane user, kzdp, is made if missing and removed
again at the end; the other user is nobody.
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kumazone import cli
from kumazone.dataplane.tproxy import CHAINS
from tests.lab.test_cluster_dns import Namespace, find
from tests.lab.test_lab import namespaces_unavailable

DP_USER = "kzdp"
APP_USER = "nobody"
#: On the namespace's veth: the resolv.conf's nameservers, and addresses that are not.
NAMESERVER, NAMESERVER6 = "192.0.2.53", "2001:db8::53"
OTHER, OTHER6 = "198.51.100.53", "2001:db8:1::53"
#: probe.test as the dataplane and as the upstream answer it; other.test (upstream only).
FROM_DATAPLANE, FROM_UPSTREAM, FORWARDED = "192.0.2.99", "192.0.2.98", "192.0.2.97"
PORT = 15053
PREFIX = "KUMAZONE_DNS_"

#: Rules of the namespace's own, for both families (ADDRESS: a network of the family).
SEED = """\
*filter
:FORWARD DROP [0:0]
-A INPUT -i lo -j ACCEPT
COMMIT
*raw
-A PREROUTING -p tcp -m tcp --dport 22 -j CT --notrack
COMMIT
*nat
:APP - [0:0]
-A OUTPUT -j APP
-A APP -d {network} -j RETURN
COMMIT
"""
SEED_NETWORKS = {"iptables": "203.0.113.0/24", "ip6tables": "2001:db8:ffff::/48"}


def tools_missing() -> str | None:
    for tool, package in (
        ("iptables-restore", "iptables"),
        ("ip6tables-restore", "iptables"),
        ("iptables-legacy-restore", "iptables"),
        ("dnsmasq", "dnsmasq-base"),
        ("dig", "bind9-dnsutils"),
        ("setpriv", "util-linux"),
        ("useradd", "passwd"),
    ):
        if find(tool) is None:
            return f"'{tool}' is not installed (apt-get install {package})"
    return None


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    """UIDs of the dataplane user (made if missing) and the application's user."""
    why = namespaces_unavailable() or tools_missing()
    if os.environ.get("KUMAZONE_LAB") == "skip":
        pytest.skip(f"KUMAZONE_LAB=skip{': ' + why if why else ''}")
    if why is not None:
        pytest.fail(
            f"the transparent proxy lab test cannot run here: {why}. "
            "Set KUMAZONE_LAB=skip to skip it explicitly.",
            pytrace=False,
        )
    made = False
    try:
        pwd.getpwnam(DP_USER)
    except KeyError:
        useradd = find("useradd")
        assert useradd is not None
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", DP_USER],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        made = True
    try:
        yield {"dp": pwd.getpwnam(DP_USER).pw_uid, "app": pwd.getpwnam(APP_USER).pw_uid}
    finally:
        if made:
            userdel = find("userdel")
            assert userdel is not None
            subprocess.run([userdel, DP_USER], capture_output=True, timeout=30)


@pytest.fixture
def namespace(users: dict[str, int]) -> Iterator[Namespace]:
    """A namespace with lo and a veth holding the nameservers' and the other addresses."""
    made = Namespace(f"kztp-{os.getpid() % 100000}")
    subprocess.run(["ip", "netns", "del", made.name], capture_output=True)
    subprocess.run(["ip", "netns", "add", made.name], check=True, timeout=10)
    try:
        for command in (
            "link set lo up",
            "link add kztp0 type veth peer name kztp1",
            f"addr add {NAMESERVER}/24 dev kztp0",
            f"addr add {OTHER}/24 dev kztp0",
            f"addr add {NAMESERVER6}/64 dev kztp0 nodad",
            f"addr add {OTHER6}/64 dev kztp0 nodad",
            "link set kztp0 up",
            "link set kztp1 up",
        ):
            subprocess.run(["ip", "-n", made.name, *command.split()], check=True, timeout=10)
        yield made
    finally:
        for process in made.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        subprocess.run(["ip", "netns", "del", made.name], capture_output=True, timeout=10)


def kumazone(
    namespace: Namespace, *arguments: str, backend: str = ""
) -> subprocess.CompletedProcess[str]:
    """C{python -m kumazone ARGUMENTS} as root in the namespace; it must succeed."""
    environment = {**os.environ, "KUMAZONE_IPTABLES_BACKEND": backend}
    done = subprocess.run(
        ["ip", "netns", "exec", namespace.name, sys.executable, "-m", "kumazone", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    return done


def dry_run(arguments: list[str]) -> str:
    """What C{kumazone ARGUMENTS --dry-run} prints, without a process."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert cli.main([*arguments, "--dry-run"]) == 0
    return output.getvalue()


def resolv_conf(tmp_path: Path) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text(f"search example.test\nnameserver {NAMESERVER}\nnameserver {NAMESERVER6}\n")
    return path


# -- the rule set: after uninstall as before install -----------------------------------------


def saved(namespace: Namespace, tool: str) -> str:
    done = namespace.run(f"{tool}-save")
    assert done.returncode == 0, done.stderr
    return done.stdout


def normalised(text: str) -> str:
    """iptables-save output without comments and counters, and without empty tables.

    A table is empty when it has no rule and no chain of its own and every built-in
    chain accepts: the same rule set as no table at all.  iptables cannot delete a
    table, so one that install made stays listed, empty, after uninstall.
    """
    tables: list[list[str]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append([])
        tables[-1].append(re.sub(r" \[\d+:\d+\]$", "", line))
    kept = [
        table
        for table in tables
        if any(not re.fullmatch(r"\*\w+|:[A-Z]+ ACCEPT|COMMIT", line) for line in table)
    ]
    return "\n".join(line for table in kept for line in table)


def rule_set(namespace: Namespace, backend: str) -> dict[str, str]:
    suffix = f"-{backend}" if backend else ""
    return {
        tool: normalised(saved(namespace, f"{tool}{suffix}")) for tool in ("iptables", "ip6tables")
    }


def ours(text: str) -> dict[str, list[str]]:
    """Our rules, by table and chain (legacy and nft list the tables in other orders)."""
    found: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(f"-A {PREFIX}"):
            found.setdefault(f"{table} {line.split()[1]}", []).append(line)
    return found


CASES = {
    "redirect-dns, empty namespace": (["--redirect-dns"], False, ""),
    "redirect-all, own rules": (["--redirect-all-dns-traffic"], True, ""),
    "redirect-dns ipv4 over dualstack, own rules": (
        ["--redirect-dns", "--ip-family-mode", "ipv4"],
        True,
        "",
    ),
    "redirect-all no zones, own rules, legacy": (
        ["--redirect-all-dns-traffic", "--skip-dns-conntrack-zone-split"],
        True,
        "legacy",
    ),
    "redirect-dns, empty namespace, legacy": (["--redirect-dns"], False, "legacy"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_uninstall_gives_back_the_rule_set_install_found(
    namespace: Namespace, tmp_path: Path, case: str
) -> None:
    options, seed, backend = CASES[case]
    suffix = f"-{backend}" if backend else ""
    if seed:
        for tool, network in SEED_NETWORKS.items():
            done = subprocess.run(
                ["ip", "netns", "exec", namespace.name, f"{tool}{suffix}-restore", "--noflush"],
                input=SEED.format(network=network),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
    before = rule_set(namespace, backend)
    assert not seed or all("APP" in rules for rules in before.values())
    install = [
        "install", "transparent-proxy", "--kuma-dp-user", DP_USER,
        "--resolv-conf", str(resolv_conf(tmp_path)), *options,
    ]  # fmt: skip
    ipv4_only = "ipv4" in options
    if ipv4_only:  # over an earlier dualstack install, whose IPv6 rules must go
        kumazone(namespace, *install[: install.index("--ip-family-mode")], backend=backend)
        assert ours(saved(namespace, f"ip6tables{suffix}"))
    printed = kumazone(namespace, *install, backend=backend).stdout
    expected = dry_run(install).split("# IPv6")
    installed = {tool: saved(namespace, f"{tool}{suffix}") for tool in SEED_NETWORKS}
    # The rules read back exactly as install wrote them (and as --dry-run printed them),
    # our jumps first in each built-in chain.
    assert ours(installed["iptables"]) == ours(expected[0])
    if ipv4_only:
        assert len(expected) == 1 and ours(installed["ip6tables"]) == {}
        assert "IPv6: removed an earlier install" in printed
    else:
        assert ours(installed["ip6tables"]) == ours(expected[1])
    for tool, text in installed.items():
        tables = f"\n{text}".split("\n*")
        for table, chain, builtin in CHAINS:
            if f"{table} {chain}" not in ours(text):
                continue
            (rules,) = [t for t in tables if t.startswith(f"{table}\n")]
            first = next(line for line in rules.splitlines() if line.startswith(f"-A {builtin} "))
            assert first == f"-A {builtin} -j {chain}", (tool, table, rules)
    # Installing again replaces: nothing doubles.
    kumazone(namespace, *install, backend=backend)
    assert {t: normalised(saved(namespace, f"{t}{suffix}")) for t in SEED_NETWORKS} == {
        t: normalised(text) for t, text in installed.items()
    }
    printed = kumazone(namespace, "uninstall", "transparent-proxy", backend=backend).stdout
    assert "IPv4: removed raw " in printed or "IPv4: removed nat " in printed
    assert rule_set(namespace, backend) == before
    # Twice is fine.
    printed = kumazone(namespace, "uninstall", "transparent-proxy", backend=backend).stdout
    assert printed == (
        f"IPv4: nothing to remove (no {PREFIX}* chain)\n"
        f"IPv6: nothing to remove (no {PREFIX}* chain)\n"
    )
    assert rule_set(namespace, backend) == before


# -- the redirect, for real -------------------------------------------------------------------


def start_dnsmasq(
    namespace: Namespace, log: Path, user: str | None, *options: str
) -> subprocess.Popen[bytes]:
    dnsmasq = find("dnsmasq")
    assert dnsmasq is not None
    as_user = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}"]
    return namespace.start(
        *as_user,
        *(["--clear-groups"] if user else []),
        dnsmasq,
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--pid-file=",
        "--log-queries",
        "--cache-size=0",
        "--log-facility=-",
        *(["--user=root", "--group=root"] if user is None else []),
        *options,
        log=log,
    )


def ask(namespace: Namespace, uid: int, server: str, name: str, tcp: bool = False) -> str:
    """The A record C{server} gives for C{name}, asked by C{uid} on port 53; or what
    went wrong."""
    done = namespace.run(
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "dig", "+short", "+time=2", "+tries=1", "+tcp" if tcp else "+notcp",
        f"@{server}", name, "A",
        timeout=20,
    )  # fmt: skip
    return (done.stdout.strip() or done.stderr.strip()).replace("\n", " ")


def wait_answering(namespace: Namespace, server: str, port: int, answer: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        done = namespace.run(
            "dig", "+short", "+time=1", "+tries=1", "-p", str(port), f"@{server}", "probe.test"
        )
        if done.stdout.strip() == answer:
            return
        assert time.monotonic() < deadline, f"{server}:{port}: {done.stdout}{done.stderr}"
        time.sleep(0.1)


MODES = {
    "redirect-dns": ["--redirect-dns"],
    "redirect-all": ["--redirect-all-dns-traffic"],
    "redirect-dns, no conntrack zones": ["--redirect-dns", "--skip-dns-conntrack-zone-split"],
    "redirect-all, ipv4": ["--redirect-all-dns-traffic", "--ip-family-mode", "ipv4"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_dns_from_the_application_reaches_the_dataplane(
    namespace: Namespace, users: dict[str, int], tmp_path: Path, mode: str
) -> None:
    options = MODES[mode]
    dataplane_log = tmp_path / "dataplane.log"
    start_dnsmasq(
        namespace, dataplane_log, DP_USER,
        f"--port={PORT}", "--listen-address=127.0.0.1,::1",
        f"--address=/probe.test/{FROM_DATAPLANE}", f"--server={NAMESERVER}",
    )  # fmt: skip
    start_dnsmasq(
        namespace, tmp_path / "upstream.log", None,
        "--port=53", f"--listen-address={NAMESERVER},{NAMESERVER6},{OTHER},{OTHER6}",
        f"--address=/probe.test/{FROM_UPSTREAM}", f"--address=/other.test/{FORWARDED}",
    )  # fmt: skip
    wait_answering(namespace, "127.0.0.1", PORT, FROM_DATAPLANE)
    wait_answering(namespace, NAMESERVER6, 53, FROM_UPSTREAM)
    app, dp = users["app"], users["dp"]
    assert ask(namespace, app, NAMESERVER, "probe.test") == FROM_UPSTREAM

    kumazone(
        namespace, "install", "transparent-proxy", "--kuma-dp-user", DP_USER,
        "--resolv-conf", str(resolv_conf(tmp_path)), *options,
    )  # fmt: skip
    redirect_all = "--redirect-all-dns-traffic" in options
    ipv6 = "ipv4" not in options
    for tcp in (False, True):
        how = "TCP" if tcp else "UDP"
        for server, redirected in (
            (NAMESERVER, True),
            (NAMESERVER6, ipv6),
            (OTHER, redirect_all),
            (OTHER6, redirect_all and ipv6),
        ):
            expected = FROM_DATAPLANE if redirected else FROM_UPSTREAM
            assert ask(namespace, app, server, "probe.test", tcp) == expected, (how, server)
            # The dataplane's own queries are never redirected.
            assert ask(namespace, dp, server, "probe.test", tcp) == FROM_UPSTREAM, (how, server)
        # A name the dataplane does not know: it forwards the query to the upstream, as
        # the dataplane user, and that query goes out.
        forwarded = dataplane_log.read_text().count(f"forwarded other.test to {NAMESERVER}")
        assert ask(namespace, app, NAMESERVER, "other.test", tcp) == FORWARDED, how
        assert dataplane_log.read_text().count("forwarded other.test") == forwarded + 1, how

    kumazone(namespace, "uninstall", "transparent-proxy")
    for tcp in (False, True):
        assert ask(namespace, app, NAMESERVER, "probe.test", tcp) == FROM_UPSTREAM
        assert ask(namespace, app, NAMESERVER6, "probe.test", tcp) == FROM_UPSTREAM
