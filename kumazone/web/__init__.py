"""HTTP: the API (resources, /vips, /zones) and diagnostics (/ready, /healthy, /metrics)."""
