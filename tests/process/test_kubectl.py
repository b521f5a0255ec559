"""kumazone install dns reading the ConfigMap through kubectl: a stand-in kubectl script
is run as a real process (no cluster is ever contacted)."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from kumazone.install.cluster_dns import InstallError
from kumazone.install.kubectl import read_configmap

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cluster_dns"


def fake_kubectl(directory: Path, script: str) -> Callable[[str], str | None]:
    """A `which` that finds a kubectl script (no cluster is ever contacted)."""
    kubectl = directory / "kubectl"
    kubectl.write_text("#!/bin/sh\n" + script)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    return lambda name: str(kubectl) if name == "kubectl" else None


def test_read_configmap_runs_kubectl(tmp_path: Path) -> None:
    fixture = FIXTURES / "coredns-k3s.yaml"
    args = tmp_path / "args"
    which = fake_kubectl(tmp_path, f"printf '%s\\n' \"$@\" > {args}\ncat {fixture}\n")
    text, source = read_configmap("coredns", None, which)
    assert text == fixture.read_text()
    assert args.read_text().split() == "-n kube-system get configmap coredns -o yaml".split()
    assert source == "kubectl -n kube-system get configmap coredns"


def test_read_configmap_kubectl_fails(tmp_path: Path) -> None:
    which = fake_kubectl(
        tmp_path, "echo \"noise\" >&2\necho 'Error from server (NotFound): nope' >&2\nexit 1\n"
    )
    with pytest.raises(InstallError) as raised:
        read_configmap("kube-dns", None, which)
    assert str(raised.value) == (
        "kubectl -n kube-system get configmap kube-dns: Error from server (NotFound): nope"
    )
