"""Tests for kumazone.core.ratelimit: bounded logging of attacker-driven events."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from kumazone.core.ratelimit import RateLimiter, limited


def test_burst_then_suppressed_within_the_interval() -> None:
    limiter = RateLimiter(burst=3, interval=10.0)
    assert [limiter.allow(now) for now in (0.0, 0.5, 1.0)] == [True, True, True]
    assert [limiter.allow(now) for now in (2.0, 5.0, 9.999)] == [False, False, False]
    assert limiter.suppressed == 3


def test_window_ends_after_interval_from_its_first_event() -> None:
    limiter = RateLimiter(burst=2, interval=10.0)
    assert limiter.allow(100.0)
    assert limiter.allow(105.0)
    assert not limiter.allow(109.99)
    # The window opened at 100.0, so at 110.0 a new one opens.
    assert limiter.allow(110.0)
    assert limiter.allow(110.0)
    assert not limiter.allow(110.0)
    assert limiter.suppressed == 2


def test_take_suppressed_returns_and_resets() -> None:
    limiter = RateLimiter(burst=1, interval=60.0)
    limiter.allow(0.0)
    for now in range(1, 6):
        assert not limiter.allow(float(now))
    assert limiter.take_suppressed() == 5
    assert limiter.take_suppressed() == 0
    assert limiter.suppressed == 0
    assert not limiter.allow(7.0)
    assert limiter.take_suppressed() == 1


def test_suppressed_count_spans_windows_until_taken() -> None:
    limiter = RateLimiter(burst=1, interval=1.0)
    limiter.allow(0.0)
    limiter.allow(0.1)
    limiter.allow(1.0)
    limiter.allow(1.5)
    assert limiter.take_suppressed() == 2


def test_first_event_is_always_allowed() -> None:
    assert RateLimiter(burst=1, interval=60.0).allow(-1e12)
    assert RateLimiter(burst=1, interval=60.0).allow(0.0)


def test_defaults() -> None:
    limiter = RateLimiter()
    assert (limiter.burst, limiter.interval) == (10, 60.0)
    assert [limiter.allow(1.0) for _ in range(11)] == [True] * 10 + [False]
    assert limiter.allow(61.0)


def test_burst_zero_suppresses_everything() -> None:
    limiter = RateLimiter(burst=0, interval=1.0)
    assert not limiter.allow(0.0)
    assert not limiter.allow(5.0)
    assert limiter.take_suppressed() == 2


def test_limited_emits_at_most_the_rate_and_reports_suppressed() -> None:
    lines: list[str] = []
    clock = Clock()
    log = limited(RateLimiter(burst=2, interval=10.0), clock, lines.append)
    for i in range(5):
        log(f"bad packet {i}")
    assert lines == ["bad packet 0", "bad packet 1"]
    clock.advance(10.0)
    log("bad packet 5")
    log("bad packet 6")
    log("bad packet 7")
    assert lines == [
        "bad packet 0",
        "bad packet 1",
        "bad packet 5 (3 similar lines suppressed)",
        "bad packet 6",
    ]


@given(
    st.integers(min_value=1, max_value=5),
    st.floats(min_value=0.5, max_value=100.0),
    st.lists(st.floats(min_value=0.0, max_value=50.0), max_size=60),
)
def test_never_more_than_burst_per_window(burst: int, interval: float, gaps: list[float]) -> None:
    limiter = RateLimiter(burst=burst, interval=interval)
    now = 0.0
    allowed: list[float] = []
    events = 0
    window_start: float | None = None
    in_window = 0
    for gap in gaps:
        now += gap
        events += 1
        # Fixed windows, each opened by the first event at least `interval` after
        # the previous window opened.
        if window_start is None or now - window_start >= interval:
            window_start, in_window = now, 0
        in_window += 1
        assert limiter.allow(now) == (in_window <= burst)
        if in_window <= burst:
            allowed.append(now)
    assert len(allowed) + limiter.take_suppressed() == events
    # Any span shorter than one interval meets at most two windows.
    for i in range(len(allowed) - 2 * burst):
        assert allowed[i + 2 * burst] - allowed[i] >= interval
