from __future__ import annotations

import socket
import time
import typing as t

import pytest
import redis

from flask_ploints import StoreError
from flask_ploints._ordering import TurnStatus
from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import RedisStore
from flask_ploints.stores import store_from_config
from flask_ploints.testing import FakeClock
from flask_ploints.testing import InspectableStoreContract


def _forget(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=500))
    if keys:
        client.delete(*keys)


@pytest.fixture
def prefix(unique: str) -> str:
    return f"{unique}:"


@pytest.fixture
def client(redis_url: str, prefix: str) -> t.Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    _forget(client, prefix)
    client.close()


@pytest.fixture
def store(redis_url: str, prefix: str, client: redis.Redis) -> t.Iterator[RedisStore]:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    yield store
    store.client.close()


# Takes ARGV[1] ms off the TTL of each key, and deletes a key with no time
# left, as Redis would have once that time passed; keys without a TTL stay.
_SHIFT_TTLS = """
local ms = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
    local left = redis.call('PTTL', key)
    if left > ms then
        redis.call('PEXPIRE', key, left - ms)
    elseif left >= 0 then
        redis.call('DEL', key)
    end
end
return #KEYS
"""


class TestRedisStore(InspectableStoreContract):
    @pytest.fixture
    def store(
        self, redis_url: str, prefix: str, client: redis.Redis, clock: FakeClock
    ) -> t.Iterator[RedisStore]:
        self._client = client
        self._prefix = prefix
        store = RedisStore.from_url(redis_url, prefix=prefix, clock=clock)
        yield store
        store.client.close()

    def advance(self, seconds: float) -> None:
        """Move the store's clock, and bring the expiry of every key of the
        test that much closer in Redis, which then expires them itself.
        """
        super().advance(seconds)
        keys = list(self._client.scan_iter(match=self._prefix + "*", count=500))
        if keys:
            self._client.eval(_SHIFT_TTLS, len(keys), *keys, round(seconds * 1000))


class _Counted:
    """What a counting connection sent: one entry per write to the socket,
    each a list of the command names it carried.
    """

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.names: list[str] = []

    def clear(self) -> None:
        self.writes.clear()
        self.names.clear()


def _counting_store(redis_url: str, prefix: str) -> tuple[RedisStore, _Counted]:
    counted = _Counted()

    class CountingConnection(redis.Connection):
        # A real connection to the real server that notes what it sends.
        def send_command(self, *args: t.Any, **kwargs: t.Any) -> None:
            counted.names.append(str(args[0]).upper())
            super().send_command(*args, **kwargs)

        def send_packed_command(self, command: t.Any, check_health: bool = True) -> None:
            counted.writes.append(counted.names[:])
            counted.names.clear()
            super().send_packed_command(command, check_health)

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return RedisStore(client, prefix=prefix), counted


def test_a_new_event_takes_two_round_trips_and_a_duplicate_one(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    store, counted = _counting_store(redis_url, prefix)
    try:
        # Connect and load the scripts first: those trips happen once per
        # process, not per event.
        warm = store.claim("evt_warm", 60)
        store.commit("evt_warm", warm.token, 60)
        counted.clear()

        claim = store.claim("evt_1", 60, b'{"id": "evt_1"}')
        assert claim.status is ClaimStatus.CLAIMED
        assert store.commit("evt_1", claim.token, 60) is True
        assert counted.writes == [["SET"], ["EVALSHA"]]

        counted.clear()
        assert store.claim("evt_1", 60).status is ClaimStatus.DONE
        assert counted.writes == [["SET"]]

        in_flight = store.claim("evt_2", 60)
        counted.clear()
        duplicate = store.claim("evt_2", 60)
        assert duplicate.status is ClaimStatus.IN_FLIGHT
        assert 59 < duplicate.retry_after <= 60
        assert counted.writes == [["SET"]]

        counted.clear()
        assert store.extend("evt_2", in_flight.token, 60) is True
        assert store.fail("evt_2", in_flight.token, "boom", 60) is True
        assert counted.writes == [["EVALSHA"], ["EVALSHA"]]

        # Only an id that failed before takes a second trip, to take it over.
        counted.clear()
        assert store.claim("evt_2", 60).status is ClaimStatus.CLAIMED
        assert counted.writes == [["SET"], ["EVALSHA"]]
    finally:
        store.client.close()


def test_scripts_the_server_lost_are_loaded_again(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    # SCRIPT FLUSH empties the shared server's cache: the other tests'
    # clients load their scripts again too, and none but this module's
    # count commands.
    store, counted = _counting_store(redis_url, prefix)
    try:
        first = store.claim("evt_1", 60)
        client.script_flush()
        counted.clear()
        assert store.commit("evt_1", first.token, 60) is True
        assert counted.writes == [["EVALSHA"], ["SCRIPT LOAD"], ["EVALSHA"]]
        # Each script is loaded when it is first found missing.
        client.script_flush()
        counted.clear()
        claim, turns = store.claim_with_turns("evt_2", 60, None, ["tier"], 1000)
        assert (claim.status, [turn.status for turn in turns]) == (
            ClaimStatus.CLAIMED,
            [TurnStatus.RUN],
        )
        assert store.commit("evt_2", claim.token, 60) is True
        assert counted.writes == [
            ["EVALSHA"],
            ["SCRIPT LOAD"],
            ["EVALSHA"],
            ["EVALSHA"],
            ["SCRIPT LOAD"],
            ["EVALSHA"],
        ]
    finally:
        store.client.close()


def test_keys_live_as_long_as_the_lease_or_the_retention(
    store: RedisStore, client: redis.Redis, prefix: str
) -> None:
    key = f"{prefix}evt_1"
    claim = store.claim("evt_1", 30)
    assert 29_000 < client.pttl(key) <= 30_000
    store.extend("evt_1", claim.token, 45)
    assert 44_000 < client.pttl(key) <= 45_000
    store.commit("evt_1", claim.token, 3600)
    assert 3_599_000 < client.pttl(key) <= 3_600_000

    claim = store.claim("evt_2", 30)
    store.fail("evt_2", claim.token, "Traceback: boom", 120)
    assert 119_000 < client.pttl(f"{prefix}evt_2") <= 120_000
    failed = store.get("evt_2")
    assert failed is not None
    assert (failed.status, failed.error) == ("failed", "Traceback: boom")

    claim = store.claim("evt_3", 30)
    store.release("evt_3", claim.token)
    assert client.exists(f"{prefix}evt_3") == 0


def test_the_prefix_makes_the_key(
    store: RedisStore, client: redis.Redis, prefix: str, redis_url: str
) -> None:
    assert store.key("evt_1") == f"{prefix}evt_1"
    claim = store.claim("evt_1", 60)
    store.commit("evt_1", claim.token, 60)
    assert [key.decode() for key in client.scan_iter(match=prefix + "*")] == [f"{prefix}evt_1"]
    other = RedisStore(client, prefix=f"{prefix}other:")
    assert other.claim("evt_1", 60).status is ClaimStatus.CLAIMED


def test_payload_is_kept_while_in_flight_and_once_failed(
    store: RedisStore, client: redis.Redis, prefix: str
) -> None:
    claim = store.claim("evt_1", 60, b'{"id": "evt_1"}')
    stored = store.get("evt_1")
    assert stored is not None
    assert stored.payload == b'{"id": "evt_1"}'
    store.fail("evt_1", claim.token, "boom", 60)
    failed = store.get("evt_1")
    assert failed is not None
    assert failed.payload == b'{"id": "evt_1"}'

    claim = store.claim("evt_2", 60, b'{"id": "evt_2"}')
    store.commit("evt_2", claim.token, 60)
    done = store.get("evt_2")
    assert done is not None
    assert done.payload is None

    lean = RedisStore(client, prefix=prefix, keep_payloads=False)
    lean.claim("evt_3", 60, b'{"id": "evt_3"}')
    in_flight = lean.get("evt_3")
    assert in_flight is not None
    assert in_flight.payload is None


def test_failed_reads_only_its_own_prefix(store: RedisStore, client: redis.Redis) -> None:
    # Glob characters in a prefix match themselves only.
    starry = RedisStore(client, prefix=f"{store.prefix}*")
    claim = store.claim("evt_1", 60)
    store.fail("evt_1", claim.token, "boom", 60)
    assert starry.failed() == []
    assert [event.id for event in store.failed()] == ["evt_1"]


def test_redis_errors_become_store_errors(
    store: RedisStore, client: redis.Redis, prefix: str
) -> None:
    client.hset(f"{prefix}evt_1", "not", "a string")
    with pytest.raises(StoreError, match="WRONGTYPE") as caught:
        store.claim("evt_1", 60)
    assert isinstance(caught.value.__cause__, redis.ResponseError)


def test_an_unreachable_redis_fails_fast() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0")
    started = time.monotonic()
    try:
        with pytest.raises(StoreError) as caught:
            store.claim("evt_1", 60)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
        with pytest.raises(StoreError):
            store.get("evt_1")
    finally:
        store.client.close()
    assert time.monotonic() - started < 3


def test_a_redis_that_does_not_answer_times_out() -> None:
    # A socket that accepts connections and never answers, like a hung server.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        started = time.monotonic()
        try:
            with pytest.raises(StoreError, match="Timeout"):
                store.claim("evt_1", 60)
        finally:
            store.client.close()
        # Timeouts are not retried.
        assert time.monotonic() - started < 0.6


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6380/1", "unix:///run/redis/redis.sock"],
)
def test_store_from_config_builds_a_redis_store(url: str) -> None:
    store = store_from_config(url, {"PLOINTS_REDIS_PREFIX": "myapp:"})
    assert isinstance(store, RedisStore)
    try:
        assert store.prefix == "myapp:"
        kwargs = store.client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 2.0
        assert kwargs["socket_connect_timeout"] == 2.0
        # The options suit the connection class the URL picks.
        store.client.connection_pool.connection_class(**kwargs).disconnect()
    finally:
        store.client.close()
    default = store_from_config(url, {})
    assert isinstance(default, RedisStore)
    assert default.prefix == "ploints:"
    default.client.close()


def test_errors_and_payloads_survive_the_encoding(store: RedisStore) -> None:
    # The value is a header, then the error's byte length, the error and the
    # payload: separators and multi-byte characters inside them must not
    # shift anything.
    payload = b'{"id": "evt_1", "data": {"note": "a:b\\nc \xc3\xa9\\u00e9"}}\n:12:'
    error = "Traceback:\n  ValueError: 12:34 caf\u00e9 \u2603\n"
    first = store.claim("evt_1", 60, payload)
    assert store.fail("evt_1", first.token, error, 60) is True
    failed = store.get("evt_1")
    assert failed is not None
    assert (failed.status, failed.error, failed.payload, failed.attempts) == (
        "failed",
        error,
        payload,
        1,
    )

    # Taken over without a payload: the last one and the error are kept.
    second = store.claim("evt_1", 60)
    assert second.status is ClaimStatus.CLAIMED
    again = store.get("evt_1")
    assert again is not None
    assert (again.status, again.error, again.payload, again.attempts) == (
        "in_flight",
        error,
        payload,
        2,
    )
    assert store.extend("evt_1", second.token, 60) is True
    assert store.commit("evt_1", second.token, 60) is True
    done = store.get("evt_1")
    assert done is not None
    assert (done.status, done.error, done.payload, done.attempts) == ("done", error, None, 2)


def test_a_payload_that_looks_like_an_empty_tail_is_still_dropped(store: RedisStore) -> None:
    # A commit rewrites the value unless it ends right after its header:
    # a payload ending in the same bytes must not pass for that.
    claim = store.claim("evt_1", 60, b'{"id": "evt_1"}\n0:')
    assert store.commit("evt_1", claim.token, 60) is True
    done = store.get("evt_1")
    assert done is not None
    assert (done.status, done.payload) == ("done", None)


def test_the_times_written_come_from_the_clock(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    clock = FakeClock(1_700_000_000.0)
    store = RedisStore.from_url(redis_url, prefix=prefix, clock=clock)
    try:
        claim = store.claim("evt_1", 60, b'{"id": "evt_1"}')
        stored = store.get("evt_1")
        assert stored is not None
        assert stored.updated_at == 1_700_000_000.0

        clock.advance(15)
        in_flight = store.claim("evt_1", 60)
        assert (in_flight.status, in_flight.retry_after) == (ClaimStatus.IN_FLIGHT, 45.0)
        assert store.fail("evt_1", claim.token, "boom", 120) is True
        failed = store.get("evt_1")
        assert failed is not None
        assert (failed.status, failed.updated_at) == ("failed", 1_700_000_015.0)
        # The TTL is Redis's own: the clock does not move it.
        assert 119_000 < client.pttl(f"{prefix}evt_1") <= 120_000
    finally:
        store.client.close()
