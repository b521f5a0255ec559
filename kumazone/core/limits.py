"""What one zone may ask of the global, and why it is refused: pure, no Twisted.

Everything a zone sends is checked with the rules resources are checked with
(L{kumazone.core.resources}) and against the zone's L{ZoneLimits} before any of
it is kept, so that no zone can cost the others (or the store) anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kumazone.core.resources import ResourceError, check_mesh_name, check_service_name

__all__ = ["REFUSAL_REASONS", "ZoneLimits", "ZoneRefused", "check_service_keys"]

#: Every reason a zone's message is refused for: the metric's bounded label values.
REFUSAL_REASONS = (
    "bad-service",
    "too-many-services",
    "too-many-parts",
    "bad-part",
    "bad-ack",
    "rate",
    "slow-reader",
    "store",
)


@dataclass(frozen=True)
class ZoneLimits:
    """Per-zone limits of the global (flags C{--kds-zone-max-*}).

    @ivar max_services: services in one zone's inventory.
    @ivar max_parts: parts in one inventory (a full one or a change).
    @ivar max_messages_per_second: messages a zone may send per second (acks,
        which answer the global's own pushes, are checked apart), with a burst
        of twice as many.
    @ivar max_pending_octets: octets the global may have queued for a zone that
        does not read; past them, or paused longer than the silence timeout, the
        zone is dropped.
    """

    max_services: int = 10_000
    max_parts: int = 64
    max_messages_per_second: float = 100.0
    max_pending_octets: int = 32 << 20

    def __post_init__(self) -> None:
        for name in ("max_services", "max_parts", "max_messages_per_second", "max_pending_octets"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, is {getattr(self, name)!r}")


class ZoneRefused(ValueError):
    """A zone's message that the global refuses, whole; nothing of it is kept.

    @ivar reason: one of L{REFUSAL_REASONS}, for metrics.
    """

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REFUSAL_REASONS, reason
        super().__init__(message)
        self.reason = reason


def check_service_keys(keys: Iterable[tuple[str, str]], field: str) -> None:
    """Raise L{ZoneRefused} for the first C{(mesh, service)} a resource could not name."""
    for index, (mesh, service) in enumerate(keys):
        try:
            check_mesh_name(mesh, f"{field}[{index}].mesh")
            check_service_name(service, f"{field}[{index}].service")
        except ResourceError as e:
            raise ZoneRefused("bad-service", str(e)) from None
