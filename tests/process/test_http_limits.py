"""HTTP limits of a real zone process: bodies refused before they reach disk, bounded
metric labels, and the diagnostics port on loopback by default (issue 11).

twisted.web spools a request body of 100,000 octets or more to a temporary file as it
arrives; the zone runs here with its own TMPDIR, which must stay empty whatever is sent.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kumazone.web.api import MAX_BODY_OCTETS
from tests.kzprocess import REPO, ZoneProcess

PATH = "/meshes/default/dataplanes/big"
WAIT = 5.0


@pytest.fixture(scope="module")
def temporary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tmpdir")


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory, temporary: Path) -> Iterator[ZoneProcess]:
    workdir = tmp_path_factory.mktemp("http")
    resources = workdir / "resources"
    shutil.copytree(REPO / "zones" / "zone-1", resources)
    process = ZoneProcess(workdir, resources, env={"TMPDIR": str(temporary)})
    try:
        yield process.start()
    finally:
        process.stop()


def _connect(zone: ZoneProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", zone.ports["api"]), timeout=WAIT)


def _response(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or WAIT passes)."""
    received = b""
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def _head(method: str, extra: str) -> bytes:
    return (
        f"{method} {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def test_a_long_content_length_is_refused_from_the_headers(zone, temporary: Path) -> None:
    with _connect(zone) as sock:
        sock.sendall(_head("PUT", f"Content-Length: {200 * 1024 * 1024}\r\n") + b"{" * 65536)
        response = _response(sock)
    assert response.startswith(b"HTTP/1.1 413 "), response[:200]
    assert b"bodies are limited to" in response
    assert os.listdir(temporary) == []


def test_a_long_chunked_body_is_refused_as_it_streams(zone, temporary: Path) -> None:
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    sent = 0
    with _connect(zone) as sock:
        sock.sendall(_head("PUT", "Transfer-Encoding: chunked\r\n"))
        try:
            for _ in range(64):  # 4 MB, four times the limit
                sock.sendall(chunk)
                sent += 65536
        except OSError:
            pass  # the server closed the connection: the refusal
        response = _response(sock)
    assert response.startswith(b"HTTP/1.1 413 "), response[:200]
    assert os.listdir(temporary) == []


def test_a_body_within_the_limit_is_kept_in_memory(zone, temporary: Path) -> None:
    body = b'{"type": "Dataplane", "pad": "' + b"x" * (MAX_BODY_OCTETS // 2) + b'"}'
    status, _ = zone.api("PUT", PATH, raw=body)
    assert status == 400  # answered by the API (a Dataplane of no use), not refused
    assert os.listdir(temporary) == []


def test_made_up_methods_share_one_label(zone) -> None:
    for method in ("FOO", "BAR1", "X-" + "Y" * 100):
        with _connect(zone) as sock:
            sock.sendall(
                f"{method} /zones HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            assert _response(sock).startswith(b"HTTP/1.1 4")
    status, metrics = zone.http("diagnostics", "GET", "/metrics")
    assert status == 200
    methods = set(re.findall(rb'kumazone_api_requests_total\{method="([^"]*)"', metrics))
    assert b"other" in methods
    assert methods <= {b"GET", b"HEAD", b"PUT", b"POST", b"DELETE", b"PATCH", b"OPTIONS", b"other"}


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on C{port} (from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:
                    found.add(address)
    return found


def test_the_diagnostics_port_listens_on_loopback_by_default(zone) -> None:
    assert _listening_addresses(zone.ports["diagnostics"]) == {"0100007F"}  # 127.0.0.1
