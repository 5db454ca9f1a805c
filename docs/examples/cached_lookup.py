"""Two ways to keep the secret lookup off the database on every delivery."""

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flask_ploints import Account

Lookup = Callable[[Any], Account | None]


class _Expiring:
    """At most ``size`` answers, each kept ``seconds``, the least recently
    used dropped first.
    """

    def __init__(self, size: int, seconds: float) -> None:
        self.size = size
        self.seconds = seconds
        self.entries: OrderedDict[Any, tuple[float, Account | None]] = OrderedDict()

    def get(self, key: Any, now: float) -> tuple[bool, Account | None]:
        entry = self.entries.get(key)
        if entry is None or entry[0] <= now:
            return False, None
        self.entries.move_to_end(key)
        return True, entry[1]

    def put(self, key: Any, answer: Account | None, now: float) -> None:
        self.entries[key] = (now + self.seconds, answer)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class CachedLookup:
    """A lookup's answers, kept apart: an account under its own name in a
    large cache, and everything else (an unknown name, another spelling of
    an account) in a small one of its own, for a few seconds, so that a
    flood of made-up names never pushes a real account out.
    """

    def __init__(
        self, lookup: Lookup, seconds: float, known: int, others: int, others_seconds: float
    ) -> None:
        self._lookup = lookup
        self._lock = threading.Lock()
        self._known = _Expiring(known, seconds)
        self._others = _Expiring(others, others_seconds)

    def __call__(self, value: Any) -> Account | None:
        now = time.monotonic()
        with self._lock:
            for cache in (self._known, self._others):
                hit, answer = cache.get(value, now)
                if hit:
                    return answer
        # Outside the lock: a slow call does not hold the cached answers up.
        answer = self._lookup(value)
        canonical = answer is not None and answer.name == str(value)
        with self._lock:
            (self._known if canonical else self._others).put(value, answer, now)
        return answer

    def cache_clear(self) -> None:
        """Forget every answer (a merchant signed up, a secret changed)."""
        with self._lock:
            self._known.entries.clear()
            self._others.entries.clear()


def cached_for(
    seconds: float, *, known: int = 10_000, others: int = 1_000, others_seconds: float = 5.0
) -> Callable[[Lookup], CachedLookup]:
    """Cache a lookup's answers: each account under its own name for up to
    ``seconds`` (``known`` of them at most), every other answer (``None``,
    another spelling) for ``others_seconds`` (``others`` of them at most).
    """

    def decorator(lookup: Lookup) -> CachedLookup:
        return CachedLookup(lookup, seconds, known, others, others_seconds)

    return decorator


class SecretsInMemory:
    """Every account's secrets in a dict, loaded again when they change
    (a merchant signs up, a secret is rotated): call ``refresh()`` then.
    """

    def __init__(self, load: Callable[[], dict[str, list[str]]]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._secrets = load()

    def __call__(self, account: str) -> Account | None:
        secrets = self._secrets.get(account)
        return None if secrets is None else Account(account, secrets)

    def refresh(self) -> None:
        with self._lock:
            # One assignment: a delivery reads the old dict or the new one.
            self._secrets = self._load()
