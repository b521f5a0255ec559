"""Store URLs: what kumazone takes, and how it names one in a log line. Pure.

Apart from L{kumazone.store.postgres} so that the options can check a URL
without psycopg (an extra: a store of SQLite needs none of it).
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["check_url", "describe_url"]


def check_url(url: str) -> str:
    """C{url} if it is a store URL kumazone takes, else ValueError saying why.

    C{postgresql://USER@HOST[:PORT]/DB} (C{postgres://} too); no password in it.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {describe_url(url)}")
    if parts.password is not None:
        raise ValueError(
            "the store URL must not hold a password (it would show in ps and logs): "
            "give it in PGPASSWORD or ~/.pgpass"
        )
    if not parts.hostname or not parts.path.strip("/"):
        raise ValueError(f"a store URL names a host and a database: {describe_url(url)}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError(f"bad port in store URL {describe_url(url)}") from None
    return url


def describe_url(url: str) -> str:
    """C{url} fit for a log line: C{postgresql://USER@HOST:PORT/DB}, a password never."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
    except ValueError:
        return "postgresql://(unreadable URL)"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"
