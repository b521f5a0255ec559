"""C{kumazone certs}: a CA, the global's server certificate, a client certificate per zone.

Run again with the same C{--out} it reuses the CA and what exists, and adds what
is missing.  Keys are written with mode 0600.  No Twisted here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kumazone.core.names import ZONE_NAME

__all__ = ["CertError", "make_certs"]

#: Zone names whose files would overwrite the CA's or the global's.
RESERVED = ("ca", "global")
_VALIDITY = datetime.timedelta(days=3650)
_LEAF_VALIDITY = datetime.timedelta(days=825)
#: A leaf that expires sooner than this is issued again when certs runs.
RENEW_BEFORE = datetime.timedelta(days=30)
_Key = ec.EllipticCurvePrivateKey


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


def _issue(
    ca_cert: x509.Certificate,
    ca_key: _Key,
    common_name: str,
    hosts: Sequence[str],
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
) -> tuple[x509.Certificate, _Key]:
    key = ec.generate_private_key(ec.SECP256R1())
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
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
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


def _covers(certificate: x509.Certificate, hosts: Sequence[str]) -> bool:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(_names(hosts)) <= set(san)


def _leaf_problem(
    cert_path: Path,
    key_path: Path,
    hosts: Sequence[str],
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
    if not _covers(certificate, hosts):
        return f"it does not name {', '.join(hosts)}"
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


def _check_zone(zone: str) -> None:
    if zone in RESERVED:
        raise CertError(f"--zone: {zone!r} is the name of the {zone} files; pick another")
    if not ZONE_NAME.match(zone):
        raise CertError(
            f"--zone: {zone!r} is not a valid zone name (lower-case letters, digits, '-')"
        )


def make_certs(
    out: Path,
    global_hosts: Sequence[str],
    zones: Sequence[str],
    now: datetime.datetime | None = None,
) -> list[str]:
    """Make (or complete) the certificate set in C{out}; returns what was done."""
    now = now or datetime.datetime.now(datetime.UTC)
    for zone in zones:
        _check_zone(zone)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, made = _load_or_make_ca(out, now)
    done = [f"{'made' if made else 'reused'} {out / 'ca.pem'}"]
    wanted: list[tuple[str, str, Sequence[str], x509.ObjectIdentifier]] = []
    if global_hosts:
        wanted.append(("global", global_hosts[0], global_hosts, ExtendedKeyUsageOID.SERVER_AUTH))
    for zone in zones:
        wanted.append((zone, zone, [zone], ExtendedKeyUsageOID.CLIENT_AUTH))
    for stem, common_name, hosts, usage in wanted:
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}-key.pem"
        problem = _leaf_problem(cert_path, key_path, hosts, ca_cert, now)
        if problem is None:
            done.append(f"reused {cert_path}")
            continue
        certificate, key = _issue(ca_cert, ca_key, common_name, hosts, usage, now)
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        why = "" if problem == "missing" else f" ({problem})"
        done.append(f"made {cert_path} for {', '.join(hosts)}{why}")
    return done
