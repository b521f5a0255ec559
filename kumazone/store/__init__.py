"""Stores: SQLite, PostgreSQL, and the replicas that share one (L{kumazone.core.storage.Store})."""

from kumazone.core.storage import StoreError

__all__ = ["require_postgresql"]


def require_postgresql() -> None:
    """Raise L{StoreError} saying how to install psycopg, if it is missing (SQLite alone
    needs none of it, so it is an extra: C{kumazone[postgresql]})."""
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        raise StoreError(
            f"a postgresql:// store needs psycopg ({e}): pip install 'kumazone[postgresql]'"
        ) from None
