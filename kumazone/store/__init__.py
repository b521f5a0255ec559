"""Stores: the SQLite store and its schema files (L{kumazone.core.storage.Store})."""
