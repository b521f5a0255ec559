"""Log lines whose rate an attacker controls, at a bounded rate. Pure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "RateLimiter", "TokenBucket", "limited"]


class RateLimiter:
    """Allows at most C{burst} events per C{interval} seconds; counts the rest.

    C{allow(now)} says whether this event may be logged; C{take_suppressed()}
    returns (and resets) how many were held back, for a summary line.
    """

    def __init__(self, burst: int = 10, interval: float = 60.0) -> None:
        self.burst = burst
        self.interval = interval
        self._window_start = float("-inf")
        self._count = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        """Whether an event at C{now} may be logged."""
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count <= self.burst:
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """How many events were held back since the last call."""
        count, self.suppressed = self.suppressed, 0
        return count


class TokenBucket:
    """At most C{rate} events per second on average, C{burst} at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        """Whether an event at C{now} is within the rate (and count it if so)."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Clock(Protocol):
    """A time source: Twisted's reactor and C{twisted.internet.task.Clock} are ones."""

    def seconds(self) -> float:
        """The current time in seconds."""


def limited(
    limiter: RateLimiter, clock: Clock, emit: Callable[[str], None]
) -> Callable[[str], None]:
    """Wrap C{emit} so that it passes at most C{limiter}'s rate of lines."""

    def log(line: str) -> None:
        if limiter.allow(clock.seconds()):
            held = limiter.take_suppressed()
            emit(line if not held else f"{line} ({held} similar lines suppressed)")

    return log
