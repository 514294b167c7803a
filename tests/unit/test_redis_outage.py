"""ride_out (workers/redis_outage.py): a write is tried again while Redis cannot take it, and only then."""

from __future__ import annotations

import pytest
import redis

from workers.redis_outage import cut_off, ride_out


class Clock:
    def __init__(self):
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def failing(times: int, error: Exception):
    calls = {"n": 0}

    def action():
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return "written"

    return action, calls


@pytest.mark.parametrize(
    "error",
    [
        redis.ConnectionError("Connection refused"),
        redis.TimeoutError("Timeout reading from socket"),
        # A primary cut off from its replicas, with min-replicas-to-write (a Sentinel deployment): the write is
        # refused rather than lost at the failover; found by tests/cluster's "Redis primary partitioned".
        redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
        redis.ResponseError("Error running script (call to f_1): @user_script:12: NOREPLICAS Not enough good replicas"),
    ],
)
def test_a_write_redis_cannot_take_now_is_tried_again_until_it_is_taken(error):
    clock = Clock()
    action, calls = failing(3, error)
    assert cut_off(error)
    assert ride_out(action, bound_s=30, what="t", sleep=clock.sleep, clock=clock) == "written" and calls["n"] == 4


def test_any_other_error_is_raised_at_once_and_a_long_outage_after_the_bound():
    clock = Clock()
    action, calls = failing(1, redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    with pytest.raises(redis.ResponseError):
        ride_out(action, bound_s=30, what="t", sleep=clock.sleep, clock=clock)
    assert calls["n"] == 1
    action, calls = failing(1000, redis.ResponseError("NOREPLICAS Not enough good replicas to write."))
    with pytest.raises(redis.ResponseError):
        ride_out(action, bound_s=10, what="t", sleep=clock.sleep, clock=clock)
    assert 5 < calls["n"] < 20 and clock.now <= 10
