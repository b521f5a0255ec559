"""A TCP relay on loopback that a test can cut off: the network between a process and a server.

C{Relay(target_port).start()} listens on 127.0.0.1 at a free port and relays
each connection to 127.0.0.1:C{target_port} on a thread of its own.
C{cut()} makes it a black hole, as a partition does: nothing more is relayed in
either direction, no new connection is answered, and nothing is closed (the
sockets stay open, so neither side learns of it but by its own timeouts).
C{mend()} relays again; C{stop()} closes everything.
"""

from __future__ import annotations

import selectors
import socket
import threading

__all__ = ["Relay"]


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._cut = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> Relay:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._thread.start()
        return self

    def cut(self) -> None:
        self._cut.set()

    def mend(self) -> None:
        self._cut.clear()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        for sock in list(self._peers):
            sock.close()
        self._listener.close()
        self._selector.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._cut.is_set():
                self._stopping.wait(0.05)  # a black hole: nothing read, nothing closed
                continue
            for key, _events in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                else:
                    self._relay(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        server = socket.create_connection(self.target, timeout=5)
        for one, other in ((client, server), (server, client)):
            one.setblocking(False)
            self._peers[one] = other
            self._selector.register(one, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        other = self._peers.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        try:
            other.setblocking(True)
            other.sendall(data)
            other.setblocking(False)
        except OSError:
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        for one in (sock, self._peers.get(sock)):
            if one is not None and one in self._peers:
                self._selector.unregister(one)
                del self._peers[one]
                one.close()
