"""Tests for L{kumazone.sync.certs} and the C{kumazone certs} command."""

from __future__ import annotations

import ipaddress
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kumazone.sync.certs import CertError, make_certs

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
        assert usages(certificate) == [ExtendedKeyUsageOID.CLIENT_AUTH]


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
