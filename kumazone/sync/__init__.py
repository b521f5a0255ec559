"""Zone <-> global sync: framing and heartbeats, each side's logic, TLS, certificates."""
