"""Inside a Docker lab container: wait until the zones are synced, or print the status.

    labwait.py [--timeout S]     until both zones hold the global's table (exit 1 if not)
    labwait.py --status          global, zone-1 and zone-2 side by side

The lab's APIs listen on the lab network's addresses (lab/docker-compose.yml), which
only its containers reach; so this runs in one (``compose exec -T zone-1 ...``),
beside labctl.py, whose reading and rendering it shares with the namespace lab.
Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import labctl

#: The lab network's addresses (lab/docker-compose.yml).
ADDRESSES = {"global": "198.51.100.201", "zone-1": "198.51.100.211", "zone-2": "198.51.100.212"}
TOPOLOGY: dict[str, Any] = {
    "hosts": {
        name: {
            "api": f"http://{address}:5681",
            **({} if name == "global" else {"dns": f"{address}:5653"}),
        }
        for name, address in ADDRESSES.items()
    }
}


def collect() -> dict[str, dict[str, Any]]:
    """Each control plane's documents (C{/}, C{/vips}, the global's C{/zones})."""
    return {
        name: labctl.fetch("global" if name == "global" else "zone", host["api"])
        for name, host in TOPOLOGY["hosts"].items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labwait.py", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--status", action="store_true", help="print the status and exit")
    args = parser.parse_args(argv)
    if args.status:
        print(labctl.render(collect(), TOPOLOGY))
        return 0
    return labctl.wait_synced(collect, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
