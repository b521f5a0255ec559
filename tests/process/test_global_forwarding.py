"""A replica of the global standing by forwards zone sync and the API to the leader.

A real `twistd kumazone --role=global --store=postgresql://...` process stands by
while the test itself holds the lead in the database (the advisory lock on its own
session, and a leader row it renews), so the test says where the leader is: its
own HTTP server and TCP listener, a dead port, or the standby's own ports.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fedprocess import GlobalProcess, free_port, wait_until


class FakeLeader:
    """Holds the lead of C{global} on a session of its own, and writes the contact."""

    def __init__(self, url: str) -> None:
        import psycopg

        from kumazone.store.leader import LOCK_CLASS, _lock_key
        from kumazone.store.postgres import PostgresStore

        PostgresStore(url).close()  # the schema, before any replica can take the lead
        self.db = psycopg.connect(url.replace("postgresql://", "postgresql://", 1), autocommit=True)
        row = self.db.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, _lock_key("global"))
        ).fetchone()
        assert row == (True,)
        self.contact = ""
        self.db.execute(
            "INSERT INTO leader (name, epoch, holder, pid, renewed_at, contact) "
            "VALUES ('global', 1, 'the test', pg_backend_pid(), now(), '')"
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def say(self, kds: str, api: str) -> None:
        with self._lock:
            self.contact = json.dumps({"kds": kds, "api": api})
            self.db.execute(
                "UPDATE leader SET contact = %s, renewed_at = now() WHERE name = 'global'",
                (self.contact,),
            )

    def _renew(self) -> None:
        while not self._stop.wait(0.3):
            with self._lock:
                self.db.execute("UPDATE leader SET renewed_at = now() WHERE name = 'global'")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.db.close()


class Recorder(http.server.BaseHTTPRequestHandler):
    """The leader's API, as far as these tests go: records each request, answers JSON."""

    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        Recorder.seen.append((self.command, self.path, dict(self.headers.items()), body))
        reply = json.dumps({"leader": True, "path": self.path, "got": len(body)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_PUT = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def leader(postgres: Any) -> Iterator[FakeLeader]:
    made = FakeLeader(postgres.fresh_database("global_forwarding"))
    yield made
    made.close()


@pytest.fixture
def leaders_api() -> Iterator[int]:
    Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def leaders_kds() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP listener standing for the leader's zone sync: it answers each line with
    the line upper-cased."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], accepted
    listener.close()
    for conn in accepted:
        conn.close()


@pytest.fixture
def standby(tmp_path: Path, leader: FakeLeader, postgres: Any) -> Iterator[GlobalProcess]:
    url = leader.db.info.dsn
    store = f"postgresql://kumazone@127.0.0.1:{postgres.port}/{leader.db.info.dbname}"
    assert url
    process = GlobalProcess(
        tmp_path,
        None,
        [f"--store={store}", "--insecure", "--advertise-address=127.0.0.1"],
        kds_port=free_port(),
    ).start()
    yield process
    process.stop()


def role(process: GlobalProcess) -> str:
    return process.http("diagnostics", "GET", "/ready")[1].decode().strip()


def api(process: GlobalProcess, method: str, path: str, **kwargs: Any) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", process.ports["api"], timeout=15)
    try:
        connection.request(method, path, **kwargs)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed (or reset) the connection, waiting for it."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def kds_roundtrip(process: GlobalProcess, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", process.ports["kds"]), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def test_the_api_and_zone_sync_reach_the_leader_through_a_standby(
    standby: GlobalProcess,
    leader: FakeLeader,
    leaders_api: int,
    leaders_kds: tuple[int, list[socket.socket]],
) -> None:
    assert role(standby) == "ok: follower"
    leader.say(f"127.0.0.1:{leaders_kds[0]}", f"127.0.0.1:{leaders_api}")

    # The API: the leader's answer, as it gave it.
    status, _headers, body = wait_until(
        lambda: (got := api(standby, "GET", "/zones?size=5"))[0] == 200 and got, 10, 0.1
    )
    assert json.loads(body) == {"leader": True, "path": "/zones?size=5", "got": 0}
    method, path, sent, _ = Recorder.seen[-1]
    lowered = {k.lower(): v for k, v in sent.items()}
    assert (method, path) == ("GET", "/zones?size=5")
    assert lowered["x-forwarded-for"] == "127.0.0.1"
    assert "x-kumazone-forwarded" in lowered
    # A chunked body goes on whole, with its length (no chunked encoding is sent on).
    chunks = iter([b'{"a": ', b'"b"}'])
    status, _, body = api(
        standby,
        "PUT",
        "/zones/zone-9",
        body=chunks,
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        encode_chunked=True,
    )
    assert status == 200 and json.loads(body)["got"] == len(b'{"a": "b"}')
    _, _, sent, received = Recorder.seen[-1]
    lowered = {k.lower(): v for k, v in sent.items()}
    assert received == b'{"a": "b"}'
    assert "transfer-encoding" not in lowered and lowered["content-length"] == "10"
    # A request forwarded once is not forwarded again (two standbys never bounce it).
    status, _, body = api(standby, "GET", "/zones", headers={"X-Kumazone-Forwarded": "x"})
    assert status == 508 and json.loads(body)["title"] == "Loop detected"

    # Zone sync: byte for byte, both ways.
    assert kds_roundtrip(standby, b"hello, leader\n") == b"HELLO, LEADER\n"


def test_a_leader_gone_or_at_the_standbys_own_address_is_not_forwarded_to(
    standby: GlobalProcess,
    leader: FakeLeader,
    leaders_api: int,
    leaders_kds: tuple[int, list[socket.socket]],
) -> None:
    leader.say(f"127.0.0.1:{leaders_kds[0]}", f"127.0.0.1:{free_port()}")  # its API is down
    _status, headers, body = wait_until(
        lambda: (
            (got := api(standby, "GET", "/zones"))[0] == 503 and b"did not answer" in got[2] and got
        ),
        10,
        0.1,
    )
    assert headers["Content-Type"] == "application/json" and headers["Retry-After"] == "1"
    assert json.loads(body)["title"] == "The leader did not answer"

    # A zone forwarded to the leader, which then moves: the standby closes it.
    sock = socket.create_connection(("127.0.0.1", standby.ports["kds"]), timeout=10)
    sock.sendall(b"ping\n")
    assert sock.recv(100) == b"PING\n"
    leader.say(f"127.0.0.1:{free_port()}", f"127.0.0.1:{leaders_api}")
    started = time.monotonic()
    assert closed(sock)
    assert time.monotonic() - started < 5
    sock.close()
    wait_until(lambda: api(standby, "GET", "/zones")[0] == 200, 10, 0.1, "the new API")

    # The leader's address is the standby's own (a loopback address, seen from another
    # host): neither the API nor zone sync loops back into it.
    leader.say(f"127.0.0.1:{standby.ports['kds']}", f"127.0.0.1:{standby.ports['api']}")
    _status, _, body = wait_until(
        lambda: (
            (got := api(standby, "GET", "/zones"))[0] == 503
            and b"no leader is known" in got[2]
            and got
        ),
        10,
        0.1,
    )
    with socket.create_connection(("127.0.0.1", standby.ports["kds"]), timeout=5) as sock:
        sock.sendall(b"ping\n")
        assert closed(sock)  # at once
    assert "is this replica's own" in standby.log_path.read_text()
    metrics = standby.metrics()
    assert metrics.get("kumazone_kds_forwarded_total") == 1  # the one to the live leader
    assert (metrics.get("kumazone_kds_forward_refused_total", reason="no leader") or 0) >= 1
