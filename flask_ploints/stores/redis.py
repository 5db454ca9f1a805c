"""A dedupe store in Redis, shared by every worker and host.

Needs the ``redis`` package: ``pip install 'flask-ploints[redis]'`` (which
also installs hiredis, picked up by redis-py automatically).
"""

from __future__ import annotations

import secrets
import typing as t

from .base import Claim
from .base import ClaimStatus
from .base import StoredEvent
from .base import StoreError

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RedisStore needs the redis package; install it with: pip install 'flask-ploints[redis]'"
    ) from exc

__all__ = ["RedisStore"]

_DONE = Claim(ClaimStatus.DONE)

# Each event is a hash under ``prefix + event_id``:
#   s  status: in_flight | done | failed
#   t  token of the current claim
#   x  lease (in flight) or retention (done, failed) end, server ms
#   a  claims since the key was created
#   u  last change, server ms
#   e  error of the last fail(), if any
#   p  payload, kept while in flight and once failed
# The key's own TTL is the lease or the retention, so Redis forgets expired
# entries by itself. Times come from the server's clock (TIME), so clients
# need no synchronised clocks.

_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# KEYS[1] event key; ARGV: token, lease ms, payload ('' for none), keep (1/0).
# Returns {status, ms left on the holder's lease}.
_CLAIM = (
    _NOW
    + """
local key = KEYS[1]
local lease = tonumber(ARGV[2])
local current = redis.call('HMGET', key, 's', 'x', 'a')
local status = current[1]
if status == 'done' then
    return {'done', 0}
end
if status == 'in_flight' then
    local left = tonumber(current[2]) - now
    if left > 0 then
        return {'in_flight', left}
    end
end
local attempts = (tonumber(current[3]) or 0) + 1
redis.call('HSET', key, 's', 'in_flight', 't', ARGV[1], 'x', now + lease, 'a', attempts, 'u', now)
if ARGV[4] == '1' and ARGV[3] ~= '' then
    redis.call('HSET', key, 'p', ARGV[3])
end
redis.call('PEXPIRE', key, lease)
return {'claimed', 0}
"""
)

# Every settle script starts by checking that ARGV[1], the token, still owns a
# live claim; it returns 1 when it acted, 0 otherwise.
_OWNS = (
    _NOW
    + """
local key = KEYS[1]
local current = redis.call('HMGET', key, 's', 't', 'x')
if current[1] ~= 'in_flight' or current[2] ~= ARGV[1] or tonumber(current[3]) <= now then
    return 0
end
"""
)

# ARGV: token, retention ms.
_COMMIT = (
    _OWNS
    + """
local retention = tonumber(ARGV[2])
redis.call('HSET', key, 's', 'done', 'x', now + retention, 'u', now)
redis.call('HDEL', key, 'p')
redis.call('PEXPIRE', key, retention)
return 1
"""
)

# ARGV: token.
_RELEASE = (
    _OWNS
    + """
redis.call('DEL', key)
return 1
"""
)

# ARGV: token, lease ms.
_EXTEND = (
    _OWNS
    + """
local lease = tonumber(ARGV[2])
redis.call('HSET', key, 'x', now + lease, 'u', now)
redis.call('PEXPIRE', key, lease)
return 1
"""
)

# ARGV: token, retention ms, error.
_FAIL = (
    _OWNS
    + """
local retention = tonumber(ARGV[2])
redis.call('HSET', key, 's', 'failed', 'x', now + retention, 'u', now, 'e', ARGV[3])
redis.call('PEXPIRE', key, retention)
return 1
"""
)

_FIELDS = ("s", "a", "e", "p", "u")
_SCAN_BATCH = 500


def _ms(seconds: float) -> int:
    # PX and PEXPIRE refuse 0; a non-positive time means "already over".
    return max(1, round(seconds * 1000))


def _glob_escape(text: str) -> str:
    for special in "\\*?[]":
        text = text.replace(special, "\\" + special)
    return text


class RedisStore:
    """Remembers event ids in Redis, one hash per id, so every worker process
    and host shares the same dedupe state.

    Each operation is one Lua script run with ``EVALSHA``: a claim learns the
    state of the id and takes it in one round trip, so a new event costs two
    round trips (claim, commit) and a duplicate one; the first call after
    Redis restarts or forgets its scripts adds one ``SCRIPT LOAD``. redis-py
    parses replies with hiredis when it is installed. Each key expires by
    itself: an in-flight key after its lease, a done or failed key after its
    retention. The failed key keeps the error text, and the payload when
    ``keep_payloads`` is set; a done key drops the payload.

    **Redis must not evict these keys.** An evicted key is a forgotten event,
    processed again on the sender's next retry. Run Redis with
    ``maxmemory-policy noeviction``, or give the store a Redis (or database)
    that nothing evicts from.

    **One client per process.** The store uses its client's connection pool
    from every thread; build one store per process (the extension does) and
    share it. With redis-py's defaults (5 s timeouts, ten retries) a dead
    Redis holds each request for long, so :meth:`from_url` sets short socket
    timeouts and a single immediate retry on a broken connection, none on a
    timeout; a client you pass keeps its own settings.

    Every :class:`redis.RedisError` is raised as :class:`.StoreError`. The
    scripts read the server's clock (``TIME``), so clients need no
    synchronised clocks; they need Redis 5 or later. The store talks to one
    Redis server (a primary); Redis Cluster is not supported.

    It implements :class:`.InspectableStore`.

    :param client: the redis-py client; responses must not be decoded
        (``decode_responses=False``, the default).
    :param prefix: put before every event id to make its key.
    :param keep_payloads: keep the raw body of in-flight and failed events,
        for replay. Done events never keep it, to spare Redis memory.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "ploints:",
        keep_payloads: bool = True,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.keep_payloads = keep_payloads
        self._claim = client.register_script(_CLAIM)
        self._commit = client.register_script(_COMMIT)
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)
        self._fail = client.register_script(_FAIL)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "ploints:",
        timeout: float = 2.0,
        keep_payloads: bool = True,
    ) -> RedisStore:
        """Build a store with its own client for ``url`` (``redis://``,
        ``rediss://`` or ``unix://``). No connection is made until the first
        call.

        :param url: where Redis is, as redis-py's ``Redis.from_url`` reads it.
        :param prefix: put before every event id to make its key.
        :param timeout: seconds to wait to connect, and for each answer.
        :param keep_payloads: see :class:`RedisStore`.
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
        return cls(client, prefix=prefix, keep_payloads=keep_payloads)

    def key(self, event_id: str) -> str:
        """Return the Redis key of ``event_id``."""
        return self.prefix + event_id

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`. One round trip."""
        token = secrets.token_hex(8)
        args = [token, _ms(lease), payload or b"", 1 if self.keep_payloads else 0]
        answer = self._run(self._claim, event_id, args)
        status, left = answer[0], int(answer[1])
        if status == b"claimed":
            return Claim(ClaimStatus.CLAIMED, token)
        if status == b"done":
            return _DONE
        return Claim(ClaimStatus.IN_FLIGHT, retry_after=left / 1000)

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.commit`. One round trip."""
        return bool(self._run(self._commit, event_id, [token, _ms(retention)]))

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`. One round trip; the key is
        deleted.
        """
        return bool(self._run(self._release, event_id, [token]))

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`. One round trip."""
        return bool(self._run(self._extend, event_id, [token, _ms(lease)]))

    def fail(self, event_id: str, token: str, error: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.fail`. One round trip; the key keeps the
        error for ``retention`` seconds.
        """
        return bool(self._run(self._fail, event_id, [token, _ms(retention), error]))

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`. One round trip."""
        try:
            values = self.client.hmget(self.key(event_id), _FIELDS)
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc
        return _stored(event_id, values)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`.

        Redis keeps no index of failed events, so this scans every key under
        the prefix with ``SCAN``: it costs O(keys) and is meant for occasional
        inspection, not for a request path.
        """
        found: list[tuple[float, bytes]] = []
        try:
            pattern = _glob_escape(self.prefix) + "*"
            keys = self.client.scan_iter(match=pattern, count=_SCAN_BATCH, _type="HASH")
            for batch in _batches(keys, _SCAN_BATCH):
                with self.client.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.hmget(key, "s", "u")
                    answers = pipe.execute()
                for key, (status, updated) in zip(batch, answers, strict=True):
                    if status == b"failed":
                        found.append((float(updated or 0), key))
            found.sort(reverse=True)
            newest = [key for _, key in found[: max(limit, 0)]]
            with self.client.pipeline(transaction=False) as pipe:
                for key in newest:
                    pipe.hmget(key, _FIELDS)
                answers = pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc
        size = len(self.prefix.encode())
        events = []
        for key, values in zip(newest, answers, strict=True):
            event = _stored(key[size:].decode("utf-8", "replace"), values)
            # A key may have expired or been claimed again since the scan.
            if event is not None and event.status == "failed":
                events.append(event)
        return events

    def _run(self, script: t.Any, event_id: str, args: list[t.Any]) -> t.Any:
        try:
            return script(keys=[self.key(event_id)], args=args)
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc


def _stored(event_id: str, values: t.Sequence[t.Any]) -> StoredEvent | None:
    status, attempts, error, payload, updated = values
    if status is None:
        return None
    return StoredEvent(
        id=event_id,
        status=status.decode(),
        attempts=int(attempts or 0),
        error=None if error is None else error.decode("utf-8", "replace"),
        payload=payload,
        updated_at=int(updated or 0) / 1000,
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
