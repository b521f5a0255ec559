"""The C{kumazone} command (also C{python -m kumazone}).

kumazone run [twistd plugin options]   run a control plane in the foreground
kumazone check PATH...                 validate resource files or directories
kumazone certs --out DIR ...           make a CA and certificates for zone and dataplane sync
kumazone install dns --flavor F ...    print cluster or host DNS config for the domain
kumazone uninstall dns --flavor F ...  print it again without what install added
kumazone install transparent-proxy ... redirect the host's DNS to its dataplane (iptables)
kumazone uninstall transparent-proxy   remove exactly those rules
kumazone status --api URL [--vips]     a control plane's zones, sync state and VIPs
kumazone version
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kumazone import __version__
from kumazone.core.resources import Resource, ResourceError, parse_documents
from kumazone.resource_dir import RESOURCE_SUFFIXES

if TYPE_CHECKING:
    from kumazone.core.config import DnsServerConfig

__all__ = ["main"]


def _files(paths: Sequence[str]) -> list[str]:
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for directory, subdirectories, names in os.walk(path):
                subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
                found += [
                    os.path.join(directory, n)
                    for n in sorted(names)
                    if n.endswith(RESOURCE_SUFFIXES) and not n.startswith(".")
                ]
        else:
            found.append(path)
    return found


def check(paths: Sequence[str]) -> int:
    """Print every resource error in C{paths}; 0 if there is none."""
    errors = 0
    resources = 0
    for path in _files(paths):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"{path}: cannot be read: {e}", file=sys.stderr)
            errors += 1
            continue
        for index, result in enumerate(parse_documents(text, json_only=path.endswith(".json"))):
            if isinstance(result, ResourceError):
                print(f"{path}: document {index + 1}: {result}", file=sys.stderr)
                errors += 1
            elif isinstance(result, Resource):
                resources += 1
    print(f"{resources} valid resource(s), {errors} error(s)")
    return 1 if errors else 0


def _dns_config(path: str | None) -> DnsServerConfig:
    """The dnsServer config, as C{run} reads it: C{--config}, then the environment."""
    from kumazone.core.config import ConfigError, load_config
    from kumazone.install.cluster_dns import InstallError

    text = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InstallError(f"--config: {path!r} cannot be read ({e})") from None
    try:
        return load_config(text, os.environ, source_name=path or "")
    except ConfigError as e:
        raise InstallError(str(e)) from None


def install_dns(args: argparse.Namespace, install: bool) -> int:
    """Print what C{install dns} / C{uninstall dns} give for C{args.flavor}."""
    from kumazone.install import cluster_dns
    from kumazone.install.kubectl import read_configmap

    flavor = args.flavor
    try:
        config = _dns_config(args.config)
        if flavor in ("dnsmasq", "unbound") and not install:
            return _remove_dropin(flavor, args.file)
        if flavor in cluster_dns.CONFIGMAP_NAMES:
            text, source = read_configmap(cluster_dns.CONFIGMAP_NAMES[flavor], args.source)
        if install:
            address = cluster_dns.parse_cp_address(args.cp_address, config.port)
            if flavor == "coredns":
                output = cluster_dns.coredns_install(text, config, address, source)
            elif flavor == "kube-dns":
                output = cluster_dns.kube_dns_install(text, config, address, source)
            elif flavor == "dnsmasq":
                output = cluster_dns.dnsmasq_dropin(config, address)
            else:
                output = cluster_dns.unbound_dropin(config, address)
        elif flavor == "coredns":
            output = cluster_dns.coredns_uninstall(text, source)
        else:
            output = cluster_dns.kube_dns_uninstall(text, config, source)
    except cluster_dns.InstallError as e:
        print(f"kumazone: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(output)
    return 0


def _remove_dropin(flavor: str, path: str | None) -> int:
    """Delete the drop-in file that C{install dns --flavor flavor} printed."""
    from kumazone.install.cluster_dns import InstallError, is_dropin

    if path is None:
        raise InstallError(f"uninstall dns --flavor {flavor} needs --file: the drop-in to remove")
    try:
        with open(path, encoding="utf-8") as f:
            ours = is_dropin(f.read(), flavor)
        if not ours:
            raise InstallError(
                f"--file: {path!r} was not written by kumazone install dns --flavor {flavor}"
            )
        os.unlink(path)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InstallError(f"--file: {path!r} cannot be removed ({reason})") from None
    print(f"removed {path}: restart or reload {flavor} to stop forwarding")
    return 0


def transparent_proxy(args: argparse.Namespace, install: bool) -> int:
    """C{install transparent-proxy} / C{uninstall transparent-proxy}."""
    from kumazone.dataplane import tproxy

    try:
        if install:
            redirect = tproxy.dns_redirect(
                args.kuma_dp_user,
                redirect_all=args.redirect_all_dns_traffic,
                port=args.redirect_dns_port,
                ip_family_mode=args.ip_family_mode,
                conntrack_zone_split=not args.skip_dns_conntrack_zone_split,
                resolv_conf=args.resolv_conf,
            )
            if args.dry_run:
                sys.stdout.write(tproxy.dry_run_text(redirect))
                return 0
            tproxy.require_root(os.geteuid(), dry_run_works=True)
            tproxy.install(redirect, tproxy.find_iptables, print)
        else:
            tproxy.require_root(os.geteuid())
            tproxy.uninstall(tproxy.find_iptables, print, dry_run=args.dry_run)
    except tproxy.TransparentProxyError as e:
        print(f"kumazone: {e}", file=sys.stderr)
        return 1
    return 0


def _add_transparent_proxy_parser(targets: Any, verb: str) -> None:
    """The C{install transparent-proxy} or C{uninstall transparent-proxy} subcommand."""
    from kumazone.dataplane.tproxy import CHAIN_PREFIX, DEFAULT_REDIRECT_PORT, IP_FAMILY_MODES

    if verb == "uninstall":
        parser = targets.add_parser(
            "transparent-proxy",
            help="remove the rules install transparent-proxy added",
            description=f"Remove the {CHAIN_PREFIX}* chains and the jumps to them from the "
            "IPv4 and IPv6 rules, and nothing else. Nothing installed is fine.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="print the iptables-restore input only"
        )
        return
    parser = targets.add_parser(
        "transparent-proxy",
        help="redirect this host's DNS to its dataplane with iptables",
        description="Install Kuma's DNS rules with iptables-restore and ip6tables-restore "
        "(whichever backend they are; KUMAZONE_IPTABLES_BACKEND=nft or legacy picks one): "
        "UDP and TCP port 53 from every user but the dataplane's go to the dataplane's "
        "port, the dataplane's own queries go out, and conntrack zones keep the two legs "
        "apart. TCP is redirected too, unlike Kuma: the dataplane serves TCP, and a client "
        "retrying a truncated answer over TCP must reach the same resolver, which knows "
        "the mesh names. The rules live in chains named "
        f"{CHAIN_PREFIX}*; installing again replaces them.",
    )
    parser.add_argument(
        "--kuma-dp-user",
        required=True,
        metavar="USER",
        help="the user (or UID) the dataplane runs as: its DNS is not redirected",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--redirect-dns",
        action="store_true",
        help="redirect port 53 to the nameservers of --resolv-conf only",
    )
    mode.add_argument(
        "--redirect-all-dns-traffic",
        action="store_true",
        help="redirect port 53 to any address",
    )
    parser.add_argument(
        "--redirect-dns-port",
        type=int,
        default=DEFAULT_REDIRECT_PORT,
        metavar="PORT",
        help=f"the dataplane's DNS port (default {DEFAULT_REDIRECT_PORT})",
    )
    parser.add_argument(
        "--ip-family-mode",
        choices=IP_FAMILY_MODES,
        default="dualstack",
        help="dualstack: IPv4 and IPv6 rules (default); ipv4: IPv4 rules only",
    )
    parser.add_argument(
        "--skip-dns-conntrack-zone-split",
        action="store_true",
        help="no conntrack zones (raw table rules)",
    )
    parser.add_argument(
        "--resolv-conf",
        default="/etc/resolv.conf",
        metavar="FILE",
        help="with --redirect-dns: where the nameservers are (default /etc/resolv.conf)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the iptables-restore input of each family and change nothing",
    )


def _add_dns_parsers(commands: Any) -> None:
    """The C{install} and C{uninstall} subcommands: C{dns}, C{transparent-proxy}."""
    from kumazone.install.cluster_dns import FLAVORS

    for verb, what in (("install", "print"), ("uninstall", "undo")):
        parser = commands.add_parser(
            verb, help=f"{what} DNS configuration for the domain, or the transparent proxy"
        )
        targets = parser.add_subparsers(dest="target", required=True)
        dns = targets.add_parser(
            "dns",
            help="cluster DNS (coredns, kube-dns) or a host forwarder (dnsmasq, unbound)",
            description="Send the domain and the VIP reverse zones to the control plane: "
            + (
                "prints the patched ConfigMap (for kubectl apply -f -) or a drop-in file."
                if verb == "install"
                else "prints the ConfigMap without what install added, or removes a drop-in."
            ),
        )
        dns.add_argument("--flavor", required=True, choices=FLAVORS)
        if verb == "install":
            dns.add_argument(
                "--cp-address",
                required=True,
                metavar="HOST[:PORT]",
                help="the control plane's DNS address (port: dnsServer.port, 5653)",
            )
        else:
            dns.add_argument("--file", help="dnsmasq, unbound: the drop-in file to remove")
        dns.add_argument(
            "--from",
            dest="source",
            metavar="FILE",
            help="coredns, kube-dns: the current ConfigMap "
            "(default: kubectl -n kube-system get configmap ... -o yaml)",
        )
        dns.add_argument("--config", metavar="FILE", help="YAML file with Kuma's dnsServer keys")
        _add_transparent_proxy_parser(targets, verb)


def status(args: argparse.Namespace) -> int:
    """Print what the API at C{args.api} says (the status page, as text)."""
    import time

    from kumazone.web.status_cli import StatusError, read_status, render_status, render_vips

    try:
        document = read_status(args.api, vips=args.vips, service=args.service, mesh=args.mesh)
    except StatusError as e:
        print(f"kumazone status: {e}", file=sys.stderr)
        return 1
    lines = render_status(document, time.time())
    if args.vips:
        lines += ["", *render_vips(document["vips"])]
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["run"]:
        # Everything after "run" belongs to the plugin, flags included.
        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or "twistd"
        os.execv(twistd, [twistd, "-n", "--pidfile=", "kumazone", *arguments[1:]])
    parser = argparse.ArgumentParser(prog="kumazone", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a control plane (twistd -n kumazone ...)")
    run.add_argument("options", nargs=argparse.REMAINDER, help="kumazone plugin options")
    checker = commands.add_parser("check", help="validate resource files or directories")
    checker.add_argument("paths", nargs="+")
    certs = commands.add_parser(
        "certs", help="make a CA and certificates for zone and dataplane sync"
    )
    certs.add_argument("--out", required=True, help="directory for the PEM files")
    certs.add_argument(
        "--global-host",
        action="append",
        default=[],
        help="a name or IP the global is reached by (repeatable)",
    )
    certs.add_argument(
        "--zone",
        action="append",
        default=[],
        help="a zone to make a certificate for (repeatable)",
    )
    certs.add_argument(
        "--zone-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a name or IP the zones are reached by, put in every --zone certificate "
        "so that dataplanes can check the zone (repeatable)",
    )
    certs.add_argument(
        "--dataplane",
        action="append",
        default=[],
        metavar="MESH/NAME",
        help="a dataplane to make a client certificate for: DIR/dp-MESH-NAME.pem (repeatable)",
    )
    _add_dns_parsers(commands)
    status_parser = commands.add_parser(
        "status", help="a control plane's zones, sync state and VIPs (its status page, as text)"
    )
    status_parser.add_argument(
        "--api",
        default="http://127.0.0.1:5681",
        metavar="URL",
        help="the control plane's API (default http://127.0.0.1:5681)",
    )
    status_parser.add_argument("--vips", action="store_true", help="print the VIP table too")
    status_parser.add_argument(
        "--service", metavar="TEXT", help="with --vips: services whose name has TEXT, or a VIP"
    )
    status_parser.add_argument("--mesh", help="with --vips: the services of one mesh")
    commands.add_parser("version", help="print the version")
    args = parser.parse_args(arguments)
    if args.command == "version":
        print(f"kumazone {__version__}")
        return 0
    if args.command == "check":
        return check(args.paths)
    if args.command == "certs":
        from kumazone.sync.certs import CertError, make_certs

        try:
            done = make_certs(
                Path(args.out),
                args.global_host,
                args.zone,
                zone_hosts=args.zone_host,
                dataplanes=args.dataplane,
            )
            for line in done:
                print(line)
        except (CertError, OSError) as e:
            print(f"kumazone certs: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command in ("install", "uninstall") and args.target == "transparent-proxy":
        return transparent_proxy(args, install=args.command == "install")
    if args.command in ("install", "uninstall"):
        return install_dns(args, install=args.command == "install")
    if args.command == "status":
        return status(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
