"""The lab's helper: reads the control planes' HTTP APIs from inside their namespaces.

    labctl.py get URL                         print the body (exit 1 unless HTTP 200)
    labctl.py wait URL [--timeout S]          until URL answers 200
    labctl.py --state DIR status [--json]     global, zone-1, zone-2 side by side
    labctl.py --state DIR wait-synced [--timeout S]
                                              until both zones hold the global's table

``status`` and ``wait-synced`` read ``DIR/lab.json`` (written by ``lab.sh up``) and run
``ip netns exec NAMESPACE python labctl.py fetch ...`` once per control plane: the
APIs listen on the lab's addresses, which only the lab's namespaces can reach.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ZONES = ("zone-1", "zone-2")
CONTROL_PLANES = ("global", *ZONES)


# -- inside a namespace ----------------------------------------------------------------


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of GET url; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", e)
        return 0, str(getattr(reason, "strerror", None) or reason).lower().encode()


def fetch(role: str, api: str) -> dict[str, Any]:
    """What status needs from one control plane's API, or {"error": ...}."""
    paths = ["/", "/vips"] + (["/zones"] if role == "global" else [])
    document: dict[str, Any] = {}
    for path in paths:
        # /vips comes a page at a time: read them all (the lab's table fits in one).
        url: str | None = api + (path + "?size=1000" if path == "/vips" else path)
        while url is not None:
            status, body = http_get(url)
            if status != 200:
                reason = body.decode(errors="replace").strip() or f"HTTP {status}"
                return {"error": f"unreachable ({reason})" if status == 0 else f"HTTP {status}"}
            page = json.loads(body)
            if path in document:
                document[path]["items"] += page["items"]
            else:
                document[path] = page
            url = page.get("next") if path == "/vips" else None
    return document


# -- from the root namespace --------------------------------------------------------------


def load_topology(state: Path) -> dict[str, Any]:
    """lab.json: the hosts, their namespaces and addresses (written by lab.sh up)."""
    path = state / "lab.json"
    try:
        topology: dict[str, Any] = json.loads(path.read_text())
        return topology
    except FileNotFoundError:
        sys.exit(f"lab: the lab is not up (no {path}): make lab")


def collect(topology: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each control plane's documents, fetched from inside its namespace, in parallel."""
    running: dict[str, subprocess.Popen[str]] = {}
    for name in CONTROL_PLANES:
        host = topology["hosts"][name]
        inside = [sys.executable, str(HERE / "labctl.py"), "fetch", host["role"], host["api"]]
        command = ["ip", "netns", "exec", host["namespace"], *inside]
        running[name] = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    found: dict[str, dict[str, Any]] = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=30)
        if process.returncode != 0:
            found[name] = {"error": (err.strip().splitlines() or ["failed"])[-1]}
        else:
            found[name] = json.loads(out)
    return found


def _clock(seconds: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds)) if seconds else "never"


def _sync_cell(name: str, document: dict[str, Any]) -> str:
    if "error" in document:
        return str(document["error"])
    about = document["/"]
    if name == "global":
        zones = document["/zones"]["items"]
        online = sum(1 for z in zones if z["state"] == "online")
        return f"{online} of {len(zones)} zones online"
    sync = about.get("sync")
    if not sync:
        return "standalone (no global)"
    if sync["connected"]:
        return f"connected since {_clock(sync['connectedSince'])}"
    return f"DISCONNECTED (last table {_clock(sync['lastTable'])})"


def _global_view(zone: str, documents: dict[str, dict[str, Any]]) -> str:
    if zone == "global":
        return ""
    document = documents["global"]
    if "error" in document:
        return "?"
    for item in document["/zones"]["items"]:
        if item["name"] == zone:
            return f"{item['state']}, acked version {item['ackedVersion']}"
    return "unknown to the global"


def vip_rows(
    documents: dict[str, dict[str, Any]],
) -> list[tuple[str, dict[str, str], bool]]:
    """(mesh/service, {control plane: cell}, differs) for every service anyone serves."""
    cells: dict[str, dict[str, str]] = {}
    for name in CONTROL_PLANES:
        document = documents[name]
        if "error" in document:
            continue
        for item in document["/vips"]["items"]:
            key = f"{item['mesh']}/{item['service']}"
            cell = item["vip"] + (" (provisional)" if item.get("provisional") else "")
            cells.setdefault(key, {})[name] = cell
    reachable = [n for n in CONTROL_PLANES if "error" not in documents[n]]
    rows = []
    for key in sorted(cells):
        row = {n: cells[key].get(n, "-") if n in reachable else "?" for n in CONTROL_PLANES}
        seen = {row[n] for n in reachable}
        rows.append((key, row, len(seen) > 1))
    return rows


def render(documents: dict[str, dict[str, Any]], topology: dict[str, Any]) -> str:
    """The status table: one column per control plane, a '!' on every row that differs."""
    header = ["", *CONTROL_PLANES]
    lines: list[list[str]] = [header]
    lines.append(["API", *(topology["hosts"][n]["api"] for n in CONTROL_PLANES)])
    zone_addresses = ["", *(topology["hosts"][n].get("dns", "") for n in ZONES)]
    lines.append(["DNS", *zone_addresses])
    lines.append(["sync", *(_sync_cell(n, documents[n]) for n in CONTROL_PLANES)])
    versions = [
        "?" if "error" in documents[n] else str(documents[n]["/"]["tableVersion"])
        for n in CONTROL_PLANES
    ]
    lines.append(["table version", *versions])
    lines.append(["global sees", *(_global_view(n, documents) for n in CONTROL_PLANES)])
    lines.append(["", "", "", ""])
    lines.append(["VIP (mesh/service)", *CONTROL_PLANES])
    rows = vip_rows(documents)
    differing = []
    for key, row, differs in rows:
        lines.append([("! " if differs else "  ") + key, *(row[n] for n in CONTROL_PLANES)])
        if differs:
            differing.append(key)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    zone_versions = {versions[1], versions[2]}
    if differing:
        text.append(f"! {len(differing)} service(s) differ: {', '.join(differing)}")
    else:
        text.append(f"zone-1 and zone-2 agree on all {len(rows)} VIPs")
    if len(zone_versions) > 1:
        text.append("! the zones hold different table versions")
    return "\n".join(text)


def synced(documents: dict[str, dict[str, Any]]) -> str | None:
    """None when both zones are connected and hold the global's table; else why not."""
    if "error" in documents["global"]:
        return f"global: {documents['global']['error']}"
    version = documents["global"]["/"]["tableVersion"]
    online = {z["name"] for z in documents["global"]["/zones"]["items"] if z["state"] == "online"}
    for zone in ZONES:
        document = documents[zone]
        if "error" in document:
            return f"{zone}: {document['error']}"
        sync = document["/"].get("sync") or {}
        if not sync.get("connected") or zone not in online:
            return f"{zone} is not connected to the global"
        if document["/"]["tableVersion"] != version:
            return f"{zone} has table version {document['/']['tableVersion']}, global {version}"
        provisional = [i["service"] for i in document["/vips"]["items"] if i["provisional"]]
        if provisional:
            return f"{zone} still has provisional VIPs: {', '.join(provisional)}"
    return None


# -- commands ----------------------------------------------------------------------------


def wait_synced(collect_documents: Callable[[], dict[str, dict[str, Any]]], timeout: float) -> int:
    """Poll until both zones hold the global's table: 0, or 1 after C{timeout} seconds."""
    started = time.monotonic()
    while True:
        documents = collect_documents()
        why = synced(documents)
        if why is None:
            version = documents["global"]["/"]["tableVersion"]
            print(
                f"lab: zone-1 and zone-2 hold the global's table (version {version}) "
                f"after {time.monotonic() - started:.1f}s"
            )
            return 0
        if time.monotonic() - started > timeout:
            print(f"lab: not synced after {timeout:.0f}s: {why}", file=sys.stderr)
            return 1
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labctl.py", description=__doc__.split("\n")[0])
    parser.add_argument("--state", type=Path, default=HERE / "state", help="the lab's state")
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("get")
    get.add_argument("url")
    wait = commands.add_parser("wait")
    wait.add_argument("url")
    wait.add_argument("--timeout", type=float, default=20.0)
    fetcher = commands.add_parser("fetch")
    fetcher.add_argument("role", choices=["global", "zone"])
    fetcher.add_argument("api")
    status = commands.add_parser("status")
    status.add_argument("--json", action="store_true", help="the raw documents")
    waiter = commands.add_parser("wait-synced")
    waiter.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    if args.command == "get":
        code, body = http_get(args.url)
        sys.stdout.write(body.decode(errors="replace"))
        return 0 if code == 200 else 1
    if args.command == "wait":
        deadline = time.monotonic() + args.timeout
        while True:
            code, _ = http_get(args.url, timeout=1.0)
            if code == 200:
                return 0
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.1)
    if args.command == "fetch":
        print(json.dumps(fetch(args.role, args.api)))
        return 0
    topology = load_topology(args.state)
    if args.command == "status":
        documents = collect(topology)
        print(json.dumps(documents, indent=2) if args.json else render(documents, topology))
        return 0
    if args.command == "wait-synced":
        return wait_synced(lambda: collect(topology), args.timeout)
    return 2


if __name__ == "__main__":
    sys.exit(main())
