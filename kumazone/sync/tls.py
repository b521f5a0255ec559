"""TLS for zone and dataplane sync: pyOpenSSL through twisted.internet.ssl, names
checked by service-identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

from kumazone.sync.certs import parse_dataplane_uri

__all__ = [
    "TLSFiles",
    "certificate_names",
    "client_options",
    "dataplane_identity",
    "server_options",
]


class TLSFiles:
    """A certificate, its key and the CA, read from PEM files."""

    def __init__(self, cert: str, key: str, ca: str) -> None:
        try:
            pem = Path(cert).read_bytes() + b"\n" + Path(key).read_bytes()
            self.private = ssl.PrivateCertificate.loadPEM(pem)
            self.ca = ssl.Certificate.loadPEM(Path(ca).read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read TLS files: {e}") from None
        except Exception as e:
            raise ValueError(f"TLS files do not load ({cert}, {key}, {ca}): {e}") from None


def server_options(files: TLSFiles) -> Any:
    """The server's side (the global, a zone's dataplane port): present our
    certificate, require one signed by the CA."""
    return files.private.options(files.ca)


def client_options(files: TLSFiles, hostname: str) -> Any:
    """A zone's side: check the global against the CA and C{hostname}, present ours."""
    return ssl.optionsForClientTLS(hostname, trustRoot=files.ca, clientCertificate=files.private)


def certificate_names(peer: Any) -> set[str]:
    """The names a peer certificate (pyOpenSSL X509) carries: CN and DNS SANs."""
    certificate = peer.to_cryptography()
    names = {
        str(attribute.value)
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    }
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return names
    names |= set(san.value.get_values_for_type(x509.DNSName))
    return names


def dataplane_identity(peer: Any) -> tuple[str, str] | None:
    """The (mesh, name) a peer certificate (pyOpenSSL X509) names by its URI SAN
    C{spiffe://MESH/NAME}; None if it names no dataplane, or more than one."""
    certificate = peer.to_cryptography()
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    found = {
        parse_dataplane_uri(str(uri))
        for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier)
    }
    found.discard(None)
    if len(found) != 1:
        return None
    return found.pop()
