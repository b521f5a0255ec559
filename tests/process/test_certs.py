"""Tests for L{kumazone.sync.certs} and the C{kumazone certs} command."""

from __future__ import annotations

import ipaddress
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kumazone.sync.certs import CertError, make_certs
from tests.builders import dataplane

HOSTS = ["global.example", "localhost", "192.0.2.1", "2001:db8::1"]
ZONES = ["zone-1", "zone-2"]
REPO = Path(__file__).resolve().parents[2]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def san(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def common_names(certificate: x509.Certificate) -> list[str]:
    return [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def usages(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    make_certs(directory, HOSTS, ZONES)
    return directory


def test_makes_every_file(out: Path) -> None:
    expected = {"ca.pem", "ca-key.pem", "global.pem", "global-key.pem"}
    expected |= {f"{z}.pem" for z in ZONES} | {f"{z}-key.pem" for z in ZONES}
    assert {p.name for p in out.iterdir()} == expected


def test_keys_are_mode_0600(out: Path) -> None:
    for key in out.glob("*-key.pem"):
        assert mode(key) == 0o600, key
    for certificate in ["ca.pem", "global.pem", *(f"{z}.pem" for z in ZONES)]:
        assert mode(out / certificate) & 0o002 == 0, certificate  # never world-writable


def test_keys_match_their_certificates(out: Path) -> None:
    for stem in ["ca", "global", *ZONES]:
        key = serialization.load_pem_private_key((out / f"{stem}-key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key() == load(out / f"{stem}.pem").public_key()


def test_certificates_verify_against_the_ca(out: Path) -> None:
    ca = load(out / "ca.pem")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for stem in ["global", *ZONES]:
        certificate = load(out / f"{stem}.pem")
        certificate.verify_directly_issued_by(ca)
        assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_certificates_do_not_verify_against_another_ca(out: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_certs(other, HOSTS, ZONES)
    with pytest.raises(InvalidSignature):
        load(out / "zone-1.pem").verify_directly_issued_by(load(other / "ca.pem"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_verifies_the_chain_for_each_purpose(out: Path) -> None:
    checks = [("global.pem", "sslserver"), *((f"{z}.pem", "sslclient") for z in ZONES)]
    for name, purpose in checks:
        result = subprocess.run(
            [
                "openssl",
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                str(out / "ca.pem"),
                str(out / name),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{out / name}: OK" in result.stdout


def test_the_global_certificate_names_every_global_host(out: Path) -> None:
    certificate = load(out / "global.pem")
    names = san(certificate)
    assert names.get_values_for_type(x509.DNSName) == ["global.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.1"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    assert usages(certificate) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_zone_certificates_name_their_zone(out: Path) -> None:
    for zone in ZONES:
        certificate = load(out / f"{zone}.pem")
        assert common_names(certificate) == [zone]
        assert san(certificate).get_values_for_type(x509.DNSName) == [zone]
        assert san(certificate).get_values_for_type(x509.IPAddress) == []
        # A client of the global, and the server of the zone's dataplanes.
        assert usages(certificate) == [
            ExtendedKeyUsageOID.CLIENT_AUTH,
            ExtendedKeyUsageOID.SERVER_AUTH,
        ]


def test_a_second_run_reuses_the_ca_and_adds_a_zone(out: Path) -> None:
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    done = make_certs(out, HOSTS, [*ZONES, "zone-3"])
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before) | {"zone-3.pem", "zone-3-key.pem"}
    for name, data in before.items():
        assert after[name] == data, name  # CA, global and old zones untouched
    load(out / "zone-3.pem").verify_directly_issued_by(load(out / "ca.pem"))
    assert mode(out / "zone-3-key.pem") == 0o600
    assert done[0] == f"reused {out / 'ca.pem'}"
    assert f"made {out / 'zone-3.pem'} for zone-3" in done
    assert f"reused {out / 'zone-1.pem'}" in done
    assert not list(out.glob("*.tmp"))


def test_a_second_run_with_a_new_global_host_remakes_the_global_certificate(out: Path) -> None:
    ca = (out / "ca.pem").read_bytes()
    zone = (out / "zone-1.pem").read_bytes()
    make_certs(out, [*HOSTS, "10.0.0.9"], ZONES)
    assert (out / "ca.pem").read_bytes() == ca
    assert (out / "zone-1.pem").read_bytes() == zone
    names = san(load(out / "global.pem")).get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.0.0.9") in names
    load(out / "global.pem").verify_directly_issued_by(load(out / "ca.pem"))


def test_only_zones_without_a_global_host(tmp_path: Path) -> None:
    done = make_certs(tmp_path, [], ["zone-1"])
    assert {p.name for p in tmp_path.iterdir()} == {
        "ca.pem",
        "ca-key.pem",
        "zone-1.pem",
        "zone-1-key.pem",
    }
    assert done[0] == f"made {tmp_path / 'ca.pem'}"


@pytest.mark.parametrize(
    "zone",
    ["", "Zone-1", "zone_1", "-zone", "zone-", "zone.1", "../etc", "a/b", "z" * 64, "zöne"],
)
def test_a_bad_zone_name_raises(tmp_path: Path, zone: str) -> None:
    with pytest.raises(CertError):
        make_certs(tmp_path / "out", HOSTS, [zone])
    assert not (tmp_path / "out").exists()  # nothing made when refused


def test_a_ca_with_its_key_missing_raises(out: Path) -> None:
    (out / "ca-key.pem").unlink()
    with pytest.raises(CertError):
        make_certs(out, HOSTS, ZONES)


def test_the_longest_zone_name_is_fine(tmp_path: Path) -> None:
    zone = "z" * 63
    make_certs(tmp_path, [], [zone])
    assert common_names(load(tmp_path / f"{zone}.pem")) == [zone]


# -- the command ------------------------------------------------------------------


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kumazone", "certs", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )


def test_python_m_kumazone_certs_makes_and_prints(tmp_path: Path) -> None:
    out = tmp_path / "cmd"
    result = run_command(
        "--out", str(out), "--global-host", "localhost", "--global-host", "127.0.0.1",
        "--zone", "zone-1", "--zone", "zone-2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"made {out / 'ca.pem'}",
        f"made {out / 'global.pem'} for localhost, 127.0.0.1",
        f"made {out / 'zone-1.pem'} for zone-1",
        f"made {out / 'zone-2.pem'} for zone-2",
    ]
    for zone in ["zone-1", "zone-2"]:
        load(out / f"{zone}.pem").verify_directly_issued_by(load(out / "ca.pem"))
        assert mode(out / f"{zone}-key.pem") == 0o600
    again = run_command("--out", str(out), "--zone", "zone-1", "--zone", "zone-3")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"reused {out / 'ca.pem'}",
        f"reused {out / 'zone-1.pem'}",
        f"made {out / 'zone-3.pem'} for zone-3",
    ]


def test_python_m_kumazone_certs_refuses_a_bad_zone(tmp_path: Path) -> None:
    result = run_command("--out", str(tmp_path / "x"), "--zone", "Bad_Zone")
    assert result.returncode == 1
    assert "kumazone certs:" in result.stderr and "Bad_Zone" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_python_m_kumazone_certs_needs_out() -> None:
    result = run_command("--zone", "zone-1")
    assert result.returncode == 2
    assert "--out" in result.stderr


# -- re-running checks what it reuses ----------------------------------------------


def test_a_leaf_from_another_ca_is_issued_again(out: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_certs(other, ["localhost"], ["zone-1"])
    shutil.copy(other / "zone-1.pem", out / "zone-1.pem")
    shutil.copy(other / "zone-1-key.pem", out / "zone-1-key.pem")
    done = make_certs(out, ["localhost", "127.0.0.1"], ["zone-1", "zone-2"])
    assert any(
        line.startswith(
            f"made {out / 'zone-1.pem'} for zone-1 (it was not issued by CN=kumazone CA"
        )
        for line in done
    ), done
    load(out / "zone-1.pem").verify_directly_issued_by(load(out / "ca.pem"))
    assert f"reused {out / 'zone-2.pem'}" in done


def test_a_leaf_about_to_expire_is_issued_again(out: Path) -> None:
    import datetime

    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=820)
    done = make_certs(out, ["localhost", "127.0.0.1"], ["zone-1"], now=later)
    assert any(
        line.startswith(f"made {out / 'zone-1.pem'} for zone-1 (it expires ") for line in done
    ), done
    assert load(out / "zone-1.pem").not_valid_after_utc > later + datetime.timedelta(days=800)


def test_a_leaf_with_a_key_that_is_not_its_own_is_issued_again(out: Path) -> None:
    shutil.copy(out / "zone-2-key.pem", out / "zone-1-key.pem")
    done = make_certs(out, ["localhost", "127.0.0.1"], ["zone-1", "zone-2"])
    assert f"made {out / 'zone-1.pem'} for zone-1 (zone-1-key.pem is not its key)" in done


# -- dataplane certificates and the zone's hosts ----------------------------------


def uris(certificate: x509.Certificate) -> list[str]:
    return list(san(certificate).get_values_for_type(x509.UniformResourceIdentifier))


@pytest.fixture(scope="module")
def dp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``kumazone certs`` run for a zone with its hosts and three dataplanes."""
    out = tmp_path_factory.mktemp("dp") / "certs"
    result = run_command(
        "--out", str(out), "--zone", "zone-1", "--zone-host", "127.0.0.1",
        "--zone-host", "zone-1.example", "--zone-host", "::1",
        "--dataplane", "default/web-1", "--dataplane", "other/db_2.x",
        "--dataplane", "default/web-1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"made {out / 'ca.pem'}",
        f"made {out / 'zone-1.pem'} for zone-1, 127.0.0.1, zone-1.example, ::1",
        f"made {out / 'dp-default-web-1.pem'} for spiffe://default/web-1",
        f"made {out / 'dp-other-db_2.x.pem'} for spiffe://other/db_2.x",
    ]
    return out


def test_dataplane_certificates_name_the_dataplane_by_uri_only(dp_out: Path) -> None:
    ca = load(dp_out / "ca.pem")
    for stem, identity in (
        ("dp-default-web-1", "default/web-1"),
        ("dp-other-db_2.x", "other/db_2.x"),
    ):
        certificate = load(dp_out / f"{stem}.pem")
        certificate.verify_directly_issued_by(ca)
        assert common_names(certificate) == [identity]
        assert uris(certificate) == [f"spiffe://{identity}"]
        # No DNS name, no address: it can pass neither as a zone nor as the global.
        assert san(certificate).get_values_for_type(x509.DNSName) == []
        assert san(certificate).get_values_for_type(x509.IPAddress) == []
        assert usages(certificate) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert mode(dp_out / f"{stem}-key.pem") == 0o600
        key = serialization.load_pem_private_key((dp_out / f"{stem}-key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key() == certificate.public_key()


def test_the_zone_certificate_names_its_hosts_and_may_serve(dp_out: Path) -> None:
    certificate = load(dp_out / "zone-1.pem")
    assert common_names(certificate) == ["zone-1"]
    assert san(certificate).get_values_for_type(x509.DNSName) == ["zone-1", "zone-1.example"]
    assert san(certificate).get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert set(usages(certificate)) == {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    }


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_verifies_dataplane_and_zone_server_purposes(dp_out: Path) -> None:
    checks = [
        ("dp-default-web-1.pem", "sslclient"),
        ("zone-1.pem", "sslserver"),
        ("zone-1.pem", "sslclient"),
    ]
    for name, purpose in checks:
        result = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(dp_out / "ca.pem"),
             str(dp_out / name)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


def test_dataplane_identity_reads_the_uri_san(dp_out: Path) -> None:
    from OpenSSL import crypto

    from kumazone.sync.tls import certificate_names, dataplane_identity

    def x509_of(stem: str) -> crypto.X509:
        return crypto.load_certificate(crypto.FILETYPE_PEM, (dp_out / f"{stem}.pem").read_bytes())

    assert dataplane_identity(x509_of("dp-default-web-1")) == ("default", "web-1")
    assert dataplane_identity(x509_of("dp-other-db_2.x")) == ("other", "db_2.x")
    assert dataplane_identity(x509_of("zone-1")) is None
    assert dataplane_identity(x509_of("ca")) is None
    # What the global matches a zone's name against: nothing a zone name can be.
    from kumazone.core.names import ZONE_NAME

    names = certificate_names(x509_of("dp-default-web-1"))
    assert names == {"default/web-1"}
    assert not any(ZONE_NAME.match(name) for name in names)


def test_a_rerun_reuses_dataplane_certificates_and_adds_a_zone_host(dp_out: Path) -> None:
    before = {p.name: p.read_bytes() for p in dp_out.iterdir()}
    again = run_command(
        "--out", str(dp_out), "--zone", "zone-1", "--zone-host", "127.0.0.1",
        "--dataplane", "default/web-1",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"reused {dp_out / 'ca.pem'}",
        f"reused {dp_out / 'zone-1.pem'}",
        f"reused {dp_out / 'dp-default-web-1.pem'}",
    ]
    assert {p.name: p.read_bytes() for p in dp_out.iterdir()} == before
    more = run_command(
        "--out", str(dp_out), "--zone", "zone-1", "--zone-host", "127.0.0.1",
        "--zone-host", "192.0.2.7",
    )  # fmt: skip
    assert more.returncode == 0, more.stderr
    assert more.stdout.splitlines() == [
        f"reused {dp_out / 'ca.pem'}",
        f"made {dp_out / 'zone-1.pem'} for zone-1, 127.0.0.1, 192.0.2.7 "
        "(it does not name zone-1, 127.0.0.1, 192.0.2.7)",
    ]
    certificate = load(dp_out / "zone-1.pem")
    assert ipaddress.ip_address("192.0.2.7") in san(certificate).get_values_for_type(x509.IPAddress)
    certificate.verify_directly_issued_by(load(dp_out / "ca.pem"))
    assert (dp_out / "dp-default-web-1.pem").read_bytes() == before["dp-default-web-1.pem"]


def test_a_zone_certificate_only_for_client_use_is_issued_again(tmp_path: Path) -> None:
    """A zone certificate from before it served dataplanes is made again, hosts checked."""
    from cryptography.hazmat.primitives import hashes

    make_certs(tmp_path, [], ["zone-1"])
    ca = load(tmp_path / "ca.pem")
    ca_key = serialization.load_pem_private_key((tmp_path / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = serialization.load_pem_private_key((tmp_path / "zone-1-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    old = load(tmp_path / "zone-1.pem")
    client_only = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(old.not_valid_before_utc)
        .not_valid_after(old.not_valid_after_utc)
        .add_extension(san(old), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "zone-1.pem").write_bytes(client_only.public_bytes(serialization.Encoding.PEM))
    done = make_certs(tmp_path, [], ["zone-1"])
    assert (
        f"made {tmp_path / 'zone-1.pem'} for zone-1 (it is not for client use and serving)" in done
    )
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages(load(tmp_path / "zone-1.pem"))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("web-1", "is not MESH/NAME"),
        ("/web-1", "mesh"),
        ("default/", "name: must not be empty"),
        ("default/a/b", "is not a valid name"),
        ("Bad Mesh/web", "mesh"),
        ("default/-web", "is not a valid name"),
        ("default/web-", "is not a valid name"),
        ("default/wéb", "is not a valid name"),
        ("m" * 64 + "/web", "at most 63"),
        ("default/" + "n" * 254, "at most 253"),
    ],
)
def test_a_bad_dataplane_is_refused_and_nothing_is_made(
    tmp_path: Path, value: str, why: str
) -> None:
    out = tmp_path / "bad"
    with pytest.raises(CertError, match=r"\A--dataplane: ") as refused:
        make_certs(out, [], ["zone-1"], dataplanes=[value])
    assert why in str(refused.value)
    assert not out.exists()


def test_the_command_refuses_a_bad_dataplane_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    result = run_command("--out", str(out), "--zone", "zone-1", "--dataplane", "default/a/b")
    assert result.returncode == 1
    assert result.stderr.startswith("kumazone certs: --dataplane: 'default/a/b': name:")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not out.exists()


def test_long_dataplane_names(tmp_path: Path) -> None:
    mesh, name = "m" * 63, "n" * 175  # dp-M-N-key.pem.tmp: 254 octets
    done = make_certs(tmp_path, [], [], dataplanes=[f"{mesh}/{name}"])
    certificate = load(tmp_path / f"dp-{mesh}-{name}.pem")
    assert uris(certificate) == [f"spiffe://{mesh}/{name}"]
    assert common_names(certificate) == [f"{mesh}/{name}"[:64]]  # X.509's bound on a CN
    assert len(done) == 2
    with pytest.raises(CertError, match="longer than 255 octets"):
        make_certs(tmp_path, [], [], dataplanes=[f"{mesh}/{name}nn"])


def test_dataplane_names_follow_the_rule_of_resource_names() -> None:
    from kumazone.core.resources import ResourceError, parse_resource
    from kumazone.sync.certs import dataplane_identity_problem

    names = ["web-1", "a", "A.b_c-D9", "-a", "a-", "a/b", "a b", "", "x" * 253, "x" * 254, "é"]
    for name in names:
        try:
            parse_resource(dataplane(name, "svc", mesh="m"))
            valid = True
        except ResourceError:
            valid = False
        assert (dataplane_identity_problem("m", name) is None) == valid, name
    for mesh in ["default", "m.x", "-m", "m" * 63, "m" * 64, "a/b", ""]:
        try:
            parse_resource(dataplane("n", "svc", mesh=mesh))
            valid = True
        except ResourceError:
            valid = False
        assert (dataplane_identity_problem(mesh, "n") is None) == valid, mesh


def test_two_dataplanes_with_one_file_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="would both be dp-a-b-c"):
        make_certs(tmp_path / "x", [], [], dataplanes=["a-b/c", "a/b-c"])
    assert not (tmp_path / "x").exists()
    make_certs(tmp_path, [], [], dataplanes=["a-b/c"])
    before = (tmp_path / "dp-a-b-c.pem").read_bytes()
    with pytest.raises(CertError, match="spiffe://a-b/c, not of spiffe://a/b-c"):
        make_certs(tmp_path, [], ["zone-9"], dataplanes=["a/b-c"])
    assert (tmp_path / "dp-a-b-c.pem").read_bytes() == before
    assert not (tmp_path / "zone-9.pem").exists()  # nothing made when refused


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"zones": ["zone-1"], "zone_hosts": ["localhost"]}, "shape of a zone name"),
        ({"zones": ["zone-1", "zone-2"], "zone_hosts": ["zone-2"]}, "shape of a zone"),
        ({"zones": ["zone-1"], "zone_hosts": ["bad_host.example"]}, "neither an IP"),
        ({"zones": ["zone-1"], "zone_hosts": ["a..b"]}, "neither an IP"),
        ({"zones": [], "zone_hosts": ["127.0.0.1"]}, "give one"),
        (
            {"global_hosts": ["cp.example"], "zones": ["zone-1"], "zone_hosts": ["CP.example"]},
            "host of the global",
        ),
    ],
)
def test_a_bad_zone_host_is_refused(tmp_path: Path, kwargs: dict[str, Any], why: str) -> None:
    out = tmp_path / "x"
    with pytest.raises(CertError, match=r"\A--zone-host: ") as refused:
        make_certs(
            out,
            kwargs.get("global_hosts", []),
            kwargs["zones"],
            zone_hosts=kwargs["zone_hosts"],
        )
    assert why in str(refused.value)
    assert not out.exists()


def test_the_command_refuses_a_bad_zone_host_in_one_line(tmp_path: Path) -> None:
    result = run_command("--out", str(tmp_path / "x"), "--zone", "zone-1", "--zone-host", "a b")
    assert result.returncode == 1
    assert result.stderr == (
        "kumazone certs: --zone-host: 'a b' is neither an IP address nor a DNS name\n"
    )
    assert not (tmp_path / "x").exists()


def test_a_zone_host_the_global_certificate_names_is_refused(tmp_path: Path) -> None:
    make_certs(tmp_path, ["cp.example", "10.0.0.1"], [])
    with pytest.raises(CertError, match=r"10\.0\.0\.1 is a host of the global"):
        make_certs(tmp_path, [], ["zone-1"], zone_hosts=["10.0.0.1"])
    assert not (tmp_path / "zone-1.pem").exists()
    make_certs(tmp_path, [], ["zone-1"], zone_hosts=["10.0.0.2", "zone-1.example"])
    assert (tmp_path / "zone-1.pem").exists()
