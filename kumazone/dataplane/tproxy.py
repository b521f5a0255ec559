"""The DNS part of Kuma's transparent proxy: iptables rules that send the workload's DNS
to its dataplane.  Pure but for the edge (L{Iptables}, L{find_iptables}).

C{kumazone install transparent-proxy} writes Kuma's DNS rule set with
C{iptables-restore --noflush} and C{ip6tables-restore --noflush} (whichever backend
they are, nf_tables or legacy).  With U the dataplane user's UID, P the redirect port
(15053) and N each nameserver of the resolv.conf (C{--redirect-dns}) or any address
(C{--redirect-all-dns-traffic}):

  raw, unless --skip-dns-conntrack-zone-split:
    OUTPUT      udp dport 53 from U   CT zone 1   the dataplane's upstream queries
    OUTPUT      udp sport P from U    CT zone 2   its answers to the application
    OUTPUT      udp dport 53 to N     CT zone 2   the application's queries
    PREROUTING  udp sport 53 from N   CT zone 1   the upstream's answers
  nat:
    OUTPUT      udp and tcp dport 53 from U   RETURN          the dataplane's own
    OUTPUT      udp and tcp dport 53 to N     REDIRECT to P   everyone else's

The first CT rule that matches a packet sets its zone.  The zones keep the two legs of a
query apart in conntrack: the application's flow (DNATed to P, zone 2) and the
dataplane's flow to the same upstream (zone 1) can then share a tuple without one being
taken for the other, so an upstream answer is never NATed back into the dataplane.

TCP 53 is redirected too (Kuma 2.14 leaves it alone), because the dataplane serves TCP
on the same port: a client whose UDP answer was truncated retries over TCP and must reach
the same resolver, which knows the mesh names; if the retry went around it to the
upstream, a mesh name that UDP answered would be NXDOMAIN over TCP, and the client would
see answers that depend on their size.  The dataplane's own TCP to port 53 passes.  TCP
needs no conntrack zones: a connection's source port belongs to its socket while the
connection lives, and a new SYN replaces an entry in TIME_WAIT, so the dataplane's
upstream connections are never matched to an application's.

Every rule lives in chains of our own, named C{KUMAZONE_DNS_*} (L{CHAINS}), each
jumped to from the top of its built-in chain.  C{kumazone uninstall transparent-proxy}
finds them in C{iptables-save} and removes the jumps and the chains, nothing else; an
install over an install removes the old rules first, so nothing is ever doubled.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from itertools import pairwise
from typing import Literal

__all__ = [
    "BACKEND_VARIABLE",
    "CHAINS",
    "CHAIN_PREFIX",
    "CT_OUTPUT",
    "CT_PREROUTING",
    "DEFAULT_REDIRECT_PORT",
    "IP_FAMILY_MODES",
    "REDIRECT",
    "Completed",
    "DnsRedirect",
    "Family",
    "Iptables",
    "TransparentProxyError",
    "dataplane_uid",
    "dns_redirect",
    "dry_run_text",
    "find_iptables",
    "install",
    "installed_chains",
    "parse_nameservers",
    "removal_input",
    "require_root",
    "restore_input",
    "uninstall",
]

Family = Literal[4, 6]
Address = IPv4Address | IPv6Address

DNS_PORT = 53
DEFAULT_REDIRECT_PORT = 15053
IP_FAMILY_MODES = ("dualstack", "ipv4")

#: Every chain install makes starts so; uninstall removes every chain that does.
CHAIN_PREFIX = "KUMAZONE_DNS_"
CT_PREROUTING = CHAIN_PREFIX + "CT_PREROUTING"
CT_OUTPUT = CHAIN_PREFIX + "CT_OUTPUT"
REDIRECT = CHAIN_PREFIX + "REDIRECT"
#: (table, our chain, the built-in chain that jumps to it).
CHAINS = (
    ("raw", CT_PREROUTING, "PREROUTING"),
    ("raw", CT_OUTPUT, "OUTPUT"),
    ("nat", REDIRECT, "OUTPUT"),
)

#: Chooses the iptables binaries: unset or empty for the system's C{iptables-restore},
#: C{nft} or C{legacy} for C{iptables-nft-restore} or C{iptables-legacy-restore}.
BACKEND_VARIABLE = "KUMAZONE_IPTABLES_BACKEND"
_BACKEND_SUFFIXES = {"": "", "nft": "-nft", "legacy": "-legacy"}
#: Where iptables lives when sbin is not on PATH (sudo, cron, a user's shell).
_SBIN = ("/usr/sbin", "/sbin")
#: How long one iptables command may take (it waits for the xtables lock).
IPTABLES_TIMEOUT = 60.0


class TransparentProxyError(Exception):
    """Why the rules cannot be built, installed or removed; the text is one line."""


def _label(family: Family) -> str:
    return "IPv4" if family == 4 else "IPv6"


# -- what to install -------------------------------------------------------------------


@dataclass(frozen=True)
class DnsRedirect:
    """The options of C{install transparent-proxy}, resolved: a UID, addresses."""

    #: The dataplane's user: its DNS is never redirected.
    uid: int
    #: C{--redirect-all-dns-traffic}: port 53 to any address; else to L{nameservers}.
    redirect_all: bool
    port: int = DEFAULT_REDIRECT_PORT
    #: C{--ip-family-mode dualstack} (C{ipv4}: no IPv6 rules).
    ipv6: bool = True
    #: Off with C{--skip-dns-conntrack-zone-split}: no raw table rules.
    conntrack_zone_split: bool = True
    #: The resolv.conf nameservers, both families (read with C{--redirect-dns} only).
    nameservers: tuple[Address, ...] = ()

    def families(self) -> tuple[Family, ...]:
        """The families rules are installed for."""
        return (4, 6) if self.ipv6 else (4,)

    def nameservers_of(self, family: Family) -> tuple[Address, ...]:
        """The nameservers of one family, in resolv.conf order."""
        return tuple(a for a in self.nameservers if a.version == family)

    def describe(self, family: Family) -> str:
        """One line: what the rules of C{family} do."""
        if self.redirect_all:
            to = "any address"
        else:
            to = ", ".join(map(str, self.nameservers_of(family))) or (
                f"no address (no {_label(family)} nameserver in the resolv.conf)"
            )
        split = "conntrack zones split" if self.conntrack_zone_split else "no conntrack zones"
        return (
            f"UDP and TCP port {DNS_PORT} to {to} redirected to port {self.port}, "
            f"except from UID {self.uid}; {split}"
        )


def parse_nameservers(text: str) -> tuple[Address, ...]:
    """The C{nameserver} addresses of a resolv.conf, in order, each once.

    A zone index (C{fe80::1%eth0}) is dropped, as iptables matches addresses only;
    a line that is not an address is skipped, as the C library skips it.
    """
    found: list[Address] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ip_address(fields[1].partition("%")[0])
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return tuple(found)


def dataplane_uid(user: str, getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam) -> int:
    """The UID of C{--kuma-dp-user}: a user name, or a number taken as it is."""
    if user.isascii() and user.isdigit():
        uid = int(user)
        if uid > 0xFFFFFFFE:
            raise TransparentProxyError(f"--kuma-dp-user: {user} is not a UID (0-4294967294)")
        return uid
    try:
        return getpwnam(user).pw_uid
    except KeyError:
        raise TransparentProxyError(
            f"--kuma-dp-user: there is no user {user!r} "
            f"(make one, e.g. useradd --system {user}, or give a numeric UID)"
        ) from None


def dns_redirect(
    user: str,
    redirect_all: bool,
    port: int = DEFAULT_REDIRECT_PORT,
    ip_family_mode: str = "dualstack",
    conntrack_zone_split: bool = True,
    resolv_conf: str = "/etc/resolv.conf",
    getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam,
) -> DnsRedirect:
    """The L{DnsRedirect} the command line asks for: the user looked up, the resolv.conf
    read (with C{--redirect-dns} only)."""
    if not 1 <= port <= 65535:
        raise TransparentProxyError(f"--redirect-dns-port: {port} is not a port (1-65535)")
    if ip_family_mode not in IP_FAMILY_MODES:
        raise TransparentProxyError(
            f"--ip-family-mode: {ip_family_mode!r} is not one of {', '.join(IP_FAMILY_MODES)}"
        )
    redirect = DnsRedirect(
        uid=dataplane_uid(user, getpwnam),
        redirect_all=redirect_all,
        port=port,
        ipv6=ip_family_mode == "dualstack",
        conntrack_zone_split=conntrack_zone_split,
    )
    if redirect_all:
        return redirect
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as f:
            nameservers = parse_nameservers(f.read())
    except OSError as e:
        raise TransparentProxyError(
            f"--resolv-conf: {resolv_conf!r} cannot be read ({e.strerror or e})"
        ) from None
    redirect = replace(redirect, nameservers=nameservers)
    if not any(redirect.nameservers_of(family) for family in redirect.families()):
        families = " or ".join(_label(f) for f in redirect.families())
        raise TransparentProxyError(
            f"--redirect-dns: {resolv_conf!r} names no {families} nameserver, so there is "
            "nothing to redirect (--redirect-all-dns-traffic redirects port 53 to any address)"
        )
    return redirect


# -- the rules, as iptables-restore input ----------------------------------------------


def _cidr(address: Address) -> str:
    return f"{address}/{address.max_prefixlen}"


def restore_input(redirect: DnsRedirect, family: Family) -> str:
    """The C{iptables-restore --noflush} input (C{ip6tables-restore} for 6) installing
    the rules of C{family}, each rule as C{iptables-save} prints it back."""
    owner = f"-m owner --uid-owner {redirect.uid}"
    if redirect.redirect_all:
        destinations, sources = [""], [""]
    else:
        addresses = redirect.nameservers_of(family)
        destinations = [f" -d {_cidr(a)}" for a in addresses]
        sources = [f" -s {_cidr(a)}" for a in addresses]
    lines: list[str] = []
    if redirect.conntrack_zone_split:
        udp_to_dns = f"-p udp -m udp --dport {DNS_PORT}"
        lines += [
            "*raw",
            f":{CT_PREROUTING} - [0:0]",
            f":{CT_OUTPUT} - [0:0]",
            f"-A {CT_OUTPUT} {udp_to_dns} {owner} -j CT --zone 1",
            f"-A {CT_OUTPUT} -p udp -m udp --sport {redirect.port} {owner} -j CT --zone 2",
            *(f"-A {CT_OUTPUT}{d} {udp_to_dns} -j CT --zone 2" for d in destinations),
            *(
                f"-A {CT_PREROUTING}{s} -p udp -m udp --sport {DNS_PORT} -j CT --zone 1"
                for s in sources
            ),
            f"-I PREROUTING 1 -j {CT_PREROUTING}",
            f"-I OUTPUT 1 -j {CT_OUTPUT}",
            "COMMIT",
        ]
    protocols = ("udp", "tcp")
    lines += [
        "*nat",
        f":{REDIRECT} - [0:0]",
        *(f"-A {REDIRECT} -p {p} -m {p} --dport {DNS_PORT} {owner} -j RETURN" for p in protocols),
        *(
            f"-A {REDIRECT}{d} -p {p} -m {p} --dport {DNS_PORT} "
            f"-j REDIRECT --to-ports {redirect.port}"
            for d in destinations
            for p in protocols
        ),
        f"-I OUTPUT 1 -j {REDIRECT}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def dry_run_text(redirect: DnsRedirect) -> str:
    """What C{install transparent-proxy --dry-run} prints: each family's input."""
    parts = []
    for family in redirect.families():
        tool = "iptables-restore" if family == 4 else "ip6tables-restore"
        parts.append(
            f"# {_label(family)}: {tool} --noflush input; {redirect.describe(family)}\n"
            f"# (the {CHAIN_PREFIX}* chains of an earlier install are removed first)\n"
            + restore_input(redirect, family)
        )
    return "".join(parts)


# -- reading iptables-save ---------------------------------------------------------------


@dataclass(frozen=True)
class _Saved:
    """One table of C{iptables-save}: its user chains and rules (chain, line)."""

    chains: list[str]
    rules: list[tuple[str, str]]


def _parse_save(text: str) -> dict[str, _Saved]:
    tables: dict[str, _Saved] = {}
    table: _Saved | None = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = tables.setdefault(line[1:], _Saved([], []))
        elif table is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            table.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            table.rules.append((line.split()[1], line))
    return tables


def _target(line: str) -> str | None:
    """The chain a saved rule jumps or goes to (C{-j X}, C{-g X}), if any."""
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    for flag, value in pairwise(words):
        if flag in ("-j", "--jump", "-g", "--goto"):
            return value
    return None


def _ours(chain: str | None) -> bool:
    return chain is not None and chain.startswith(CHAIN_PREFIX)


def installed_chains(save_text: str) -> dict[str, list[str]]:
    """Our chains in C{iptables-save} output, by table (tables without one left out)."""
    found = {
        name: [c for c in table.chains if _ours(c)]
        for name, table in _parse_save(save_text).items()
    }
    return {name: chains for name, chains in found.items() if chains}


def removal_input(save_text: str) -> str:
    """The C{iptables-restore --noflush} input removing every jump to one of our chains
    and the chains themselves; empty when C{iptables-save} shows none of them."""
    lines: list[str] = []
    for name, table in _parse_save(save_text).items():
        ours = [c for c in table.chains if _ours(c)]
        jumps = [
            "-D" + line[2:]
            for chain, line in table.rules
            if not _ours(chain) and _ours(_target(line))
        ]
        if not ours and not jumps:
            continue
        lines += [
            f"*{name}",
            *jumps,
            *(f"-F {chain}" for chain in ours),
            *(f"-X {chain}" for chain in ours),
            "COMMIT",
        ]
    return "\n".join(lines) + "\n" if lines else ""


def _describe_chains(chains: Mapping[str, Sequence[str]]) -> str:
    return "; ".join(f"{table} {', '.join(names)}" for table, names in chains.items())


# -- the edge: running iptables ----------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """How a command ended."""

    returncode: int
    stdout: str
    stderr: str


def _run(argv: Sequence[str], stdin: str | None) -> Completed:
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return Completed(127, "", str(e))
    return Completed(done.returncode, done.stdout, done.stderr)


Run = Callable[[Sequence[str], str | None], Completed]


@dataclass(frozen=True)
class Iptables:
    """One family's C{iptables-save} and C{iptables-restore}, whichever backend."""

    family: Family
    save: str
    restore: str
    run: Run = _run

    def _check(self, done: Completed, argv: Sequence[str]) -> Completed:
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            why = "; ".join(lines[-2:]) if lines else f"exit status {done.returncode}"
            raise TransparentProxyError(f"{' '.join(argv)}: {why}")
        return done

    def read(self) -> str:
        """The current rules, as C{iptables-save} prints them."""
        return self._check(self.run([self.save], None), [self.save]).stdout

    def apply(self, text: str) -> None:
        """Feed C{text} to C{iptables-restore --noflush} (one transaction per table)."""
        argv = [self.restore, "--wait", "--noflush"]
        self._check(self.run(argv, text), argv)

    def version(self) -> str:
        """C{iptables-restore v1.8.9 (nf_tables)}, or the binary's name."""
        done = self.run([self.restore, "--version"], None)
        line = done.stdout.strip().splitlines()[:1]
        return line[0] if done.returncode == 0 and line else os.path.basename(self.restore)


def find_iptables(
    family: Family,
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str, str], str | None] = lambda name, path: shutil.which(name, path=path),
) -> Iptables:
    """The system's C{iptables-restore} and C{iptables-save} for C{family}, or the
    backend that C{KUMAZONE_IPTABLES_BACKEND} (C{nft}, C{legacy}) names."""
    backend = environ.get(BACKEND_VARIABLE, "")
    if backend not in _BACKEND_SUFFIXES:
        raise TransparentProxyError(
            f"{BACKEND_VARIABLE}: {backend!r} is not one of nft, legacy (or empty)"
        )
    path = os.pathsep.join([*environ.get("PATH", "").split(os.pathsep), *_SBIN])
    base = ("iptables" if family == 4 else "ip6tables") + _BACKEND_SUFFIXES[backend]
    found = {}
    for verb in ("save", "restore"):
        name = f"{base}-{verb}"
        binary = which(name, path)
        if binary is None:
            raise TransparentProxyError(
                f"{name} is not installed (apt-get install iptables)"
                + ("" if family == 4 else "; --ip-family-mode ipv4 installs IPv4 rules only")
            )
        found[verb] = binary
    return Iptables(family, found["save"], found["restore"])


def require_root(euid: int, dry_run_works: bool = False) -> None:
    """Refuse to go on without root: iptables needs it to read and change the rules."""
    if euid != 0:
        hint = ", or see the rules without root with --dry-run" if dry_run_works else ""
        raise TransparentProxyError(
            f"reading and changing the host's iptables rules needs root (run it with sudo{hint})"
        )


Finder = Callable[[Family], Iptables]
Say = Callable[[str], None]


def _remove(iptables: Iptables) -> dict[str, list[str]]:
    """Remove our chains of one family; what was removed."""
    saved = iptables.read()
    text = removal_input(saved)
    if text:
        iptables.apply(text)
    return installed_chains(saved)


def install(redirect: DnsRedirect, find: Finder, say: Say) -> None:
    """Install the rules of every family of C{redirect}, replacing an earlier install's.

    When a family fails, the families already installed are removed again, so the host
    is left as it was (but for an earlier install, which is gone).
    """
    done: list[Iptables] = []
    for family in redirect.families():
        try:
            iptables = find(family)
            removed = _remove(iptables)
            if removed:
                say(f"{_label(family)}: removed an earlier install ({_describe_chains(removed)})")
            iptables.apply(restore_input(redirect, family))
        except TransparentProxyError as e:
            raise TransparentProxyError(_undo(done, str(e), family)) from None
        done.append(iptables)
        chains = installed_chains(restore_input(redirect, family))
        say(
            f"{_label(family)}: {redirect.describe(family)} "
            f"({iptables.version()}: {_describe_chains(chains)})"
        )
    if not redirect.ipv6:
        _remove_quietly(6, find, say)


def _undo(done: Sequence[Iptables], why: str, family: Family) -> str:
    """Remove the families already installed; the error, saying so."""
    for iptables in done:
        label = _label(iptables.family)
        try:
            _remove(iptables)
        except TransparentProxyError as e:
            why += f"; removing the {label} rules again failed too: {e}"
        else:
            why += f"; the {label} rules were removed again"
    if family == 6:
        why += "; on a host without IPv6 use --ip-family-mode ipv4"
    return why


def _remove_quietly(family: Family, find: Finder, say: Say) -> None:
    """Remove an earlier dualstack install's IPv6 rules, if this host has any."""
    try:
        removed = _remove(find(family))
    except TransparentProxyError:
        return
    if removed:
        say(f"{_label(family)}: removed an earlier install ({_describe_chains(removed)})")


def uninstall(find: Finder, say: Say, dry_run: bool = False) -> None:
    """Remove our chains and the jumps to them, both families; say what was removed.

    Nothing installed is fine (uninstall twice).  IPv6 that cannot be read (no
    ip6tables, no IPv6 in the kernel) holds none of our rules, so it is skipped.
    """
    for family in (4, 6):
        label = _label(family)
        try:
            iptables = find(family)
            saved = iptables.read()
        except TransparentProxyError as e:
            if family == 4:
                raise
            say(f"{label}: skipped, its rules cannot be read ({e})")
            continue
        text = removal_input(saved)
        chains = installed_chains(saved)
        if not text:
            say(f"{label}: nothing to remove (no {CHAIN_PREFIX}* chain)")
        elif dry_run:
            tool = os.path.basename(iptables.restore)
            say(f"# {label}: {tool} --noflush input\n{text.rstrip()}")
        else:
            iptables.apply(text)
            say(f"{label}: removed {_describe_chains(chains)}")
