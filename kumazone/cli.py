"""The C{kumazone} command (also C{python -m kumazone}).

kumazone run [twistd plugin options]   run a control plane in the foreground
kumazone check PATH...                 validate resource files or directories
kumazone version
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from kumazone import __version__
from kumazone.core.resources import Resource, ResourceError, parse_documents
from kumazone.resource_dir import RESOURCE_SUFFIXES

__all__ = ["main"]


def _files(paths: Sequence[str]) -> list[str]:
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for directory, subdirectories, names in os.walk(path):
                subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
                found += [
                    os.path.join(directory, n)
                    for n in sorted(names)
                    if n.endswith(RESOURCE_SUFFIXES) and not n.startswith(".")
                ]
        else:
            found.append(path)
    return found


def check(paths: Sequence[str]) -> int:
    """Print every resource error in C{paths}; 0 if there is none."""
    errors = 0
    resources = 0
    for path in _files(paths):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"{path}: cannot be read: {e}", file=sys.stderr)
            errors += 1
            continue
        for index, result in enumerate(parse_documents(text, json_only=path.endswith(".json"))):
            if isinstance(result, ResourceError):
                print(f"{path}: document {index + 1}: {result}", file=sys.stderr)
                errors += 1
            elif isinstance(result, Resource):
                resources += 1
    print(f"{resources} valid resource(s), {errors} error(s)")
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["run"]:
        # Everything after "run" belongs to the plugin, flags included.
        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or "twistd"
        os.execv(twistd, [twistd, "-n", "--pidfile=", "kumazone", *arguments[1:]])
    parser = argparse.ArgumentParser(prog="kumazone", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a control plane (twistd -n kumazone ...)")
    run.add_argument("options", nargs=argparse.REMAINDER, help="kumazone plugin options")
    checker = commands.add_parser("check", help="validate resource files or directories")
    checker.add_argument("paths", nargs="+")
    certs = commands.add_parser("certs", help="make a CA and certificates for zone sync")
    certs.add_argument("--out", required=True, help="directory for the PEM files")
    certs.add_argument(
        "--global-host",
        action="append",
        default=[],
        help="a name or IP the global is reached by (repeatable)",
    )
    certs.add_argument(
        "--zone",
        action="append",
        default=[],
        help="a zone to make a client certificate for (repeatable)",
    )
    commands.add_parser("version", help="print the version")
    args = parser.parse_args(arguments)
    if args.command == "version":
        print(f"kumazone {__version__}")
        return 0
    if args.command == "check":
        return check(args.paths)
    if args.command == "certs":
        from kumazone.sync.certs import CertError, make_certs

        try:
            for line in make_certs(Path(args.out), args.global_host, args.zone):
                print(line)
        except (CertError, OSError) as e:
            print(f"kumazone certs: {e}", file=sys.stderr)
            return 1
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
