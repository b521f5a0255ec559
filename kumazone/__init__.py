"""kumazone: a multi-zone DNS control plane for service meshes."""

__version__ = "0.1.0"
