from __future__ import annotations

import pytest

from addons.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_burst_up_to_the_limit_then_wait(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    assert all(limiter.check("k", 3) is None for _ in range(3))
    delay = limiter.check("k", 3)
    assert delay == pytest.approx(20.0)  # 3/min: one request back every 20 s
    clock.now += 19.9
    assert limiter.check("k", 3) == pytest.approx(0.1)
    clock.now += 0.1
    assert limiter.check("k", 3) is None
    assert limiter.check("k", 3) == pytest.approx(20.0)


def test_refused_requests_do_not_consume(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(60):
        limiter.check("k", 60)
    for _ in range(100):
        assert limiter.check("k", 60) is not None
    clock.now += 1.0
    assert limiter.check("k", 60) is None


def test_sustained_rate_is_the_limit(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    allowed = 0
    for _ in range(10 * 60 * 10):  # ten minutes, ten attempts a second
        allowed += limiter.check("k", 30) is None
        clock.now += 0.1
    assert 30 * 10 <= allowed <= 30 * 10 + 30  # the rate, plus one initial burst


def test_keys_are_independent(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    assert limiter.check("a", 1) is None
    assert limiter.check("a", 1) is not None
    assert limiter.check("b", 1) is None


def test_lower_limit_applies_at_once(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    assert limiter.check("k", 100) is None
    assert limiter.check("k", 2) is None  # the bucket shrinks to the new burst of 2
    assert limiter.check("k", 2) is None
    assert limiter.check("k", 2) is not None


def test_idle_keys_are_dropped(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    for i in range(1000):
        limiter.check(f"k{i}", 5)
    assert len(limiter) == 1000
    clock.now += 30
    limiter.check("fresh", 5)
    assert len(limiter) == 1001  # not idle for a minute yet
    clock.now += 31
    limiter.check("fresh", 5)
    assert len(limiter) == 1  # only the key used within the last minute


def test_retry_after_header() -> None:
    assert RateLimiter.retry_after(0.01) == "1"
    assert RateLimiter.retry_after(20.0) == "20"
    assert RateLimiter.retry_after(20.2) == "21"
