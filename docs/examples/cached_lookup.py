"""Two ways to keep the secret lookup off the database on every delivery."""

import functools
import threading
import time
from collections.abc import Callable

Secrets = list[str] | None


def cached_for(seconds: float) -> Callable[[Callable[[str], Secrets]], Callable[[str], Secrets]]:
    """Cache a lookup's answers for up to ``seconds``: functools.lru_cache
    has no expiry, so the current time window is part of the key.
    """

    def decorator(lookup: Callable[[str], Secrets]) -> Callable[[str], Secrets]:
        @functools.lru_cache(maxsize=10_000)
        def cached(account: str, window: int) -> Secrets:
            return lookup(account)

        def get(account: str) -> Secrets:
            return cached(account, int(time.monotonic() // seconds))

        get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return get

    return decorator


class SecretsInMemory:
    """Every account's secrets in a dict, loaded again when they change
    (a merchant signs up, a secret is rotated): call ``refresh()`` then.
    """

    def __init__(self, load: Callable[[], dict[str, list[str]]]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._secrets = load()

    def __call__(self, account: str) -> Secrets:
        return self._secrets.get(account)

    def refresh(self) -> None:
        with self._lock:
            # One assignment: a delivery reads the old dict or the new one.
            self._secrets = self._load()
