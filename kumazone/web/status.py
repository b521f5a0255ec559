"""The status page: C{GET /} of a control plane's API port, for a browser.

One HTML file with a little JavaScript (C{kumazone/web/static/status.html}), no build
step, nothing fetched from anywhere but the API it is served by: it works offline.
It reads the public API only, so it shows what C{curl} shows:

    GET /        (Accept: application/json)   role, versions; a zone's sync state
    GET /zones   (the global)                 each zone: state, last contact, acked
                                              version; the lag is table - acked
    GET /vips?size=&offset=&service=&mesh=    one page of the VIP table

and polls them every 2 seconds (C{?refresh=SECONDS} on the page's URL changes it)
with C{If-None-Match}, so an unchanged answer is a C{304} without a body.  When the
API lists connected dataplanes (a C{dataplanes} list in C{GET /}), the page shows
them too.

The API tells a browser from a client by C{Accept}: C{text/html} preferred to JSON
gets this page; anything else (curl, urllib, C{Accept: application/json}) the JSON.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["status_page", "wants_status_page"]


@functools.cache
def status_page() -> bytes:
    """The page's HTML (package data, read once)."""
    return resources.files("kumazone.web").joinpath("static/status.html").read_bytes()


def _quality(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def wants_status_page(accept: str | None) -> bool:
    """Whether an C{Accept} header prefers HTML to JSON (a browser's does)."""
    if not accept:
        return False
    html = json = 0.0
    for media_range in accept.split(","):
        kind, *parameters = media_range.split(";")
        kind = kind.strip().lower()
        if kind == "text/html":
            html = max(html, _quality(parameters))
        elif kind == "application/json":
            json = max(json, _quality(parameters))
    return html > 0 and html >= json
