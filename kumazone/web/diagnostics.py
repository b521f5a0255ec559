"""The diagnostics server (port 5680): /ready, /healthy and /metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.twisted import MetricsResource
from twisted.web import resource as web_resource
from twisted.web.server import Request

from kumazone.metrics import Metrics

__all__ = ["diagnostics_root"]


class _Probe(web_resource.Resource):
    isLeaf = True

    def __init__(
        self, check: Callable[[], str | None], role: Callable[[], str | None] = lambda: None
    ) -> None:
        super().__init__()
        self.check = check
        self.role = role

    def render_GET(self, request: Request) -> bytes:
        problem = self.check()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if problem is None:
            role = self.role()
            return b"ok\n" if role is None else f"ok: {role}\n".encode()
        request.setResponseCode(503)
        return problem.encode() + b"\n"


def diagnostics_root(
    metrics: Metrics,
    ready: Callable[[], str | None],
    role: Callable[[], str | None] = lambda: None,
) -> web_resource.Resource:
    """The resource tree: C{ready} returns None when ready, else why not; C{role}, a
    replica's part (leader, follower), said after "ok" (None: one process, no part)."""
    root = web_resource.Resource()
    root.putChild(b"ready", _Probe(ready, role))
    root.putChild(b"healthy", _Probe(lambda: None))
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    return root
