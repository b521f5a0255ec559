"""What one zone may ask of the global, and why it is refused: pure, no Twisted.

Everything a zone sends is checked with the rules resources are checked with
(L{kumazone.core.resources}) and against the zone's L{ZoneLimits} before any of
it is kept, so that no zone can cost the others (or the store) anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kumazone.core.resources import ResourceError, check_mesh_name, check_service_name

__all__ = ["REFUSAL_REASONS", "Cooldowns", "ZoneLimits", "ZoneRefused", "check_service_keys"]

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
    "cooling-down",
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
    @ivar max_range_share: the fraction of the VIP range one zone's services may
        take, so that no zone can leave the others without VIPs (with the
        default range it is far above C{max_services}; with a small one it binds);
        1: none kept for others (a zone may ask for more than the range holds, and
        what does not fit waits, exhausted, as for a standalone zone).
    @ivar refusal_cooldown: seconds a zone refused after its hello (a bad
        inventory, a limit, a flood) must wait before the global hears it again,
        doubling with each refusal in a row up to L{Cooldowns.LONGEST}; 0: none.
    """

    max_services: int = 10_000
    max_parts: int = 64
    max_messages_per_second: float = 100.0
    max_pending_octets: int = 32 << 20
    refusal_cooldown: float = 5.0
    max_range_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_services", "max_parts", "max_messages_per_second", "max_pending_octets"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, is {getattr(self, name)!r}")
        if not 0 < self.max_range_share <= 1:
            raise ValueError(f"max_range_share must be in (0, 1], is {self.max_range_share!r}")
        if not 0 <= self.refusal_cooldown <= Cooldowns.LONGEST:
            raise ValueError(
                f"refusal_cooldown must be in [0, {Cooldowns.LONGEST:g}], "
                f"is {self.refusal_cooldown!r}"
            )


class Cooldowns:
    """How long each refused zone must wait before it is heard again; C{now} passed in.

    A refusal after hello costs the global a TLS handshake, a welcome and a push
    of the table; a zone that reconnects at once to be refused again would cost
    them again and again.  The first refusal imposes C{first} seconds, each one
    after it twice the last, up to L{LONGEST}; an inventory accepted forgives.
    At most C{kept} zones are remembered (the oldest waits are dropped first);
    only zones whose certificate named them get here, so they are few.
    """

    LONGEST = 300.0

    def __init__(self, first: float, kept: int = 10_000) -> None:
        self.first = first
        self.kept = kept
        #: zone -> (until, the wait imposed last)
        self._waits: dict[str, tuple[float, float]] = {}

    def refused(self, zone: str, now: float) -> float:
        """Zone C{zone} was refused at C{now}: the seconds it must now wait (0: no cool-down)."""
        if self.first <= 0:
            return 0.0
        previous = self._waits.pop(zone, None)
        wait = self.first if previous is None else min(self.LONGEST, 2 * previous[1])
        if len(self._waits) >= self.kept:
            # Dicts keep insertion order, and each refusal re-inserts: the first is the oldest.
            del self._waits[next(iter(self._waits))]
        self._waits[zone] = (now + wait, wait)
        return wait

    def remaining(self, zone: str, now: float) -> float:
        """The seconds zone C{zone} must still wait before it is heard (0: none)."""
        found = self._waits.get(zone)
        return 0.0 if found is None else max(0.0, found[0] - now)

    def forgive(self, zone: str) -> None:
        """Zone C{zone}'s inventory was accepted: its next refusal starts afresh."""
        self._waits.pop(zone, None)


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
