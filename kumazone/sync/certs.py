"""C{kumazone certs}: a CA, the global's server certificate, a certificate per zone
and per dataplane.

A zone's certificate names the zone (CN and DNS SAN) and the hosts dataplanes
reach it by (C{--zone-host}); it serves as the zone's client certificate towards
the global and as its server certificate towards dataplanes.  A dataplane's
certificate (C{--dataplane MESH/NAME}) names it only by a URI SAN
C{spiffe://MESH/NAME} (CN C{MESH/NAME}, no DNS SAN): a name with a C{/} is no
zone name and no host, so it can pass neither as a zone nor as the global.

Run again with the same C{--out} it reuses the CA and what exists, and adds what
is missing.  Keys are written with mode 0600.  No Twisted here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kumazone.core.names import ZONE_NAME
from kumazone.core.resources import MAX_NAME_LENGTH, ResourceError, check_mesh_name

__all__ = [
    "LEAF_KEY_USAGE",
    "CertError",
    "dataplane_identity_problem",
    "dataplane_stem",
    "dataplane_uri",
    "make_certs",
    "parse_dataplane",
    "parse_dataplane_uri",
]

#: Zone names whose files would overwrite the CA's or the global's.
RESERVED = ("ca", "global")
_VALIDITY = datetime.timedelta(days=3650)
#: What a leaf's EC key may do: sign (TLS 1.3) and agree keys, nothing else.
LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_VALIDITY = datetime.timedelta(days=825)
#: A leaf that expires sooner than this is issued again when certs runs.
RENEW_BEFORE = datetime.timedelta(days=30)
_Key = ec.EllipticCurvePrivateKey
#: The longest file name most file systems take.
_MAX_FILE_NAME = 255
#: The scheme of a dataplane's URI SAN: C{spiffe://MESH/NAME}.
SPIFFE = "spiffe://"
#: A dataplane's name: the rule of resource names (L{kumazone.core.resources}; a
#: test holds the two together), at most L{MAX_NAME_LENGTH}.
_DATAPLANE_NAME = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?\Z")


class CertError(Exception):
    """Certificates cannot be made as asked."""


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    if temporary.exists():
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def _write_public(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _key_pem(key: _Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class _Leaf(NamedTuple):
    """A certificate to have in the directory: its files' stem and what it names."""

    stem: str
    common_name: str
    #: DNS names and IP addresses (SANs).
    hosts: tuple[str, ...]
    usages: tuple[x509.ObjectIdentifier, ...]
    #: URI SANs (a dataplane's identity).
    uris: tuple[str, ...] = ()

    def names(self) -> list[x509.GeneralName]:
        """The subject alternative names."""
        return [*_names(self.hosts), *(x509.UniformResourceIdentifier(u) for u in self.uris)]

    def described(self) -> str:
        """What it is for, as the command's lines say it."""
        return ", ".join([*self.hosts, *self.uris])


# -- dataplane identities ---------------------------------------------------------


def dataplane_identity_problem(mesh: str, name: str) -> str | None:
    """Why C{mesh}/C{name} cannot name a dataplane, or None.

    The mesh follows the rule of mesh names in resources; the name, that of
    resource names (a Dataplane's), at most L{MAX_NAME_LENGTH}: neither holds a C{/}.
    """
    try:
        check_mesh_name(mesh)
    except ResourceError as e:
        return str(e)
    if not name:
        return "name: must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"name: must be at most {MAX_NAME_LENGTH} characters, is {len(name)}"
    if not _DATAPLANE_NAME.match(name):
        return (
            f"name: {name[:80]!r} is not a valid name: letters, digits, '.', '-' and '_', "
            "starting and ending with a letter or digit"
        )
    return None


def parse_dataplane(value: str) -> tuple[str, str]:
    """C{MESH/NAME} as (mesh, name); L{CertError} naming what is wrong."""
    mesh, slash, name = value.partition("/")
    if not slash:
        raise CertError(f"--dataplane: {value[:80]!r} is not MESH/NAME")
    problem = dataplane_identity_problem(mesh, name)
    if problem is not None:
        raise CertError(f"--dataplane: {value[:80]!r}: {problem}")
    return mesh, name


def dataplane_uri(mesh: str, name: str) -> str:
    """The URI SAN naming dataplane C{name} of C{mesh}."""
    return f"{SPIFFE}{mesh}/{name}"


def parse_dataplane_uri(uri: str) -> tuple[str, str] | None:
    """(mesh, name) of a dataplane's URI SAN C{spiffe://MESH/NAME}, or None if it is not one."""
    if not uri.startswith(SPIFFE):
        return None
    mesh, slash, name = uri[len(SPIFFE) :].partition("/")
    if not slash or dataplane_identity_problem(mesh, name) is not None:
        return None
    return mesh, name


def dataplane_stem(mesh: str, name: str) -> str:
    """The files' stem of a dataplane's certificate: C{dp-MESH-NAME}."""
    return f"dp-{mesh}-{name}"


def _uris(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _issue(
    ca_cert: x509.Certificate,
    ca_key: _Key,
    leaf: _Leaf,
    now: datetime.datetime,
) -> tuple[x509.Certificate, _Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = leaf.common_name
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(leaf.names()), critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(leaf.usages)), critical=False)
        .add_extension(
            LEAF_KEY_USAGE,
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


def _load_or_make_ca(out: Path, now: datetime.datetime) -> tuple[x509.Certificate, _Key, bool]:
    """The CA in C{out}, made there if missing; and whether it was made."""
    cert_path, key_path = out / "ca.pem", out / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        certificate, key = _load_ca(cert_path, key_path)
        return certificate, key, False
    if cert_path.exists() or key_path.exists():
        raise CertError(f"{out} has only one of ca.pem and ca-key.pem; remove it or add the other")
    certificate, key = _make_ca(now)
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key, True


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, _Key]:
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as e:
        raise CertError(f"{cert_path} or {key_path} cannot be read: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path} is not an EC key made by kumazone certs")
    return certificate, key


def _make_ca(now: datetime.datetime) -> tuple[x509.Certificate, _Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kumazone CA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _covers(certificate: x509.Certificate, leaf: _Leaf) -> bool:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(leaf.names()) <= set(san)


def _serves(certificate: x509.Certificate, leaf: _Leaf) -> bool:
    """Whether the certificate may be used for everything C{leaf} is for."""
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return set(leaf.usages) <= set(usage)


_PURPOSES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serving",
    ExtendedKeyUsageOID.CLIENT_AUTH: "client use",
}


def _leaf_problem(
    cert_path: Path,
    key_path: Path,
    leaf: _Leaf,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
) -> str | None:
    """Why the leaf in C{cert_path} cannot be reused (None: it can), or "missing"."""
    if not cert_path.exists() or not key_path.exists():
        return "missing"
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError:
        return "it cannot be read"
    if not _covers(certificate, leaf):
        return f"it does not name {leaf.described()}"
    if not _serves(certificate, leaf):
        wanted = " and ".join(_PURPOSES.get(u, u.dotted_string) for u in leaf.usages)
        return f"it is not for {wanted}"
    try:
        certificate.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return f"it was not issued by {ca_cert.subject.rfc4514_string()} of this directory"
    if certificate.not_valid_after_utc <= now + RENEW_BEFORE:
        return f"it expires {certificate.not_valid_after_utc:%Y-%m-%d}"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        return f"{key_path.name} is not its key"
    return None


def _check_owner(cert_path: Path, leaf: _Leaf) -> None:
    """A dataplane's files hold no other dataplane's certificate (C{dp-a-b-c.pem} is
    both C{a-b/c}'s and C{a/b-c}'s): never overwrite another's."""
    if not leaf.uris or not cert_path.exists():
        return
    try:
        held = _uris(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    except ValueError:
        return  # unreadable: issued again
    if held and set(held) != set(leaf.uris):
        raise CertError(
            f"{cert_path} is the certificate of {', '.join(held)}, not of "
            f"{', '.join(leaf.uris)}: move it away, or issue this one in another --out"
        )


def _check_zone(zone: str) -> None:
    if zone in RESERVED:
        raise CertError(f"--zone: {zone!r} is the name of the {zone} files; pick another")
    if not ZONE_NAME.match(zone):
        raise CertError(
            f"--zone: {zone!r} is not a valid zone name (lower-case letters, digits, '-')"
        )


#: One label of a host name in a certificate: letters, digits and '-'.
_LABEL = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def _check_host(host: str, flag: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise CertError(f"{flag}: {host[:80]!r} is neither an IP address nor a DNS name")


def _global_hosts(out: Path, global_hosts: Sequence[str]) -> set[str]:
    """The hosts the global goes by: those asked now and those its certificate names."""
    hosts = {h.lower() for h in global_hosts}
    path = out / "global.pem"
    if path.exists():
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except (ValueError, x509.ExtensionNotFound):
            return hosts
        hosts |= {str(n).lower() for n in san.value.get_values_for_type(x509.DNSName)}
        hosts |= {str(a) for a in san.value.get_values_for_type(x509.IPAddress)}
    return hosts


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _wanted(
    out: Path,
    global_hosts: Sequence[str],
    zones: Sequence[str],
    zone_hosts: Sequence[str],
    dataplanes: Sequence[str],
) -> list[_Leaf]:
    """Every leaf asked for, checked; L{CertError} before anything is made."""
    for zone in zones:
        _check_zone(zone)
    for host in zone_hosts:
        _check_host(host, "--zone-host")
        if ZONE_NAME.match(host) and set(zones) != {host}:
            # The global takes a zone certificate's DNS names as zone names.
            raise CertError(
                f"--zone-host: {host!r} has the shape of a zone name: a zone certificate "
                "naming it could pass as that zone; give an IP address or a dotted name"
            )
    if zone_hosts and not zones:
        raise CertError("--zone-host: names hosts of the zones given with --zone; give one")
    if zone_hosts:
        # A zone certificate serves dataplanes; naming a host of the global, it
        # could pass as the global to the other zones.
        shared = {_canonical(h) for h in zone_hosts} & {
            _canonical(h) for h in _global_hosts(out, global_hosts)
        }
        if shared:
            raise CertError(
                f"--zone-host: {', '.join(sorted(shared))} is a host of the global; a zone "
                "certificate naming it could pass as the global: give the zone its own"
            )
    identities = [parse_dataplane(value) for value in dataplanes]
    wanted: list[_Leaf] = []
    if global_hosts:
        wanted.append(
            _Leaf(
                "global", global_hosts[0], tuple(global_hosts), (ExtendedKeyUsageOID.SERVER_AUTH,)
            )
        )
    hosts = tuple(dict.fromkeys(zone_hosts))
    for zone in dict.fromkeys(zones):
        usages = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
        wanted.append(_Leaf(zone, zone, (zone, *(h for h in hosts if h != zone)), usages))
    stems: dict[str, tuple[str, str]] = {}
    for mesh, name in dict.fromkeys(identities):
        stem = dataplane_stem(mesh, name)
        other = stems.setdefault(stem, (mesh, name))
        if other != (mesh, name):
            raise CertError(
                f"--dataplane: {other[0]}/{other[1]} and {mesh}/{name} would both be "
                f"{stem}.pem; issue one of them in another --out"
            )
        if len(f"{stem}-key.pem.tmp".encode()) > _MAX_FILE_NAME:  # written, then renamed
            raise CertError(
                f"--dataplane: {mesh}/{name[:40]}...: its files ({stem[:40]}...-key.pem) "
                f"would have names longer than {_MAX_FILE_NAME} octets; pick a shorter name"
            )
        wanted.append(
            _Leaf(
                stem,
                # X.509 bounds a CN to 64 characters; the identity is the URI, and
                # a CN cut there still has the '/' (a mesh is at most 63).
                f"{mesh}/{name}"[:64],
                (),
                (ExtendedKeyUsageOID.CLIENT_AUTH,),
                (dataplane_uri(mesh, name),),
            )
        )
    return wanted


def make_certs(
    out: Path,
    global_hosts: Sequence[str],
    zones: Sequence[str],
    now: datetime.datetime | None = None,
    *,
    zone_hosts: Sequence[str] = (),
    dataplanes: Sequence[str] = (),
) -> list[str]:
    """Make (or complete) the certificate set in C{out}; returns what was done.

    @param zone_hosts: hosts (DNS names or IP addresses) put in every zone's
        certificate, so that dataplanes can check the zone by them.
    @param dataplanes: C{MESH/NAME} of each dataplane to make a certificate for.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    wanted = _wanted(out, global_hosts, zones, zone_hosts, dataplanes)
    for leaf in wanted:
        _check_owner(out / f"{leaf.stem}.pem", leaf)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, made = _load_or_make_ca(out, now)
    done = [f"{'made' if made else 'reused'} {out / 'ca.pem'}"]
    for leaf in wanted:
        cert_path, key_path = out / f"{leaf.stem}.pem", out / f"{leaf.stem}-key.pem"
        problem = _leaf_problem(cert_path, key_path, leaf, ca_cert, now)
        if problem is None:
            done.append(f"reused {cert_path}")
            continue
        certificate, key = _issue(ca_cert, ca_key, leaf, now)
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        why = "" if problem == "missing" else f" ({problem})"
        done.append(f"made {cert_path} for {leaf.described()}{why}")
    return done
