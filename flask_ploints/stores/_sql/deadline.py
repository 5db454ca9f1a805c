"""Bounded time for a statement on a network database: a database that
stops answering (a stuck proxy, a failover) must not hold a request until
the TCP stack gives up.

One daemon thread per process keeps the deadlines of the statements in
progress. When one passes, it shuts the connection's socket down, which the
driver sees as a lost connection: the call fails at once, and the pool
replaces the connection. It works for any driver whose connection has a
``fileno()`` (psycopg 3 and 2), and for PyMySQL, whose socket is found in
:func:`_fileno` (the one use of its internals; pinned by
``test_pymysql_connections_are_guarded``). Others go unguarded (SQLite has no
socket and its own busy timeout).

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import typing as t

from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["Guard", "bound_connects", "deadline", "pymysql_connect"]


class Guard:
    """One statement's deadline; :attr:`fired` once it passed and the
    connection was cut.
    """

    __slots__ = ("due", "fileno", "fired")

    def __init__(self, fileno: int | None, due: float = math.inf) -> None:
        self.fileno = fileno
        self.due = due
        self.fired = False

    def release(self) -> None:
        """The statement is over: the connection is no longer cut."""
        if self.fileno is not None:
            _WATCHDOG.release(self)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class _Watchdog:
    def __init__(self) -> None:
        # Entered directly, not through the Condition's Python-level
        # __enter__: it is taken twice per statement.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # The statements in progress: a handful per process, so the thread
        # scans them all rather than keep a heap that every statement,
        # finished or not, would have to be pushed to and popped from.
        self._active: set[Guard] = set()
        self._pid = 0
        # When the thread wakes next: a guard due later needs no notify, so
        # a busy process wakes it about once per timeout, not per guard.
        self._wake_at = math.inf

    def guard(self, connection: object, seconds: float) -> Guard:
        fileno = _fileno(connection)
        if fileno is None:
            return Guard(None)
        guard = Guard(fileno, time.monotonic() + seconds)
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="ploints-sql-deadline", daemon=True).start()
            self._active.add(guard)
            if guard.due < self._wake_at:
                self._wake_at = guard.due
                self._wake.notify()
        return guard

    def release(self, guard: Guard) -> None:
        # Under the lock: once released, the watchdog never touches its
        # socket, which the connection may close and the process reuse
        # right after.
        with self._lock:
            self._active.discard(guard)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                wake_at = math.inf
                for guard in list(self._active):
                    if guard.due <= now:
                        self._active.discard(guard)
                        guard.fired = True
                        _cut(t.cast(int, guard.fileno))
                    elif guard.due < wake_at:
                        wake_at = guard.due
                self._wake_at = wake_at
                self._wake.wait(None if wake_at == math.inf else wake_at - now)

    def after_fork(self) -> None:
        # The child has no watchdog thread, and the lock may have been held.
        self.__init__()  # type: ignore[misc]


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.after_fork)


def deadline(connection: object, seconds: float | None) -> Guard:
    """Cut ``connection`` (a DBAPI connection) off if the ``with`` block of
    the returned guard, or the time until its :meth:`~Guard.release`, runs
    longer than ``seconds``; ``None`` for no bound.
    """
    # A class, not a generator: it runs around every statement.
    if seconds is None:
        return Guard(None)
    return _WATCHDOG.guard(connection, seconds)


def _fileno(connection: object) -> int | None:
    fileno = getattr(connection, "fileno", None)
    if fileno is None:
        # PyMySQL has no fileno(), and no public way to its socket: its
        # read_timeout bounds a statement only on an engine the store made.
        fileno = getattr(getattr(connection, "_sock", None), "fileno", None)
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


def pymysql_connect(
    dbapi: t.Any, cargs: t.Sequence[t.Any], cparams: dict[str, t.Any], seconds: float
) -> t.Any:
    """A PyMySQL connection whose handshake waits at most ``seconds`` per
    read and write (its ``connect_timeout`` bounds only the TCP connect),
    and whose later statements wait as the app's options say: the
    deadline cannot guard a socket before it exists.
    """
    options = {"read_timeout": seconds, "write_timeout": seconds, **cparams}
    connection = dbapi.connect(*cargs, **options)
    # PyMySQL applies these before each read and write; no public setter.
    connection._read_timeout = cparams.get("read_timeout")
    connection._write_timeout = cparams.get("write_timeout")
    return connection


def bound_connects(engine: Engine, seconds: float) -> None:
    """Give ``engine``'s new connections a connect timeout when the app's
    engine options gave none (and PyMySQL's handshake a bound, see
    :func:`pymysql_connect`): a claim or a commit may have to connect, and
    a deadline has no socket to cut before.
    """
    name = engine.dialect.name
    if name == "postgresql":
        # libpq counts whole seconds and treats anything under 2 as 2.
        value = max(2, math.ceil(seconds))
    elif name in ("mysql", "mariadb"):
        value = max(1, math.ceil(seconds))
    else:
        return
    pymysql = engine.dialect.driver == "pymysql"

    @event.listens_for(engine, "do_connect")
    def connect(
        dialect: t.Any, record: t.Any, cargs: list[t.Any], cparams: dict[str, t.Any]
    ) -> t.Any:
        cparams.setdefault("connect_timeout", value)
        if pymysql:
            return pymysql_connect(dialect.loaded_dbapi, cargs, cparams, seconds)
        return None
