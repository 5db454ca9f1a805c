"""Bounded time for a statement on a network database: a database that
stops answering (a stuck proxy, a failover) must not hold a request until
the TCP stack gives up.

One daemon thread per process keeps the deadlines of the statements in
progress. When one passes, it shuts the connection's socket down, which the
driver sees as a lost connection: the call fails at once, and the pool
replaces the connection. It works for any driver whose connection has a
``fileno()`` (psycopg 3 and 2); others go unguarded (SQLite has no socket and
its own busy timeout; MySQL drivers take ``read_timeout``).

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import socket
import threading
import time

__all__ = ["Guard", "deadline"]


class Guard:
    """One statement's deadline; :attr:`fired` once it passed and the
    connection was cut.
    """

    __slots__ = ("done", "fileno", "fired")

    def __init__(self, fileno: int | None) -> None:
        self.fileno = fileno
        self.done = False
        self.fired = False

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fileno is not None:
            _WATCHDOG.release(self)


class _Watchdog:
    def __init__(self) -> None:
        # Entered directly, not through the Condition's Python-level
        # __enter__: it is taken twice per statement.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._due: list[tuple[float, int, Guard]] = []
        self._order = itertools.count()
        self._pid = 0
        # When the thread wakes next: a guard due later needs no notify, so
        # a busy process wakes it about once per timeout, not per guard.
        self._wake_at = math.inf

    def guard(self, connection: object, seconds: float) -> Guard:
        guard = Guard(_fileno(connection))
        if guard.fileno is None:
            return guard
        due = time.monotonic() + seconds
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="ploints-sql-deadline", daemon=True).start()
            heapq.heappush(self._due, (due, next(self._order), guard))
            if due < self._wake_at:
                self._wake_at = due
                self._wake.notify()
        return guard

    def release(self, guard: Guard) -> None:
        # Under the lock: once done, the watchdog never touches its socket,
        # which the connection may close and the process reuse right after.
        with self._lock:
            guard.done = True

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._due and (self._due[0][2].done or self._due[0][0] <= now):
                    _, _, guard = heapq.heappop(self._due)
                    if not guard.done and guard.fileno is not None:
                        guard.fired = True
                        _cut(guard.fileno)
                # Released guards stay in the heap until they reach its head.
                self._wake_at = self._due[0][0] if self._due else math.inf
                self._wake.wait(self._wake_at - now if self._due else None)

    def after_fork(self) -> None:
        # The child has no watchdog thread, and the lock may have been held.
        self.__init__()  # type: ignore[misc]


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.after_fork)


def deadline(connection: object, seconds: float | None) -> Guard:
    """Cut ``connection`` (a DBAPI connection) off if the ``with`` block of
    the returned guard runs longer than ``seconds``; ``None`` for no bound.
    """
    # A class, not a generator: it runs around every statement.
    if seconds is None:
        return Guard(None)
    return _WATCHDOG.guard(connection, seconds)


def _fileno(connection: object) -> int | None:
    fileno = getattr(connection, "fileno", None)
    if fileno is None:
        return None
    try:
        number = fileno()
    except Exception:
        return None
    return number if isinstance(number, int) and number >= 0 else None


def _cut(fileno: int) -> None:
    try:
        duplicate = os.dup(fileno)
    except OSError:
        return
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
