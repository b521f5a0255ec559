"""The DNS server: the authority, the server factory and protocols, wire checks, hot path."""
