"""The edge of C{kumazone install dns}: the current ConfigMap, from a file or kubectl."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

from kumazone.install.cluster_dns import InstallError

__all__ = ["read_configmap"]

#: How long kubectl may take to answer.
KUBECTL_TIMEOUT = 30.0


def read_configmap(
    name: str,
    path: str | None,
    which: Callable[[str], str | None] = shutil.which,
) -> tuple[str, str]:
    """(text, source name) of ConfigMap C{name}: from C{path}, else kubectl.

    Raises L{InstallError} (one line) when neither gives it.
    """
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read(), path
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise InstallError(f"--from: {path!r} cannot be read ({reason})") from None
    kubectl = which("kubectl")
    if kubectl is None:
        raise InstallError(
            f"kubectl is not on PATH: give the current ConfigMap with --from FILE "
            f"(kubectl -n kube-system get configmap {name} -o yaml > FILE)"
        )
    command = [kubectl, "-n", "kube-system", "get", "configmap", name, "-o", "yaml"]
    source = f"kubectl -n kube-system get configmap {name}"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstallError(f"{source}: {e}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise InstallError(f"{source}: {why}")
    return done.stdout, source
