"""twistd drop-in for kumazone: `twistd -n kumazone --role=zone --zone=zone-1`."""

from twisted.application.service import ServiceMaker

# The module is named as a string so that `twistd --help` imports nothing heavy.
kumazone = ServiceMaker(
    "kumazone",
    "kumazone.tap",
    "Multi-zone DNS control plane for service meshes (.mesh names, stable VIPs).",
    "kumazone",
)
