"""The lab's helper: reads the control planes' APIs and the dataplanes' diagnostics
from inside their namespaces.

    labctl.py get URL                         print the body (exit 1 unless HTTP 200)
    labctl.py wait URL [--timeout S]          until URL answers 200
    labctl.py fetch dataplane URL             a dataplane's /ready and /metrics, as JSON
    labctl.py fetch global URL [--ready URL]  a global's API (with --ready, its /ready first:
                                              a standby replica's API is the leader's)
    labctl.py --state DIR status [--json]     the global(s), zone-1, zone-2 side by side,
                                              then each client's dataplane
    labctl.py --state DIR wait-synced [--timeout S]
                                              until both zones hold the leading global's
                                              table and each dataplane its zone's

``status`` and ``wait-synced`` read ``DIR/lab.json`` (written by ``lab.sh up``) and run
``ip netns exec NAMESPACE python labctl.py fetch ...`` once per control plane and per
client: the APIs listen on the lab's addresses, which only the lab's namespaces can
reach, and each dataplane's diagnostics on its own host's loopback.  Standard library
only.

With the global's replicas (``make lab LAB_GLOBAL_REPLICAS=2``: ``global`` and
``global-2``) each global's ``/ready`` says whether it leads (``ok: leader``) or stands
by (``ok: follower``, its API and zone sync forwarded to the leader); status shows each
one's role and reads the table from the one that leads, wait-synced waits for the
zones to hold its table.
"""

from __future__ import annotations

import argparse
import json
import re
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
#: The dataplane metrics status and the tests read (counters without their _total).
DATAPLANE_METRICS = (
    "kumazone_dataplane_queries",
    "kumazone_dataplane_upstream_queries",
    "kumazone_dataplane_upstream_failures",
    "kumazone_dataplane_table_version",
    "kumazone_dataplane_connected",
)
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


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


def replica_role(ready: str) -> str | None:
    """A global's part from its C{/ready} (C{leader}, C{follower}), C{down} when nothing
    answers, None for a global that is no replica (or not ready)."""
    status, body = http_get(ready)
    if status == 0:
        return "down"
    text = body.decode(errors="replace").strip()
    if status == 200 and text.startswith("ok: "):
        return text.removeprefix("ok: ")
    return None


def fetch(role: str, api: str, ready: str | None = None) -> dict[str, Any]:
    """What status needs from one control plane's API, or {"error": ...}; with C{ready}
    (a global's C{/ready}), its replica's part as C{"role"}, and a standby's API (the
    leader's, forwarded) not read."""
    if role == "dataplane":
        return fetch_dataplane(api)
    part = replica_role(ready) if ready else None
    if part == "follower":
        return {"error": "standby (forwards)", "role": part}
    document = fetch_api(role, api)
    if part is not None:
        document["role"] = part
    return document


def fetch_api(role: str, api: str) -> dict[str, Any]:
    """A control plane's C{/}, C{/vips} and C{/zones} or C{/dataplanes/connected}."""
    paths = ["/", "/vips"] + (["/zones"] if role == "global" else ["/dataplanes/connected"])
    paged = ("/vips", "/dataplanes/connected")
    document: dict[str, Any] = {}
    for path in paths:
        # Listings come a page at a time: read them all (the lab's fit in one).
        url: str | None = api + (path + "?size=1000" if path in paged else path)
        while url is not None:
            status, body = http_get(url)
            if status == 404 and path == "/dataplanes/connected":
                break  # a zone without the listing: status leaves the column empty
            if status != 200:
                reason = body.decode(errors="replace").strip() or f"HTTP {status}"
                return {"error": f"unreachable ({reason})" if status == 0 else f"HTTP {status}"}
            page = json.loads(body)
            if path in document:
                document[path]["items"] += page["items"]
            else:
                document[path] = page
            url = page.get("next") if path in paged else None
    return document


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of L{DATAPLANE_METRICS} in a Prometheus text page, keyed as written
    (C{name{labels}}), counters without their C{_total}."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name = match["name"].removesuffix("_total")
        if name not in DATAPLANE_METRICS:
            continue
        key = name + (f"{{{match['labels']}}}" if match["labels"] else "")
        samples[key] = float(match["value"])
    return samples


def fetch_dataplane(diagnostics: str) -> dict[str, Any]:
    """A dataplane's readiness and metrics from its diagnostics port, or {"error": ...}."""
    ready, _ = http_get(diagnostics + "/ready")
    status, body = http_get(diagnostics + "/metrics")
    if status != 200:
        reason = body.decode(errors="replace").strip() or f"HTTP {status}"
        return {"error": f"unreachable ({reason})" if status == 0 else f"HTTP {status}"}
    return {"ready": ready == 200, "metrics": parse_metrics(body.decode(errors="replace"))}


# -- from the root namespace --------------------------------------------------------------


def load_topology(state: Path) -> dict[str, Any]:
    """lab.json: the hosts, their namespaces and addresses (written by lab.sh up)."""
    path = state / "lab.json"
    try:
        topology: dict[str, Any] = json.loads(path.read_text())
        return topology
    except FileNotFoundError:
        sys.exit(f"lab: the lab is not up (no {path}): make lab")


def clients(topology: dict[str, Any]) -> list[str]:
    """The client hosts, each with a dataplane."""
    return [name for name, host in topology["hosts"].items() if host.get("role") == "client"]


def control_planes(topology: dict[str, Any]) -> list[str]:
    """The globals (one, or each replica) and the zones, in lab.json's order."""
    roles = ("global", "zone")
    return [name for name, host in topology["hosts"].items() if host.get("role") in roles]


def global_names(documents: dict[str, dict[str, Any]]) -> list[str]:
    """The globals among the documents: C{global}, and with replicas C{global-2}."""
    return [name for name in documents if name == "global" or name.startswith("global-")]


def leader(documents: dict[str, dict[str, Any]]) -> str:
    """The global that leads: the one whose /ready says so (a standby's API is not
    read); the first global when none does."""
    names = global_names(documents)
    for name in names:
        if "error" not in documents[name]:
            return name
    return names[0]


def planes(documents: dict[str, dict[str, Any]]) -> list[str]:
    """The control planes' columns: the global(s), then the zones."""
    return [*global_names(documents), *ZONES]


def collect(topology: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each control plane's and each dataplane's documents, fetched from inside its
    namespace, in parallel."""
    running: dict[str, subprocess.Popen[str]] = {}
    for name in (*control_planes(topology), *clients(topology)):
        host = topology["hosts"][name]
        extra: list[str] = []
        if host["role"] == "client":
            role, url = "dataplane", host["dataplane"]["diagnostics"]
        else:
            role, url = host["role"], host["api"]
            if role == "global" and host.get("diagnostics"):
                extra = ["--ready", host["diagnostics"] + "/ready"]
        inside = [sys.executable, str(HERE / "labctl.py"), "fetch", role, url, *extra]
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
    if name == "global" or name.startswith("global-"):
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
    if zone not in ZONES:
        return ""
    document = documents[leader(documents)]
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
    names = planes(documents)
    for name in names:
        document = documents[name]
        if "error" in document:
            continue
        for item in document["/vips"]["items"]:
            key = f"{item['mesh']}/{item['service']}"
            cell = item["vip"] + (" (provisional)" if item.get("provisional") else "")
            cells.setdefault(key, {})[name] = cell
    reachable = [n for n in names if "error" not in documents[n]]
    rows = []
    for key in sorted(cells):
        row = {n: cells[key].get(n, "-") if n in reachable else "?" for n in names}
        seen = {row[n] for n in reachable}
        rows.append((key, row, len(seen) > 1))
    return rows


def render(documents: dict[str, dict[str, Any]], topology: dict[str, Any]) -> str:
    """The status table: one column per control plane, a '!' on every row that differs
    (with replicas of the global, a row of each one's role)."""
    names = planes(documents)
    globals_ = global_names(documents)
    header = ["", *names]
    lines: list[list[str]] = [header]
    lines.append(["API", *(topology["hosts"][n]["api"] for n in names)])
    if len(globals_) > 1:
        roles = [str(documents[n].get("role") or "?") for n in globals_]
        lines.append(["role", *roles, *("" for _ in ZONES)])
    zone_addresses = [topology["hosts"][n].get("dns", "") for n in ZONES]
    lines.append(["DNS", *("" for _ in globals_), *zone_addresses])
    lines.append(["sync", *(_sync_cell(n, documents[n]) for n in names)])
    versions = {
        n: "?" if "error" in documents[n] else str(documents[n]["/"]["tableVersion"]) for n in names
    }
    lines.append(["table version", *versions.values()])
    lines.append(["global sees", *(_global_view(n, documents) for n in names)])
    lines.append(["" for _ in header])
    lines.append(["VIP (mesh/service)", *names])
    rows = vip_rows(documents)
    differing = []
    for key, row, differs in rows:
        lines.append([("! " if differs else "  ") + key, *(row[n] for n in names)])
        if differs:
            differing.append(key)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    zone_versions = {versions[zone] for zone in ZONES}
    if differing:
        text.append(f"! {len(differing)} service(s) differ: {', '.join(differing)}")
    else:
        text.append(f"zone-1 and zone-2 agree on all {len(rows)} VIPs")
    if len(zone_versions) > 1:
        text.append("! the zones hold different table versions")
    if clients(topology):
        text += ["", render_dataplanes(documents, topology)]
    return "\n".join(text)


def _metric(document: dict[str, Any], key: str) -> float | None:
    value = document.get("metrics", {}).get(key)
    return None if value is None else float(value)


def _count(value: float | None) -> str:
    return "?" if value is None else str(int(value))


def connected_entry(
    documents: dict[str, dict[str, Any]], zone: str, mesh: str, name: str
) -> dict[str, Any] | None:
    """The zone's C{/dataplanes/connected} entry of a dataplane, if the zone lists it."""
    listing = documents.get(zone, {}).get("/dataplanes/connected")
    if listing is None:
        return None
    for item in listing["items"]:
        if item["mesh"] == mesh and item["name"] == name:
            return dict(item)
    return None


def _zone_sees(documents: dict[str, dict[str, Any]], zone: str, mesh: str, name: str) -> str:
    document = documents.get(zone, {})
    if "error" in document:
        return "?"
    if "/dataplanes/connected" not in document:
        return "(no /dataplanes/connected)"
    entry = connected_entry(documents, zone, mesh, name)
    if entry is None:
        return "not connected"
    when = (entry.get("connectedSince") or "")[11:19] or "?"
    return f"acked version {entry['version']}, since {when}"


def render_dataplanes(documents: dict[str, dict[str, Any]], topology: dict[str, Any]) -> str:
    """One column per client host's dataplane: its zone, readiness, table, queries."""
    names = clients(topology)
    hosts = [topology["hosts"][n] for n in names]
    lines: list[list[str]] = [["dataplane", *names]]
    lines.append(["name", *(f"{h['dataplane']['mesh']}/{h['dataplane']['name']}" for h in hosts)])
    lines.append(["DNS", *(h["dataplane"]["dns"] for h in hosts)])
    lines.append(["zone", *(f"{h['zone']} ({h['dataplane']['cp']})" for h in hosts)])
    ready, connected, version, local, upstream, sees = [], [], [], [], [], []
    for name, host in zip(names, hosts, strict=True):
        document = documents[name]
        if "error" in document:
            ready.append(str(document["error"]))
            connected += ["?"]
            version += ["?"]
            local += ["?"]
            upstream += ["?"]
        else:
            ready.append("ready" if document["ready"] else "NOT READY")
            up = _metric(document, "kumazone_dataplane_connected")
            connected.append("?" if up is None else "connected" if up else "DISCONNECTED")
            version.append(_count(_metric(document, "kumazone_dataplane_table_version")))
            local.append(_count(_metric(document, 'kumazone_dataplane_queries{source="local"}')))
            upstream.append(
                _count(_metric(document, 'kumazone_dataplane_queries{source="upstream"}'))
            )
        plane = host["dataplane"]
        sees.append(_zone_sees(documents, host["zone"], plane["mesh"], plane["name"]))
    lines += [
        ["/ready", *ready],
        ["to the zone", *connected],
        ["table version", *version],
        ["zone sees", *sees],
        ["queries: local", *local],
        ["queries: upstream", *upstream],
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def synced(
    documents: dict[str, dict[str, Any]], topology: dict[str, Any] | None = None
) -> str | None:
    """None when both zones are connected and hold the (leading) global's table, and
    each client's dataplane (with C{topology}) is ready and its zone's table; else why
    not."""
    lead = leader(documents)
    if "error" in documents[lead]:
        if len(global_names(documents)) > 1:
            return "no global leads: " + ", ".join(
                f"{n}: {documents[n]['error']}" for n in global_names(documents)
            )
        return f"{lead}: {documents[lead]['error']}"
    version = documents[lead]["/"]["tableVersion"]
    online = {z["name"] for z in documents[lead]["/zones"]["items"] if z["state"] == "online"}
    for zone in ZONES:
        document = documents[zone]
        if "error" in document:
            return f"{zone}: {document['error']}"
        sync = document["/"].get("sync") or {}
        if not sync.get("connected") or zone not in online:
            return f"{zone} is not connected to the global"
        if document["/"]["tableVersion"] != version:
            return f"{zone} has table version {document['/']['tableVersion']}, {lead} {version}"
        provisional = [i["service"] for i in document["/vips"]["items"] if i["provisional"]]
        if provisional:
            return f"{zone} still has provisional VIPs: {', '.join(provisional)}"
    for name in clients(topology) if topology else []:
        document = documents[name]
        zone = topology["hosts"][name]["zone"] if topology else ""
        if "error" in document:
            return f"{name}'s dataplane: {document['error']}"
        if not document["ready"] or not _metric(document, "kumazone_dataplane_connected"):
            return f"{name}'s dataplane is not ready or not connected to {zone}"
        held = _metric(document, "kumazone_dataplane_table_version")
        if held != documents[zone]["/"]["tableVersion"]:
            return f"{name}'s dataplane has table version {_count(held)}, {zone} {version}"
    return None


# -- commands ----------------------------------------------------------------------------


def wait_synced(
    collect_documents: Callable[[], dict[str, dict[str, Any]]],
    timeout: float,
    topology: dict[str, Any] | None = None,
) -> int:
    """Poll until both zones hold the global's table (and with C{topology}, each
    dataplane its zone's): 0, or 1 after C{timeout} seconds."""
    started = time.monotonic()
    while True:
        documents = collect_documents()
        why = synced(documents, topology)
        if why is None:
            lead = leader(documents)
            version = documents[lead]["/"]["tableVersion"]
            dataplanes = clients(topology) if topology else []
            also = f", the dataplanes of {' and '.join(dataplanes)} too," if dataplanes else ""
            which = f" ({lead} leads)" if len(global_names(documents)) > 1 else ""
            print(
                f"lab: zone-1 and zone-2 hold the global's table (version {version}){also} "
                f"after {time.monotonic() - started:.1f}s{which}"
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
    fetcher.add_argument("role", choices=["global", "zone", "dataplane"])
    fetcher.add_argument("api")
    fetcher.add_argument("--ready", help="a global's /ready: its replica's part")
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
        print(json.dumps(fetch(args.role, args.api, args.ready)))
        return 0
    topology = load_topology(args.state)
    if args.command == "status":
        documents = collect(topology)
        print(json.dumps(documents, indent=2) if args.json else render(documents, topology))
        return 0
    if args.command == "wait-synced":
        return wait_synced(lambda: collect(topology), args.timeout, topology)
    return 2


if __name__ == "__main__":
    sys.exit(main())
