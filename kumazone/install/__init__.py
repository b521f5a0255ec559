"""What C{kumazone install} and C{kumazone uninstall} print. Pure: text in, text out."""

from kumazone.install.cluster_dns import (
    FLAVORS,
    ControlPlaneAddress,
    InstallError,
    coredns_install,
    coredns_uninstall,
    dnsmasq_dropin,
    forwarded_zones,
    kube_dns_install,
    kube_dns_uninstall,
    parse_cp_address,
    reverse_zones,
    server_blocks,
    unbound_dropin,
)

__all__ = [
    "FLAVORS",
    "ControlPlaneAddress",
    "InstallError",
    "coredns_install",
    "coredns_uninstall",
    "dnsmasq_dropin",
    "forwarded_zones",
    "kube_dns_install",
    "kube_dns_uninstall",
    "parse_cp_address",
    "reverse_zones",
    "server_blocks",
    "unbound_dropin",
]
