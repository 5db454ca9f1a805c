"""A dedupe store in Redis, shared by every worker and host.

Needs the ``redis`` package: ``pip install 'flask-ploints[redis]'`` (which
also installs hiredis, picked up by redis-py automatically).
"""

from __future__ import annotations

import secrets
import time
import typing as t

from .._ordering import Turn
from .._ordering import TurnEnd
from .._ordering import TurnStatus
from ._base import Claim
from ._base import ClaimStatus
from ._base import EventState
from ._base import StoredEvent
from ._base import StoreError

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RedisStore needs the redis package; install it with: pip install 'flask-ploints[redis]'"
    ) from exc

__all__ = ["RedisStore"]

_DONE = Claim(ClaimStatus.DONE)
# A value starts with the first letter of its state; the Lua scripts below
# spell the same letters.
_STATES = {state.value[:1].encode(): state for state in EventState}
_DONE_LETTER = b"d"
_FAILED_LETTER = b"f"
# The take-over script answers "claimed" when it took the id.
_CLAIMED_LETTER = b"c"
assert _STATES[_DONE_LETTER] is EventState.DONE and _STATES[_FAILED_LETTER] is EventState.FAILED

# Each event is one string under ``prefix + event_id``:
#
#     <s><token>:<attempts>:<updated ms>:<expires ms>\n<error length>:<error><payload>
#
# ``s`` is ``i`` (in flight), ``d`` (done) or ``f`` (failed); the times are
# the writing client's clock, for inspection and Retry-After only. The key's
# own TTL is the lease or the retention: Redis forgets an expired entry by
# itself, and an existing in-flight key is a live lease. A done key keeps
# the error of an earlier failure but not the payload; one that never
# failed keeps the times of its claim.

# The settle scripts start by reading the key and checking that ARGV[1], the
# token, holds its live claim; they return 1 when they acted, 0 otherwise.
# ARGV[2] is the client's time in ms.
_OWNED = """
local key = KEYS[1]
local value = redis.call('GET', key)
local owner = 'i' .. ARGV[1] .. ':'
if not value or string.sub(value, 1, #owner) ~= owner then
    return 0
end
"""
# What the scripts that rewrite the value need of it: its attempts, error
# and payload.
_PARSED = """
local now = tonumber(ARGV[2])
local newline = string.find(value, '\\n', #owner, true)
local attempts = string.match(value, '^(%d+):', #owner + 1)
local length, start = string.match(value, '^(%d+):()', newline + 1)
local err = string.sub(value, start, start + tonumber(length) - 1)
local function write(status, ms, payload)
    redis.call('SET', key, status .. ARGV[1] .. ':' .. attempts .. ':' .. now .. ':' .. (now + ms)
        .. '\\n' .. #err .. ':' .. err .. payload, 'PX', ms)
end
local function payload()
    return string.sub(value, start + tonumber(length))
end
"""
# ARGV: token, now, retention ms. A value with neither error nor payload
# (the common case) only changes its status letter; its times stay those of
# the claim.
_COMMIT = (
    _OWNED
    + """
local retention = tonumber(ARGV[3])
if string.find(value, '\\n', #owner, true) == #value - 2 then
    redis.call('SETRANGE', key, 0, 'd')
    redis.call('PEXPIRE', key, retention)
    return 1
end
"""
    + _PARSED
    + """
write('d', retention, '')
return 1
"""
)
# ARGV: token, now.
_RELEASE = (
    _OWNED
    + """
redis.call('DEL', key)
return 1
"""
)
# ARGV: token, now, lease ms.
_EXTEND = (
    _OWNED
    + _PARSED
    + """
write('i', tonumber(ARGV[3]), payload())
return 1
"""
)
# ARGV: token, now, retention ms, error, attempts ('' keeps the count).
_FAIL = (
    _OWNED
    + _PARSED
    + """
err = ARGV[4]
if ARGV[5] ~= '' then
    attempts = ARGV[5]
end
write('f', tonumber(ARGV[3]), payload())
return 1
"""
)
# A claim that found a failed key takes it over, unless it changed since.
# ARGV: token, now, lease ms, the value of a fresh claim, payload ('' none).
# Returns {'claimed' | 'done' | 'in_flight', the holder's expiry in ms}.
_TAKE_OVER = """
local key = KEYS[1]
local lease = tonumber(ARGV[3])
local value = redis.call('GET', key)
if not value then
    redis.call('SET', key, ARGV[4], 'PX', lease)
    return {'claimed', 0}
end
local status, _, attempts, _, expires, length, tail =
    string.match(value, '^(%a)(%x*):(%d+):(%d+):(%d+)\\n(%d+):(.*)$')
if status == 'd' then
    return {'done', 0}
end
if status == 'i' then
    return {'in_flight', tonumber(expires)}
end
local now = tonumber(ARGV[2])
length = tonumber(length)
local payload = ARGV[5]
if payload == '' then
    payload = string.sub(tail, length + 1)
end
redis.call('SET', key, 'i' .. ARGV[1] .. ':' .. (tonumber(attempts) + 1) .. ':' .. now .. ':'
    .. (now + lease) .. '\\n' .. length .. ':' .. string.sub(tail, 1, length) .. payload,
    'PX', lease)
return {'claimed', 0}
"""

# latest_by: per key, one string holds the newest timestamp applied (ms),
# another the token of the turn in progress (its TTL the turn's lease).
# take_turn returns {'run' | 'stale' | 'busy', newest ms or the turn's ms
# left or ''}; end_turn, with stamp '' when nothing was applied, 1 when the
# token held the turn.
_TURNS = """
local function take_turn(newest_key, turn_key, stamp, token, lease)
    local left = redis.call('PTTL', turn_key)
    if left > 0 then
        return {'busy', left}
    end
    local newest = redis.call('GET', newest_key)
    if newest and tonumber(newest) > tonumber(stamp) then
        return {'stale', newest}
    end
    redis.call('SET', turn_key, token, 'PX', lease)
    return {'run', newest or ''}
end
local function end_turn(newest_key, turn_key, token, stamp, retention)
    if redis.call('GET', turn_key) ~= token then
        return 0
    end
    redis.call('DEL', turn_key)
    if stamp ~= '' then
        local newest = redis.call('GET', newest_key)
        if not newest or tonumber(newest) < tonumber(stamp) then
            newest = stamp
        end
        redis.call('SET', newest_key, newest, 'PX', retention)
    end
    return 1
end
"""
# KEYS: the newest's key, the turn's. ARGV: timestamp, token, lease ms.
_ORDER_BEGIN = _TURNS + "return take_turn(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"
# KEYS: as _ORDER_BEGIN. ARGV: token, timestamp or '', retention ms.
_ORDER_END = _TURNS + "return end_turn(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"
# A claim that takes the turns of the event's latest_by keys when it claims:
# _TAKE_OVER's claim, then take_turn for each pair of keys after the first.
# ARGV: those of _TAKE_OVER, the event's timestamp, the turns' token.
# Returns _TAKE_OVER's answer, then each turn's two fields.
_CLAIM_WITH_TURNS = (
    "local function claim()\n"
    + _TAKE_OVER
    + "end\n"
    + _TURNS
    + """
local answer = claim()
if answer[1] == 'claimed' then
    for i = 2, #KEYS, 2 do
        local turn = take_turn(KEYS[i], KEYS[i + 1], ARGV[6], ARGV[7], ARGV[3])
        answer[#answer + 1] = turn[1]
        answer[#answer + 1] = turn[2]
    end
end
return answer
"""
)
# _COMMIT, then end_turn for each pair of keys after the first. ARGV: those
# of _COMMIT, then each turn's token and timestamp or ''.
_COMMIT_WITH_TURNS = (
    "local function commit()\n"
    + _COMMIT
    + "end\n"
    + _TURNS
    + """
local committed = commit()
for i = 2, #KEYS, 2 do
    end_turn(KEYS[i], KEYS[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[3])
end
return committed
"""
)

# Enough of a value to hold its header, for listing failed events.
_HEADER_BYTES = 128
_SCAN_BATCH = 500


def _ms(seconds: float) -> int:
    # PX refuses 0; a non-positive time means "already over".
    return max(1, round(seconds * 1000))


def _glob_escape(text: str) -> str:
    for special in "\\*?[]":
        text = text.replace(special, "\\" + special)
    return text


class RedisStore:
    """Remembers event ids in Redis, one string key per id with its lease or
    retention as the key's TTL, so every worker process and host shares the
    same dedupe state. A new event costs two round trips (``SET NX PX GET``,
    then a token-checked commit script), a duplicate one. Every
    :class:`redis.RedisError` is raised as :class:`.StoreError`. Redis 7 or
    later, one server (no Cluster), and **no eviction** of these keys; see
    :doc:`/stores` for how it works and how to run it.

    It implements :class:`.InspectableStore`.

    :param client: the redis-py client; responses must not be decoded
        (``decode_responses=False``, the default).
    :param prefix: put before every event id to make its key.
    :param keep_payloads: keep the raw body of in-flight and failed events,
        for replay. Done events never keep it, to spare Redis memory.
    :param clock: returns the current time in seconds since the epoch, for
        the times the store writes into its values; default
        :func:`time.time`. The TTLs are kept by Redis and do not read it.
        Tests pass a :class:`~flask_ploints.testing.FakeClock`.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
        The ``clock`` parameter.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "ploints:",
        keep_payloads: bool = True,
        clock: t.Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.keep_payloads = keep_payloads
        self._clock = clock
        self._take_over = client.register_script(_TAKE_OVER)
        self._commit = client.register_script(_COMMIT)
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)
        self._fail = client.register_script(_FAIL)
        self._order_begin = client.register_script(_ORDER_BEGIN)
        self._order_end = client.register_script(_ORDER_END)
        self._claim_with_turns = client.register_script(_CLAIM_WITH_TURNS)
        self._commit_with_turns = client.register_script(_COMMIT_WITH_TURNS)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "ploints:",
        timeout: float = 2.0,
        keep_payloads: bool = True,
        clock: t.Callable[[], float] = time.time,
    ) -> RedisStore:
        """Build a store with its own client for ``url`` (``redis://``,
        ``rediss://`` or ``unix://``). No connection is made until the first
        call.

        :param url: where Redis is, as redis-py's ``Redis.from_url`` reads it.
        :param prefix: put before every event id to make its key.
        :param timeout: seconds to wait to connect, and for each answer.
        :param keep_payloads: see :class:`RedisStore`.
        :param clock: see :class:`RedisStore`.
        """
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            # One immediate retry mends a pooled connection that Redis closed
            # (a restart); timeouts are not retried, so a dead Redis answers
            # within the timeout rather than after redis-py's ten retries.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        return cls(client, prefix=prefix, keep_payloads=keep_payloads, clock=clock)

    def key(self, event_id: str) -> str:
        """Return the Redis key of ``event_id``."""
        return self.prefix + event_id

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`. One round trip, two when the id
        failed before.
        """
        token, now, lease_ms, value, body = self._fresh(lease, payload)
        key = self.key(event_id)
        try:
            # With GET, the reply is the value held before, or None.
            held = t.cast(
                "bytes | None", self.client.set(key, value, nx=True, px=lease_ms, get=True)
            )
            if held is None:
                return Claim(ClaimStatus.CLAIMED, token)
            status, expires = held[:1], _expires(held)
            if status == _FAILED_LETTER:
                answer = self._script(self._take_over, [key], [token, now, lease_ms, value, body])
                status, expires = answer[0][:1], int(answer[1])
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc
        return _claim(status, token, expires - now)

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.commit`. One round trip."""
        return self._settle(self._commit, event_id, token, _ms(retention))

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`. One round trip; the key is
        deleted.
        """
        return self._settle(self._release, event_id, token)

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`. One round trip."""
        return self._settle(self._extend, event_id, token, _ms(lease))

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        """See :meth:`.DedupeStore.fail`. One round trip; the key keeps the
        error for ``retention`` seconds.
        """
        count = "" if attempts is None else str(attempts)
        return self._settle(self._fail, event_id, token, _ms(retention), error.encode(), count)

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`. One round trip."""
        try:
            value = t.cast("bytes | None", self.client.get(self.key(event_id)))
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc
        return None if value is None else _stored(event_id, value)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`.

        Redis keeps no index of failed events, so this scans every key under
        the prefix with ``SCAN`` and reads the start of each: it costs
        O(keys) and is meant for occasional inspection, not for a request
        path.
        """
        found: list[tuple[int, bytes]] = []
        try:
            pattern = _glob_escape(self.prefix) + "*"
            keys = self.client.scan_iter(match=pattern, count=_SCAN_BATCH, _type="string")
            for batch in _batches(keys, _SCAN_BATCH):
                with self.client.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.getrange(key, 0, _HEADER_BYTES)
                    headers = pipe.execute()
                for key, header in zip(batch, headers, strict=True):
                    if header[:1] == _FAILED_LETTER:
                        found.append((_updated(header), key))
            found.sort(reverse=True)
            newest = [key for _, key in found[: max(limit, 0)]]
            values = t.cast("list[bytes | None]", self.client.mget(newest) if newest else [])
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc
        size = len(self.prefix.encode())
        # A key may have expired or been claimed again since the scan.
        return [
            _stored(key[size:].decode("utf-8", "replace"), value)
            for key, value in zip(newest, values, strict=True)
            if value is not None and value[:1] == _FAILED_LETTER
        ]

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _fresh(self, lease: float, payload: bytes | None) -> tuple[str, int, int, bytes, bytes]:
        """A new claim's token, the time and lease in ms, its value and the
        payload it keeps.
        """
        token = secrets.token_hex(8)
        lease_ms = _ms(lease)
        now = self._now_ms()
        body = payload if payload and self.keep_payloads else b""
        value = b"i%s:1:%d:%d\n0:%s" % (token.encode(), now, now + lease_ms, body)
        return token, now, lease_ms, value, body

    def _settle(self, script: t.Any, event_id: str, token: str, *args: t.Any) -> bool:
        return bool(self._call(script, [self.key(event_id)], [token, self._now_ms(), *args]))

    def _call(self, script: t.Any, keys: list[str], args: list[t.Any]) -> t.Any:
        try:
            return self._script(script, keys, args)
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc

    def _script(self, script: t.Any, keys: list[str], args: list[t.Any]) -> t.Any:
        # EVALSHA itself: calling the Script looks for pipelines first, on
        # every call, at a cost docs/benchmarks.rst measures.
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # The server lost its scripts (a restart, SCRIPT FLUSH).
            self.client.script_load(script.script)
            return self.client.evalsha(script.sha, len(keys), *keys, *args)

    # -- latest_by (flask_ploints._ordering.TurnsWithClaims)

    def _order_keys(self, key: str) -> list[str]:
        # Under "\x1e", which no event id holds (the parser refuses control
        # characters): never an event's key.
        return [f"{self.prefix}\x1eo:{key}", f"{self.prefix}\x1et:{key}"]

    def order_begin(self, key: str, timestamp: int, lease: float) -> Turn:
        """See :meth:`.OrderedStore.order_begin`. One round trip."""
        # "t" first: a value that never starts with a state's letter, so
        # failed() never takes it for an event.
        token = "t" + secrets.token_hex(8)
        answer = self._call(
            self._order_begin, self._order_keys(key), [timestamp, token, _ms(lease)]
        )
        status, field = answer
        return _turn(status, field, token)

    def order_end(self, key: str, token: str, timestamp: int | None, retention: float) -> bool:
        """See :meth:`.OrderedStore.order_end`. One round trip."""
        stamp = "" if timestamp is None else str(timestamp)
        return bool(
            self._call(self._order_end, self._order_keys(key), [token, stamp, _ms(retention)])
        )

    def claim_with_turns(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        keys: t.Sequence[str],
        timestamp: int,
    ) -> tuple[Claim, list[Turn]]:
        """See :meth:`.TurnsWithClaims.claim_with_turns`. One round trip, a
        Lua script that claims as :meth:`claim` does and takes the turns as
        :meth:`order_begin` does.
        """
        token, now, lease_ms, value, body = self._fresh(lease, payload)
        turn_token = "t" + token
        answer = self._call(
            self._claim_with_turns,
            [self.key(event_id), *(name for key in keys for name in self._order_keys(key))],
            [token, now, lease_ms, value, body, timestamp, turn_token],
        )
        claim = _claim(answer[0][:1], token, int(answer[1]) - now)
        pairs = zip(answer[2::2], answer[3::2], strict=True)
        return claim, [_turn(status, field, turn_token) for status, field in pairs]

    def commit_with_turns(
        self, event_id: str, token: str, retention: float, ends: t.Sequence[TurnEnd]
    ) -> bool:
        """See :meth:`.TurnsWithClaims.commit_with_turns`. One round trip, a
        Lua script that commits as :meth:`commit` does and ends the turns
        as :meth:`order_end` does.
        """
        keys = [self.key(event_id)]
        args: list[t.Any] = [token, self._now_ms(), _ms(retention)]
        for key, turn_token, stamp in ends:
            keys += self._order_keys(key)
            args += [turn_token, "" if stamp is None else stamp]
        return bool(self._call(self._commit_with_turns, keys, args))


def _claim(status: bytes, token: str, left_ms: int) -> Claim:
    """The claim a state letter answers; ``left_ms`` on a holder's lease."""
    if status == _CLAIMED_LETTER:
        return Claim(ClaimStatus.CLAIMED, token)
    if status == _DONE_LETTER:
        return _DONE
    return Claim(ClaimStatus.IN_FLIGHT, retry_after=max(0, left_ms) / 1000)


def _turn(status: bytes, field: bytes | int, token: str) -> Turn:
    """The turn ``take_turn`` answers, taken with ``token`` when it runs."""
    if status == b"busy":
        return Turn(TurnStatus.BUSY, retry_after=int(field) / 1000)
    newest = int(field) if field else None
    if status == b"stale":
        return Turn(TurnStatus.STALE, newest=newest)
    return Turn(TurnStatus.RUN, token, newest)


def _fields(value: bytes) -> list[bytes]:
    # The header's fields after the status: token, attempts, updated, expires.
    return value[1 : value.index(b"\n")].split(b":")


def _expires(value: bytes) -> int:
    return int(_fields(value)[3])


def _updated(header: bytes) -> int:
    return int(_fields(header)[2])


def _stored(event_id: str, value: bytes) -> StoredEvent:
    _, attempts, updated, _ = _fields(value)
    rest = value[value.index(b"\n") + 1 :]
    length, _, tail = rest.partition(b":")
    size = int(length)
    return StoredEvent(
        id=event_id,
        status=_STATES[value[:1]],
        attempts=int(attempts),
        error=tail[:size].decode("utf-8", "replace") if size else None,
        payload=tail[size:] or None,
        updated_at=int(updated) / 1000,
    )


def _batches(items: t.Iterable[bytes], size: int) -> t.Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
