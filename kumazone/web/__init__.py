"""HTTP: the API (resources, /vips, /zones), the status page and C{kumazone status}, and
diagnostics (/ready, /healthy, /metrics)."""
