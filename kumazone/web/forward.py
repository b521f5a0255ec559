"""A replica of the global standing by: each API request goes to the leader's API.

The request is sent on with L{twisted.web.client.Agent} (a body of a known
length, hop-by-hop headers dropped, C{X-Forwarded-For} added), and the leader's
answer comes back as it was, but for the hop-by-hop headers.  The leader's
address comes from the leader table; a request already forwarded once is never
forwarded again (C{X-Kumazone-Forwarded}: 508), so two replicas that each take
the other for the leader cannot bounce a request between them.  With no leader
known, the leader unreachable, or its answer later than L{ANSWER_TIMEOUT}, the
client gets a JSON 503 with C{Retry-After}, as the API's own errors go.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request

__all__ = ["ANSWER_TIMEOUT", "CONNECT_TIMEOUT", "FORWARDED", "ToTheLeader"]

#: Seconds to reach the leader's API, and for its whole answer.
CONNECT_TIMEOUT = 2.0
ANSWER_TIMEOUT = 10.0
#: The header a forwarded request carries (its value: who forwarded it).
FORWARDED = b"x-kumazone-forwarded"
#: Headers of one connection only (RFC 9110 7.6.1), never sent on; and those the
#: agent writes itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


def _end_to_end(headers: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
    """The headers that are not hop-by-hop, nor named by C{Connection}."""
    named = {
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }
    return [
        (name, values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in _HOP_BY_HOP and name.lower() not in named
    ]


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def _error(request: Request, code: int, title: str, details: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    if code == 503:
        request.setHeader(b"retry-after", b"1")
    return json.dumps({"title": title, "details": details, "causes": []}).encode()


class ToTheLeader(resource.Resource):
    """The API of a replica standing by: C{leader()} says where the leader's API is,
    (host, port), or None; C{me} names this replica in C{X-Kumazone-Forwarded}."""

    isLeaf = True
    log = Logger()

    def __init__(self, reactor: Any, leader: Callable[[], tuple[str, int] | None], me: str) -> None:
        super().__init__()
        self.reactor = reactor
        self.leader = leader
        self.me = me.encode("utf-8", "replace")
        pool = HTTPConnectionPool(reactor, persistent=False)
        pool._factory = _QuietClientFactory  # one log line per request forwarded is noise
        self._agent = Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=pool)

    def render(self, request: Request) -> Any:
        if request.requestHeaders.hasHeader(FORWARDED):
            # Forwarded here by a replica that took this one for the leader: no further.
            return _error(
                request,
                508,
                "Loop detected",
                "this replica of the global stands by, and the request was forwarded "
                "to it as to the leader",
            )
        found = self.leader()
        if found is None:
            return _error(
                request,
                503,
                "Standing by",
                "this replica of the global follows, and no leader is known yet (or the "
                "leader's API listens on its own loopback only)",
            )
        host, port = found
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        url = f"http://{where}{request.uri.decode('ascii', 'replace')}".encode("ascii", "replace")
        headers = Headers(dict(_end_to_end(request.requestHeaders)))
        headers.setRawHeaders(FORWARDED, [self.me])
        client = request.getClientAddress()
        client_host = getattr(client, "host", None)
        if client_host:
            before = request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
            headers.setRawHeaders(
                b"x-forwarded-for", [b", ".join([*before, client_host.encode("ascii")])]
            )
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read()
        producer = (
            FileBodyProducer(BytesIO(body))
            if body
            or request.method
            in (
                b"PUT",
                b"POST",
                b"PATCH",
            )
            else None
        )
        asked = self._agent.request(request.method, url, headers, producer)

        def answered(response: Any) -> Any:
            read = readBody(response)
            read.addCallback(lambda content: (response, content))
            return read

        def send(result: tuple[Any, bytes]) -> None:
            response, content = result
            if request._disconnected or request.finished:
                return
            request.setResponseCode(response.code, response.phrase)
            for name, values in _end_to_end(response.headers):
                request.responseHeaders.setRawHeaders(name, values)
            request.setHeader(b"content-length", str(len(content)).encode())
            request.write(content)
            request.finish()

        def failed(failure: Failure) -> None:
            if request._disconnected or request.finished:
                return
            why = "took too long" if failure.check(CancelledError) else failure.getErrorMessage()
            request.write(
                _error(
                    request,
                    503,
                    "The leader did not answer",
                    f"this replica of the global stands by; the leader's API at {where}: {why}",
                )
            )
            request.finish()

        asked.addCallback(answered)
        asked.addTimeout(ANSWER_TIMEOUT, self.reactor)
        asked.addCallbacks(send, failed)
        request.notifyFinish().addErrback(lambda _: asked.cancel())  # the client went
        return NOT_DONE_YET
