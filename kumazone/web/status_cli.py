"""C{kumazone status --api URL}: the status page's picture, in a terminal.

It reads the same public API as the page (C{GET /}, the global's C{GET /zones},
C{GET /vips} page by page, following C{next}) with the standard library only, and
prints the control plane, its zones (state, last contact, acked version, lag) or its
sync state, and with C{--vips} the VIP table.
"""

from __future__ import annotations

import datetime
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from kumazone.web.listing import MAX_PAGE_SIZE

__all__ = ["Fetch", "StatusError", "http_fetch", "read_status", "render_status", "render_vips"]

#: GET a URL, return the decoded JSON; raise L{StatusError} when that fails.
Fetch = Callable[[str], Any]


class StatusError(Exception):
    """The API could not be read: one line saying why."""


def http_fetch(url: str, timeout: float = 5.0) -> Any:
    """GET C{url} as JSON with urllib."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise StatusError(f"{url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        why = getattr(reason, "strerror", None) or reason
        raise StatusError(f"cannot reach {url}: {why}") from None
    except ValueError as e:
        raise StatusError(f"{url} did not answer JSON ({e})") from None


#: Times C{--vips} reads the table again from the start when it changed meanwhile.
REREADS = 3


def read_status(
    api: str,
    fetch: Fetch = http_fetch,
    vips: bool = False,
    service: str | None = None,
    mesh: str | None = None,
    rereads: int = REREADS,
) -> dict[str, Any]:
    """What C{status} prints, read from the API at C{api}: C{/}, C{/zones}, C{/vips}.

    With C{vips}, every page of the table (of C{MAX_PAGE_SIZE}); if the table
    changes between two pages, it is read again from the start, at most
    C{rereads} times: after that (a table that never stops changing), the pages
    as read, marked C{"changing": True}.
    """
    base = api.rstrip("/")
    about = fetch(base + "/")
    if not isinstance(about, dict) or about.get("product") != "kumazone":
        raise StatusError(f"{base}/ is not a kumazone API")
    document: dict[str, Any] = {"api": base, "about": about}
    if about.get("role") == "global":
        document["zones"] = fetch(base + "/zones")["items"]
    query = {"size": str(MAX_PAGE_SIZE if vips else 1)}
    query.update({k: v for k, v in (("service", service), ("mesh", mesh)) if v})
    url: str | None = f"{base}/vips?{urllib.parse.urlencode(query)}"
    items: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    changing = False
    while url is not None:
        page = fetch(url)
        if first is None:
            first = page
        elif page["version"] != first["version"]:
            if rereads > 0:
                # The table changed between two pages: read it again from the start.
                return read_status(api, fetch, vips, service, mesh, rereads - 1)
            changing = True
        items += page["items"]
        url = page.get("next") if vips else None
    assert first is not None
    document["vips"] = {**first, "items": items, **({"changing": True} if changing else {})}
    return document


def _ago(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 5400:
        return f"{round(seconds / 60)} min ago"
    return f"{round(seconds / 3600)} h ago"


def _clock(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%H:%M:%SZ")


def _contact(iso: str | None, now: float) -> str:
    if not iso:
        return "never"
    when = datetime.datetime.fromisoformat(iso).timestamp()
    return f"{_clock(when)} ({_ago(now - when)})"


def _columns(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_status(document: dict[str, Any], now: float) -> list[str]:
    """The control plane and its zones (the global) or its sync state (a zone)."""
    about, vips = document["about"], document["vips"]
    role = about.get("role")
    name = "global" if role == "global" else about.get("zone", "?")
    lines = [
        f"{name}  {document['api']}  kumazone {about.get('version', '?')}",
        f"table version  {about.get('tableVersion')}",
        f"VIPs           {vips['rangeUsed']} of {vips['rangeSize']}",
    ]
    for error in vips.get("errors", []):
        lines.append(f"! {error['error']}: {', '.join(error['services'])}")
    if role == "global":
        zones = document["zones"]
        online = sum(1 for zone in zones if zone["state"] == "online")
        lines.insert(2, f"zones          {online} of {len(zones)} online")
        lines.append("")
        if not zones:
            lines.append("no zone has connected yet")
            return lines
        rows = [["zone", "state", "last contact", "services", "acked", "lag"]]
        for zone in zones:
            lag = zone["tableVersion"] - zone["ackedVersion"]
            rows.append(
                [
                    zone["name"],
                    zone["state"],
                    _contact(zone["lastContact"], now),
                    str(zone["services"]),
                    str(zone["ackedVersion"]),
                    f"{lag} version{'s' if lag != 1 else ''} behind" if lag > 0 else "in sync",
                ]
            )
        lines += _columns(rows, right=(3, 4))
        return lines
    sync = about.get("sync")
    if sync is None:
        lines.append("sync           standalone (allocates its own VIPs)")
    elif sync["connected"]:
        lines.append(
            f"sync           connected to {sync['global']} since {_clock(sync['connectedSince'])}"
        )
    else:
        lines.append(f"sync           DISCONNECTED from {sync['global']} (retrying with backoff)")
    if sync is not None:
        last = sync.get("lastTable")
        lines.append(
            f"last table     {_clock(last)} ({_ago(now - last)})"
            if last
            else "last table     none yet"
        )
    return lines


def render_vips(vips: dict[str, Any]) -> list[str]:
    """The VIP table, one service a line."""
    items = vips["items"]
    summary = f"{len(items)} of {vips['total']} VIP(s), table version {vips['version']}"
    if vips.get("changing"):
        summary += " (the table kept changing while it was read)"
    if not items:
        return [summary]
    rows = [["mesh/service", "VIP", "IPv6 VIP", "zones", ""]]
    for item in items:
        flags = ["provisional"] if item["provisional"] else []
        flags += ["no DNS name"] if item.get("warnings") else []
        rows.append(
            [
                f"{item['mesh']}/{item['service']}",
                item["vip"],
                item["vip6"],
                ",".join(item["zones"]),
                " ".join(flags),
            ]
        )
    return [*_columns(rows), summary]
