import pytest

from aibridgeproxyd.keypool import KeyPool, parse_retry_after

KEYS = ("k1", "k2", "k3")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_tried_in_order_skipping_cooling_and_tried_ones() -> None:
    clock = Clock()
    pool = KeyPool(clock)
    assert pool.select("p", KEYS) == 0
    pool.cool_down("p", "k1", 429, 10)
    assert pool.select("p", KEYS) == 1
    assert pool.select("p", KEYS, frozenset({1})) == 2
    clock.now += 11
    assert pool.select("p", KEYS) == 0


def test_cooldowns_are_per_provider_and_per_key_value() -> None:
    pool = KeyPool(Clock())
    pool.cool_down("p", "k1", 401, None)
    assert pool.select("other", KEYS) == 0
    # A provider whose key list changed starts fresh for the new key.
    assert pool.select("p", ("k-new", "k1")) == 0


def test_rate_limit_cooldown_is_bounded() -> None:
    clock = Clock()
    pool = KeyPool(clock)
    pool.cool_down("p", "k1", 429, 100000)
    clock.now += 301
    assert pool.select("p", KEYS) == 0
    pool.cool_down("p", "k1", 429, 0)
    assert pool.select("p", KEYS) == 1  # at least a second


def test_exhausted_is_429_with_retry_after_if_any_key_was_rate_limited() -> None:
    clock = Clock()
    pool = KeyPool(clock)
    pool.cool_down("p", "k1", 401, None)
    pool.cool_down("p", "k2", 429, 12)
    pool.cool_down("p", "k3", 429, 40)
    exhausted = pool.exhausted("p", KEYS)
    assert (exhausted.status, exhausted.retry_after) == (429, 12)


def test_exhausted_is_502_when_every_key_was_rejected() -> None:
    pool = KeyPool(Clock())
    for key in KEYS:
        pool.cool_down("p", key, 401, None)
    assert pool.exhausted("p", KEYS).status == 502


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        (" 7 ", 7.0),
        (None, None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_http_date_in_the_future() -> None:
    assert parse_retry_after("Thu, 01 Jan 2099 00:00:00 GMT", now=4070908790.0) == pytest.approx(
        10.0
    )
