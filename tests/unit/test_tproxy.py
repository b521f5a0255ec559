"""kumazone install / uninstall transparent-proxy: the rules as text, and install and
uninstall against an in-memory iptables (L{FakeIptables}).

The rules run for real, in a network namespace, in tests/lab/test_tproxy.py.
"""

from __future__ import annotations

import pwd
import shlex
from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path

import pytest

from kumazone import cli
from kumazone.dataplane import tproxy
from kumazone.dataplane.tproxy import (
    CT_OUTPUT,
    CT_PREROUTING,
    REDIRECT,
    Completed,
    DnsRedirect,
    Family,
    Iptables,
    TransparentProxyError,
    dataplane_uid,
    dns_redirect,
    dry_run_text,
    find_iptables,
    installed_chains,
    parse_nameservers,
    removal_input,
    require_root,
    restore_input,
)

NS4 = (ip_address("192.0.2.53"), ip_address("198.51.100.53"))
NS6 = (ip_address("2001:db8::53"),)
ALL = DnsRedirect(uid=5678, redirect_all=True)
BY_NAMESERVER = DnsRedirect(uid=5678, redirect_all=False, nameservers=(NS4[0], NS6[0], NS4[1]))


# -- the rules ---------------------------------------------------------------------------


def test_redirect_all_dns_traffic_is_kumas_rule_set_plus_tcp() -> None:
    assert restore_input(ALL, 4) == (
        "*raw\n"
        ":KUMAZONE_DNS_CT_PREROUTING - [0:0]\n"
        ":KUMAZONE_DNS_CT_OUTPUT - [0:0]\n"
        "-A KUMAZONE_DNS_CT_OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 5678"
        " -j CT --zone 1\n"
        "-A KUMAZONE_DNS_CT_OUTPUT -p udp -m udp --sport 15053 -m owner --uid-owner 5678"
        " -j CT --zone 2\n"
        "-A KUMAZONE_DNS_CT_OUTPUT -p udp -m udp --dport 53 -j CT --zone 2\n"
        "-A KUMAZONE_DNS_CT_PREROUTING -p udp -m udp --sport 53 -j CT --zone 1\n"
        "-I PREROUTING 1 -j KUMAZONE_DNS_CT_PREROUTING\n"
        "-I OUTPUT 1 -j KUMAZONE_DNS_CT_OUTPUT\n"
        "COMMIT\n"
        "*nat\n"
        ":KUMAZONE_DNS_REDIRECT - [0:0]\n"
        "-A KUMAZONE_DNS_REDIRECT -p udp -m udp --dport 53 -m owner --uid-owner 5678 -j RETURN\n"
        "-A KUMAZONE_DNS_REDIRECT -p tcp -m tcp --dport 53 -m owner --uid-owner 5678 -j RETURN\n"
        "-A KUMAZONE_DNS_REDIRECT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053\n"
        "-A KUMAZONE_DNS_REDIRECT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053\n"
        "-I OUTPUT 1 -j KUMAZONE_DNS_REDIRECT\n"
        "COMMIT\n"
    )
    # Without addresses, both families have the same rules.
    assert restore_input(ALL, 6) == restore_input(ALL, 4)


def test_redirect_dns_has_the_address_rules_per_nameserver_in_order() -> None:
    assert restore_input(BY_NAMESERVER, 4) == (
        "*raw\n"
        ":KUMAZONE_DNS_CT_PREROUTING - [0:0]\n"
        ":KUMAZONE_DNS_CT_OUTPUT - [0:0]\n"
        "-A KUMAZONE_DNS_CT_OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 5678"
        " -j CT --zone 1\n"
        "-A KUMAZONE_DNS_CT_OUTPUT -p udp -m udp --sport 15053 -m owner --uid-owner 5678"
        " -j CT --zone 2\n"
        "-A KUMAZONE_DNS_CT_OUTPUT -d 192.0.2.53/32 -p udp -m udp --dport 53 -j CT --zone 2\n"
        "-A KUMAZONE_DNS_CT_OUTPUT -d 198.51.100.53/32 -p udp -m udp --dport 53 -j CT --zone 2\n"
        "-A KUMAZONE_DNS_CT_PREROUTING -s 192.0.2.53/32 -p udp -m udp --sport 53 -j CT --zone 1\n"
        "-A KUMAZONE_DNS_CT_PREROUTING -s 198.51.100.53/32 -p udp -m udp --sport 53"
        " -j CT --zone 1\n"
        "-I PREROUTING 1 -j KUMAZONE_DNS_CT_PREROUTING\n"
        "-I OUTPUT 1 -j KUMAZONE_DNS_CT_OUTPUT\n"
        "COMMIT\n"
        "*nat\n"
        ":KUMAZONE_DNS_REDIRECT - [0:0]\n"
        "-A KUMAZONE_DNS_REDIRECT -p udp -m udp --dport 53 -m owner --uid-owner 5678 -j RETURN\n"
        "-A KUMAZONE_DNS_REDIRECT -p tcp -m tcp --dport 53 -m owner --uid-owner 5678 -j RETURN\n"
        "-A KUMAZONE_DNS_REDIRECT -d 192.0.2.53/32 -p udp -m udp --dport 53"
        " -j REDIRECT --to-ports 15053\n"
        "-A KUMAZONE_DNS_REDIRECT -d 192.0.2.53/32 -p tcp -m tcp --dport 53"
        " -j REDIRECT --to-ports 15053\n"
        "-A KUMAZONE_DNS_REDIRECT -d 198.51.100.53/32 -p udp -m udp --dport 53"
        " -j REDIRECT --to-ports 15053\n"
        "-A KUMAZONE_DNS_REDIRECT -d 198.51.100.53/32 -p tcp -m tcp --dport 53"
        " -j REDIRECT --to-ports 15053\n"
        "-I OUTPUT 1 -j KUMAZONE_DNS_REDIRECT\n"
        "COMMIT\n"
    )


def test_redirect_dns_ipv6_takes_the_ipv6_nameservers() -> None:
    rules = restore_input(BY_NAMESERVER, 6).splitlines()
    addressed = [line for line in rules if " -d " in line or " -s " in line]
    assert addressed == [
        f"-A {CT_OUTPUT} -d 2001:db8::53/128 -p udp -m udp --dport 53 -j CT --zone 2",
        f"-A {CT_PREROUTING} -s 2001:db8::53/128 -p udp -m udp --sport 53 -j CT --zone 1",
        f"-A {REDIRECT} -d 2001:db8::53/128 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
        f"-A {REDIRECT} -d 2001:db8::53/128 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
    ]
    assert not any("192.0.2" in line for line in rules)


def test_redirect_dns_without_nameservers_of_a_family_keeps_only_the_dataplane_rules() -> None:
    only4 = DnsRedirect(uid=1, redirect_all=False, nameservers=NS4)
    rules = restore_input(only4, 6).splitlines()
    assert not any("REDIRECT --to-ports" in line for line in rules)
    assert [line for line in rules if line.startswith("-A")] == [
        f"-A {CT_OUTPUT} -p udp -m udp --dport 53 -m owner --uid-owner 1 -j CT --zone 1",
        f"-A {CT_OUTPUT} -p udp -m udp --sport 15053 -m owner --uid-owner 1 -j CT --zone 2",
        f"-A {REDIRECT} -p udp -m udp --dport 53 -m owner --uid-owner 1 -j RETURN",
        f"-A {REDIRECT} -p tcp -m tcp --dport 53 -m owner --uid-owner 1 -j RETURN",
    ]
    assert "no address (no IPv6 nameserver in the resolv.conf)" in only4.describe(6)


def test_skip_conntrack_zone_split_leaves_the_raw_table_alone() -> None:
    skipped = DnsRedirect(uid=5678, redirect_all=True, conntrack_zone_split=False)
    assert restore_input(skipped, 4) == restore_input(ALL, 4).partition("COMMIT\n")[2]
    assert "*raw" not in restore_input(skipped, 6)
    assert installed_chains(restore_input(skipped, 4)) == {"nat": [REDIRECT]}


def test_the_port_is_the_dataplanes_source_port_and_the_redirect_target() -> None:
    text = restore_input(DnsRedirect(uid=7, redirect_all=True, port=5353), 4)
    assert "--sport 5353 -m owner --uid-owner 7 -j CT --zone 2" in text
    assert text.count("--to-ports 5353") == 2 and "15053" not in text


def test_ip_family_modes() -> None:
    assert ALL.families() == (4, 6)
    assert DnsRedirect(uid=1, redirect_all=True, ipv6=False).families() == (4,)
    ipv4_only = DnsRedirect(uid=1, redirect_all=True, ipv6=False)
    assert "# IPv6" not in dry_run_text(ipv4_only) and "# IPv4" in dry_run_text(ipv4_only)


def test_dry_run_text_is_each_familys_restore_input_with_comments() -> None:
    text = dry_run_text(BY_NAMESERVER)
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert body == restore_input(BY_NAMESERVER, 4) + restore_input(BY_NAMESERVER, 6)
    assert text.startswith(
        "# IPv4: iptables-restore --noflush input; UDP and TCP port 53 to 192.0.2.53, "
        "198.51.100.53 redirected to port 15053, except from UID 5678; conntrack zones split\n"
    )
    assert "# IPv6: ip6tables-restore --noflush input; UDP and TCP port 53 to 2001:db8::53" in text


# -- options -------------------------------------------------------------------------------


def test_parse_nameservers() -> None:
    text = (
        "# generated\n"
        "search example.test\n"
        "nameserver 192.0.2.53\n"
        "nameserver\t2001:db8::53  # trailing words are ignored\n"
        "; nameserver 203.0.113.1\n"
        "#nameserver 203.0.113.2\n"
        "nameserver fe80::1%eth0\n"
        "nameserver not-an-address\n"
        "nameserver\n"
        "nameserver 192.0.2.53\n"
        "options ndots:5\n"
        "  nameserver 198.51.100.53\n"
    )
    assert parse_nameservers(text) == (
        ip_address("192.0.2.53"),
        ip_address("2001:db8::53"),
        ip_address("fe80::1"),
        ip_address("198.51.100.53"),
    )
    assert parse_nameservers("") == ()


def fake_getpwnam(name: str) -> pwd.struct_passwd:
    if name != "kuma-dp":
        raise KeyError(name)
    return pwd.struct_passwd(("kuma-dp", "x", 5678, 5678, "", "/", "/usr/sbin/nologin"))


def test_dataplane_uid() -> None:
    assert dataplane_uid("kuma-dp", fake_getpwnam) == 5678
    assert dataplane_uid("4242", fake_getpwnam) == 4242
    assert dataplane_uid("0", fake_getpwnam) == 0
    with pytest.raises(TransparentProxyError, match=r"there is no user 'nobody-here' \(make"):
        dataplane_uid("nobody-here", fake_getpwnam)
    with pytest.raises(TransparentProxyError, match="is not a UID"):
        dataplane_uid("4294967295", fake_getpwnam)


def test_dns_redirect_reads_the_resolv_conf_with_redirect_dns_only(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    redirect = dns_redirect(
        "kuma-dp", redirect_all=False, resolv_conf=str(resolv), getpwnam=fake_getpwnam
    )
    assert redirect == DnsRedirect(uid=5678, redirect_all=False, nameservers=(NS4[0], NS6[0]))
    missing = str(tmp_path / "missing")
    everything = dns_redirect(
        "kuma-dp",
        redirect_all=True,
        port=5353,
        ip_family_mode="ipv4",
        conntrack_zone_split=False,
        resolv_conf=missing,
        getpwnam=fake_getpwnam,
    )
    assert everything == DnsRedirect(
        uid=5678, redirect_all=True, port=5353, ipv6=False, conntrack_zone_split=False
    )
    with pytest.raises(TransparentProxyError, match=r"--resolv-conf: '.*missing' cannot be read"):
        dns_redirect("kuma-dp", redirect_all=False, resolv_conf=missing, getpwnam=fake_getpwnam)


def test_dns_redirect_refuses_what_would_redirect_nothing(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example.test\n")
    with pytest.raises(TransparentProxyError, match="names no IPv4 or IPv6 nameserver"):
        dns_redirect("1", redirect_all=False, resolv_conf=str(resolv))
    resolv.write_text("nameserver 2001:db8::53\n")
    with pytest.raises(TransparentProxyError, match="names no IPv4 nameserver"):
        dns_redirect("1", redirect_all=False, ip_family_mode="ipv4", resolv_conf=str(resolv))
    assert dns_redirect("1", redirect_all=False, resolv_conf=str(resolv)).nameservers == NS6
    with pytest.raises(TransparentProxyError, match="--redirect-dns-port: 0 is not a port"):
        dns_redirect("1", redirect_all=True, port=0)
    with pytest.raises(TransparentProxyError, match="--ip-family-mode: 'ipv6'"):
        dns_redirect("1", redirect_all=True, ip_family_mode="ipv6")


# -- reading iptables-save ----------------------------------------------------------------

#: What iptables-nft-save prints with our rules among others (and a foreign chain that
#: jumps to ours, which install never makes but uninstall must still undo).
SAVED = """\
# Warning: iptables-legacy tables present, use iptables-legacy-save to see them
# Generated by iptables-save v1.8.9 (nf_tables) on Tue Dec  1 15:31:21 2026
*filter
:INPUT ACCEPT [10:600]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [10:600]
-A INPUT -i lo -j ACCEPT
COMMIT
# Completed on Tue Dec  1 15:31:21 2026
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUMAZONE_DNS_CT_OUTPUT - [0:0]
:KUMAZONE_DNS_CT_PREROUTING - [0:0]
-A PREROUTING -j KUMAZONE_DNS_CT_PREROUTING
-A PREROUTING -p tcp -m tcp --dport 22 -j CT --notrack
-A OUTPUT -j KUMAZONE_DNS_CT_OUTPUT
-A KUMAZONE_DNS_CT_OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 5678 -j CT --zone 1
-A KUMAZONE_DNS_CT_PREROUTING -p udp -m udp --sport 53 -j CT --zone 1
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:APP - [0:0]
:KUMAZONE_DNS_REDIRECT - [0:0]
-A OUTPUT -j KUMAZONE_DNS_REDIRECT
-A OUTPUT -m comment --comment "not ours: -j KUMAZONE_DNS_REDIRECT" -j APP
-A APP -d 203.0.113.0/24 -g KUMAZONE_DNS_REDIRECT
-A APP -j RETURN
-A KUMAZONE_DNS_REDIRECT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
COMMIT
"""


def test_installed_chains_are_ours_by_prefix() -> None:
    assert installed_chains(SAVED) == {
        "raw": [CT_OUTPUT, CT_PREROUTING],
        "nat": [REDIRECT],
    }
    assert installed_chains(SAVED.replace("KUMAZONE_DNS_", "KUMA_")) == {}
    assert installed_chains("") == {}


def test_removal_input_removes_the_jumps_then_the_chains() -> None:
    assert removal_input(SAVED) == (
        "*raw\n"
        "-D PREROUTING -j KUMAZONE_DNS_CT_PREROUTING\n"
        "-D OUTPUT -j KUMAZONE_DNS_CT_OUTPUT\n"
        "-F KUMAZONE_DNS_CT_OUTPUT\n"
        "-F KUMAZONE_DNS_CT_PREROUTING\n"
        "-X KUMAZONE_DNS_CT_OUTPUT\n"
        "-X KUMAZONE_DNS_CT_PREROUTING\n"
        "COMMIT\n"
        "*nat\n"
        "-D OUTPUT -j KUMAZONE_DNS_REDIRECT\n"
        "-D APP -d 203.0.113.0/24 -g KUMAZONE_DNS_REDIRECT\n"
        "-F KUMAZONE_DNS_REDIRECT\n"
        "-X KUMAZONE_DNS_REDIRECT\n"
        "COMMIT\n"
    )


def test_removal_input_is_empty_without_our_chains() -> None:
    foreign = SAVED.split("*raw")[0]
    assert removal_input(foreign) == ""
    assert removal_input("") == ""


def test_a_doubled_jump_is_removed_twice() -> None:
    doubled = (
        "*nat\n:OUTPUT ACCEPT [0:0]\n:KUMAZONE_DNS_REDIRECT - [0:0]\n"
        + ("-A OUTPUT -j KUMAZONE_DNS_REDIRECT\n" * 2)
        + "COMMIT\n"
    )
    assert removal_input(doubled).count("-D OUTPUT -j KUMAZONE_DNS_REDIRECT\n") == 2


# -- install and uninstall against an in-memory iptables ------------------------------------


class FakeIptables:
    """iptables-save and iptables-restore --noflush over tables kept in memory.

    Just enough of iptables-restore for our input: chain declarations, -A, -I N, -D
    by rule text, -F, -X, COMMIT (a table's changes apply at COMMIT, or not at all).
    """

    BUILTIN = {
        "raw": ["PREROUTING", "OUTPUT"],
        "nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    }

    def __init__(self, seed: str = "", fail_restore: bool = False) -> None:
        self.tables: dict[str, dict[str, list[str]]] = {}
        self.fail_restore = fail_restore
        if seed:
            self.restore(seed)

    def save(self) -> str:
        lines = ["# Generated by iptables-save v1.8.9 (nf_tables)"]
        for name, chains in self.tables.items():
            lines.append(f"*{name}")
            lines += [
                f":{c} {'ACCEPT' if c in self.BUILTIN.get(name, ()) else '-'} [0:0]" for c in chains
            ]
            lines += [f"-A {c} {rule}" for c, rules in chains.items() for rule in rules]
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def restore(self, text: str) -> None:
        pending: dict[str, list[str]] | None = None
        name = ""
        for line in text.splitlines():
            if line.startswith("*"):
                name = line[1:]
                current = self.tables.get(name) or {c: [] for c in self.BUILTIN[name]}
                pending = {c: list(rules) for c, rules in current.items()}
                continue
            assert pending is not None, line
            if line == "COMMIT":
                self.tables[name] = pending
                pending = None
            elif line.startswith(":"):
                pending.setdefault(line[1:].split()[0], [])
            else:
                words = shlex.split(line)
                verb, chain = words[0], words[1]
                if verb == "-A":
                    pending[chain].append(line.split(None, 2)[2])
                elif verb == "-I":
                    assert words[2] == "1"
                    pending[chain].insert(0, line.split(None, 3)[3])
                elif verb == "-D":
                    pending[chain].remove(line.split(None, 2)[2])
                elif verb == "-F":
                    pending[chain].clear()
                elif verb == "-X":
                    assert not pending[chain] and chain not in self.BUILTIN[name]
                    del pending[chain]
                else:
                    raise AssertionError(line)
        assert pending is None, "no COMMIT"

    def run(self, argv: Sequence[str], stdin: str | None) -> Completed:
        if argv[-1] == "--version":
            return Completed(0, "iptables-restore v1.8.9 (nf_tables)\n", "")
        if argv[0].endswith("-save"):
            return Completed(0, self.save(), "")
        assert list(argv[1:]) == ["--wait", "--noflush"] and stdin is not None
        if self.fail_restore:
            return Completed(1, "", "ip6tables-restore: line 2 failed\n")
        self.restore(stdin)
        return Completed(0, "", "")


SEED = """\
*raw
-A PREROUTING -p tcp -m tcp --dport 22 -j CT --notrack
COMMIT
*nat
:APP - [0:0]
-A OUTPUT -j APP
-A APP -d 203.0.113.0/24 -j RETURN
COMMIT
"""


class Host:
    """Both families of a host, and what the commands said."""

    def __init__(self, seed: str = "", fail6: bool = False, missing6: bool = False) -> None:
        self.fakes: dict[int, FakeIptables] = {4: FakeIptables(seed), 6: FakeIptables(seed, fail6)}
        self.missing6 = missing6
        self.said: list[str] = []

    def find(self, family: Family) -> Iptables:
        if family == 6 and self.missing6:
            raise TransparentProxyError(
                "ip6tables-save is not installed (apt-get install iptables)"
            )
        name = "iptables" if family == 4 else "ip6tables"
        return Iptables(family, f"{name}-save", f"{name}-restore", self.fakes[family].run)

    def saved(self) -> tuple[str, str]:
        return self.fakes[4].save(), self.fakes[6].save()

    def install(self, redirect: DnsRedirect) -> None:
        tproxy.install(redirect, self.find, self.said.append)

    def uninstall(self, dry_run: bool = False) -> None:
        tproxy.uninstall(self.find, self.said.append, dry_run=dry_run)


@pytest.mark.parametrize("seed", ["", SEED])
@pytest.mark.parametrize("redirect", [ALL, BY_NAMESERVER], ids=["all", "by-nameserver"])
def test_install_then_uninstall_gives_back_the_rules_as_they_were(
    seed: str, redirect: DnsRedirect
) -> None:
    host = Host(seed)
    before = host.saved()
    host.install(redirect)
    for family in (4, 6):
        tables = host.fakes[family].tables
        assert installed_chains(host.fakes[family].save()) == {
            "raw": [CT_PREROUTING, CT_OUTPUT],
            "nat": [REDIRECT],
        }
        # Our jumps come first, so our rules see the packets before anyone else's.
        assert tables["raw"]["PREROUTING"][0] == f"-j {CT_PREROUTING}"
        assert tables["raw"]["OUTPUT"] == [f"-j {CT_OUTPUT}"]
        assert tables["nat"]["OUTPUT"] == [f"-j {REDIRECT}", *(["-j APP"] if seed else [])]
    assert host.said[0].startswith("IPv4: UDP and TCP port 53 to ")
    assert host.said[0].endswith(
        "(iptables-restore v1.8.9 (nf_tables): "
        "raw KUMAZONE_DNS_CT_PREROUTING, KUMAZONE_DNS_CT_OUTPUT; nat KUMAZONE_DNS_REDIRECT)"
    )
    host.said.clear()
    host.uninstall()
    # iptables cannot delete a table: the ones install made stay, empty.
    assert host.saved() == (before if seed else Host("*raw\nCOMMIT\n*nat\nCOMMIT\n").saved())
    assert host.said == [
        "IPv4: removed raw KUMAZONE_DNS_CT_PREROUTING, KUMAZONE_DNS_CT_OUTPUT; "
        "nat KUMAZONE_DNS_REDIRECT",
        "IPv6: removed raw KUMAZONE_DNS_CT_PREROUTING, KUMAZONE_DNS_CT_OUTPUT; "
        "nat KUMAZONE_DNS_REDIRECT",
    ]
    host.said.clear()
    host.uninstall()
    assert host.said == [
        "IPv4: nothing to remove (no KUMAZONE_DNS_* chain)",
        "IPv6: nothing to remove (no KUMAZONE_DNS_* chain)",
    ]


def test_install_over_an_install_replaces_it() -> None:
    host = Host(SEED)
    host.install(ALL)
    once = host.saved()
    host.install(ALL)
    assert host.saved() == once
    host.said.clear()
    host.install(BY_NAMESERVER)
    assert host.said[0] == (
        "IPv4: removed an earlier install "
        "(raw KUMAZONE_DNS_CT_PREROUTING, KUMAZONE_DNS_CT_OUTPUT; nat KUMAZONE_DNS_REDIRECT)"
    )
    # Exactly the new rules: the redirect-all ones are gone.
    assert host.fakes[4].tables["nat"][REDIRECT] == [
        line.split(None, 2)[2]
        for line in restore_input(BY_NAMESERVER, 4).splitlines()
        if line.startswith(f"-A {REDIRECT}")
    ]
    host.install(DnsRedirect(uid=5678, redirect_all=True, conntrack_zone_split=False))
    assert installed_chains(host.fakes[6].save()) == {"nat": [REDIRECT]}
    host.uninstall()
    assert host.saved() == Host(SEED).saved()


def test_ipv4_mode_removes_an_earlier_installs_ipv6_rules() -> None:
    host = Host(SEED)
    host.install(ALL)
    host.said.clear()
    host.install(DnsRedirect(uid=5678, redirect_all=True, ipv6=False))
    assert installed_chains(host.fakes[6].save()) == {}
    assert host.fakes[6].save() == Host(SEED).fakes[6].save()
    assert host.said[-1].startswith("IPv6: removed an earlier install (raw ")
    # And without ip6tables at all, ipv4 mode installs and uninstall skips IPv6.
    bare = Host(SEED, missing6=True)
    bare.install(DnsRedirect(uid=5678, redirect_all=True, ipv6=False))
    bare.said.clear()
    bare.uninstall()
    assert bare.said[1] == (
        "IPv6: skipped, its rules cannot be read "
        "(ip6tables-save is not installed (apt-get install iptables))"
    )
    assert bare.fakes[4].save() == Host(SEED).fakes[4].save()


def test_a_failed_ipv6_install_removes_the_ipv4_rules_again() -> None:
    host = Host(SEED, fail6=True)
    before = host.saved()
    with pytest.raises(TransparentProxyError) as raised:
        host.install(ALL)
    assert str(raised.value) == (
        "ip6tables-restore --wait --noflush: ip6tables-restore: line 2 failed; "
        "the IPv4 rules were removed again; on a host without IPv6 use --ip-family-mode ipv4"
    )
    assert host.saved() == before
    missing = Host(SEED, missing6=True)
    with pytest.raises(TransparentProxyError, match=r"not installed .* removed again; on a host"):
        missing.install(ALL)
    assert missing.fakes[4].save() == Host(SEED).fakes[4].save()


def test_uninstall_dry_run_prints_the_input_and_changes_nothing() -> None:
    host = Host(SEED)
    host.install(ALL)
    installed = host.saved()
    host.said.clear()
    host.uninstall(dry_run=True)
    assert host.saved() == installed
    assert (
        host.said[0]
        == "# IPv4: iptables-restore --noflush input\n" + removal_input(installed[0]).rstrip()
    )
    assert host.said[1].startswith("# IPv6: ip6tables-restore --noflush input\n*raw\n")


# -- the edge ---------------------------------------------------------------------------------


def test_find_iptables_takes_the_systems_or_the_named_backend() -> None:
    seen: list[tuple[str, str]] = []

    def which(name: str, path: str) -> str | None:
        seen.append((name, path))
        return f"/usr/sbin/{name}"

    found = find_iptables(6, {"PATH": "/usr/bin"}, which)
    assert (found.save, found.restore) == (
        "/usr/sbin/ip6tables-save",
        "/usr/sbin/ip6tables-restore",
    )
    assert seen[0][1].split(":") == ["/usr/bin", "/usr/sbin", "/sbin"]
    legacy = find_iptables(4, {tproxy.BACKEND_VARIABLE: "legacy"}, which)
    assert legacy.restore == "/usr/sbin/iptables-legacy-restore"
    assert find_iptables(4, {tproxy.BACKEND_VARIABLE: "nft"}, which).save.endswith("nft-save")
    with pytest.raises(TransparentProxyError, match="'xtables' is not one of nft, legacy"):
        find_iptables(4, {tproxy.BACKEND_VARIABLE: "xtables"}, which)
    with pytest.raises(TransparentProxyError, match=r"^iptables-save is not installed"):
        find_iptables(4, {}, lambda name, path: None)


def test_a_failing_command_is_one_line_naming_it() -> None:
    def run(argv: Sequence[str], stdin: str | None) -> Completed:
        return Completed(
            4,
            "",
            "iptables-save v1.8.9 (nf_tables): Could not fetch rule set"
            " generation id: Permission denied (you must be root)\n",
        )

    with pytest.raises(TransparentProxyError) as raised:
        Iptables(4, "/usr/sbin/iptables-save", "/usr/sbin/iptables-restore", run).read()
    assert str(raised.value) == (
        "/usr/sbin/iptables-save: iptables-save v1.8.9 (nf_tables): Could not fetch rule set"
        " generation id: Permission denied (you must be root)"
    )
    assert "\n" not in str(raised.value)


def test_require_root() -> None:
    require_root(0)
    with pytest.raises(TransparentProxyError) as raised:
        require_root(1000)
    assert str(raised.value) == (
        "reading and changing the host's iptables rules needs root (run it with sudo)"
    )
    with pytest.raises(TransparentProxyError, match=r"sudo, or see the rules without root"):
        require_root(1000, dry_run_works=True)


# -- the command --------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_dry_run_prints_both_families(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\nnameserver 198.51.100.53\nnameserver 2001:db8::53\n")
    status, out, err = run(
        capsys, "install", "transparent-proxy", "--kuma-dp-user", "5678", "--redirect-dns",
        "--resolv-conf", str(resolv), "--dry-run",
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == dry_run_text(BY_NAMESERVER)
    status, out, err = run(
        capsys, "install", "transparent-proxy", "--kuma-dp-user", "5678",
        "--redirect-all-dns-traffic", "--redirect-dns-port", "5353", "--ip-family-mode", "ipv4",
        "--skip-dns-conntrack-zone-split", "--dry-run",
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == dry_run_text(
        DnsRedirect(uid=5678, redirect_all=True, port=5353, ipv6=False, conntrack_zone_split=False)
    )


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(
        capsys, "install", "transparent-proxy", "--kuma-dp-user", "no-such-user-kz",
        "--redirect-all-dns-traffic", "--dry-run",
    )  # fmt: skip
    assert (status, out) == (1, "")
    assert err == (
        "kumazone: --kuma-dp-user: there is no user 'no-such-user-kz' "
        "(make one, e.g. useradd --system no-such-user-kz, or give a numeric UID)\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--kuma-dp-user", "1"],
        ["--kuma-dp-user", "1", "--redirect-dns", "--redirect-all-dns-traffic"],
        ["--redirect-dns"],
        ["--kuma-dp-user", "1", "--redirect-dns", "--ip-family-mode", "ipv6"],
    ],
)
def test_cli_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["install", "transparent-proxy", *argv, "--dry-run"])
    assert exited.value.code == 2
    assert "usage: kumazone install transparent-proxy" in capsys.readouterr().err


def test_cli_install_dns_is_still_there(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("install", "uninstall"):
        with pytest.raises(SystemExit):
            cli.main([verb, "--help"])
        assert "{dns,transparent-proxy}" in capsys.readouterr().out
