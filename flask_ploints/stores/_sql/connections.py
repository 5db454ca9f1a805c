"""Where a store's call gets its connection, in autocommit mode: checked out
of a shared engine's pool for the call (:class:`PerCall`), or kept by the
store between calls (:class:`Kept`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import typing as t
import weakref

from sqlalchemy.engine import Dialect
from sqlalchemy.engine import Engine
from sqlalchemy.pool import PoolProxiedConnection

from .._base import StoreError
from .dbapi import Cursor
from .dbapi import DriverError
from .dbapi import Query
from .dbapi import checkout
from .dbapi import set_autocommit
from .dbapi import unset_autocommit

__all__ = ["Connections", "Kept", "PerCall", "pool_limit", "run"]

_T = t.TypeVar("_T")


class Connections(t.Protocol):
    """Where a store's calls get their connections, in autocommit mode."""

    def take(self, *, check: bool = False) -> PoolProxiedConnection:
        """A connection for one call.

        :param check: the call's last connection was dead: do not trust
            the pool's others without a ping.
        :raises DriverError: connecting failed.
        :raises StoreError: no connection came free in time.
        """

    def give_back(self, connection: PoolProxiedConnection) -> None:
        """The call is over with ``connection``."""

    def drop(self, *, dead: bool = False) -> None:
        """Let go of every connection kept for later calls.

        :param dead: one of them was found dead, so the others likely are:
            close them rather than give them back to the pool.
        """


def run(
    connections: Connections,
    dialect: Dialect,
    queries: dict[int, Query],
    operation: t.Callable[[Cursor, bool], _T],
    timeout: float | None = None,
) -> _T:
    """Call ``operation(cursor, retry)`` on a connection of ``connections``;
    when it turns out dead, once more, with ``retry`` set, on a checked one.
    A failure to connect is not retried, so an unreachable database fails
    within one connect timeout; nor is a statement past ``timeout``, so a
    database that stopped answering fails within it.

    :param queries: the compiled statements, see :class:`.Cursor`.
    :param timeout: the most seconds one statement may take.
    :raises DriverError: the driver refused, or did not answer in time.
    """
    for retry in (False, True):
        connection = connections.take(check=retry)
        try:
            cursor = Cursor(connection, dialect, queries, timeout)
            try:
                return operation(cursor, retry)
            finally:
                cursor.close()
        except DriverError as exc:
            if exc.dead:
                # The others are as old, and likely as dead or as stuck.
                connections.drop(dead=True)
            if not exc.dead or exc.timed_out or retry:
                raise
        finally:
            connections.give_back(connection)
    raise AssertionError("unreachable")  # pragma: no cover


def pool_limit(size: int, overflow: int) -> int | None:
    """The most connections a pool of ``size`` and ``overflow`` hands out,
    as :func:`sqlalchemy.create_engine` takes them; ``None`` for no limit.
    """
    return None if size <= 0 or overflow < 0 else size + overflow


class PerCall:
    """A connection checked out of the engine's pool for each call.

    :param switch: switch it to autocommit mode for the call, and back (an
        engine the application shares); else the engine's connections are
        in autocommit mode already.
    """

    def __init__(self, engine: Engine, *, switch: bool, timeout: float | None = None) -> None:
        self._engine = engine
        self._switch = switch
        self._timeout = timeout

    def take(self, *, check: bool = False) -> PoolProxiedConnection:
        connection = checkout(self._engine, check=check, timeout=self._timeout)
        if self._switch:
            try:
                set_autocommit(connection, self._engine.dialect)
            except BaseException:
                connection.close()
                raise
        return connection

    def give_back(self, connection: PoolProxiedConnection) -> None:
        if self._switch:
            unset_autocommit(connection, self._engine.dialect)
        connection.close()

    def drop(self, *, dead: bool = False) -> None:
        # Nothing is kept; a checked take() replaces the pool's dead ones.
        pass


#: Connections that a forked process inherited from its parent: kept
#: referenced and unused, so that neither it nor its garbage collector closes
#: them under the parent.
_INHERITED: list[PoolProxiedConnection] = []
_ALL_KEPT: weakref.WeakSet[Kept] = weakref.WeakSet()


class Kept:
    """The connections a store keeps checked out of its own engine's pool
    between calls, the last one given back used first: a checkout and
    checkin per call cost about as much as the statement.

    A call takes a kept connection, or checks a new one out while the store
    holds fewer than ``limit``; else it waits for one to be given back, at
    most ``wait`` seconds. Kept connections never sit idle while a thread
    waits on the pool for one.

    :param engine: the store's engine.
    :param limit: the most connections to hold, idle and in use: the pool's
        size plus its overflow; ``None`` for no limit.
    :param wait: the most seconds a call waits for a connection to come
        free, and a ping may take.
    """

    def __init__(self, engine: Engine, *, limit: int | None, wait: float) -> None:
        self._engine = engine
        self._limit = limit
        self._wait = wait
        self._idle: list[PoolProxiedConnection] = []
        self._in_use = 0
        self._waiting = 0
        # Entered directly, not through the Condition's Python-level
        # __enter__: it is taken twice per statement.
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        # A collected store closes its connections rather than leave them to
        # the collector: its engine, and the pool they would go back to, may
        # be on their way out too.
        weakref.finalize(self, _close_all, self._idle, True)
        _ALL_KEPT.add(self)

    def take(self, *, check: bool = False) -> PoolProxiedConnection:
        deadline: float | None = None
        with self._lock:
            while not self._idle:
                if self._limit is None or self._in_use < self._limit:
                    break
                if deadline is None:
                    deadline = time.monotonic() + self._wait
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError(
                        f"database: no connection came free within {self._wait:g} s"
                        f" ({self._limit} in use)"
                    )
                self._waiting += 1
                try:
                    self._freed.wait(left)
                finally:
                    self._waiting -= 1
            self._in_use += 1
            if self._idle:
                return self._idle.pop()
        try:
            return checkout(self._engine, check=check, timeout=self._wait)
        except BaseException:
            with self._lock:
                self._in_use -= 1
                self._wake_one()
            raise

    def give_back(self, connection: PoolProxiedConnection) -> None:
        with self._lock:
            self._in_use -= 1
            if connection.is_valid:
                self._idle.append(connection)
            else:
                # Back to the pool before another call checks one out.
                _close(connection)
            self._wake_one()

    def _wake_one(self) -> None:
        # Under the lock. Condition.notify is Python-level work even with
        # no one waiting, on every statement.
        if self._waiting:
            self._freed.notify()

    def drop(self, *, dead: bool = False) -> None:
        with self._lock:
            _close_all(self._idle, dead)

    def forget(self) -> None:
        """In a forked child: the kept connections are the parent's, and no
        call of the child is in progress.
        """
        _INHERITED.extend(self._idle)
        self._idle.clear()
        # Nor the pool's: the child gets a new one, the parent's is left be.
        self._engine.dispose(close=False)
        self._in_use = 0
        # Another thread of the parent may have held it at the fork.
        self._waiting = 0
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)

    def __len__(self) -> int:
        """How many connections the store holds, idle and in use."""
        with self._lock:
            return len(self._idle) + self._in_use


def _close(connection: PoolProxiedConnection, hard: bool = False) -> None:
    with contextlib.suppress(Exception):
        if hard:
            # Closes the DBAPI connection, not only the checkout.
            connection.invalidate()
        connection.close()


def _close_all(connections: list[PoolProxiedConnection], hard: bool = False) -> None:
    while connections:
        _close(connections.pop(), hard)


def _forget_kept() -> None:
    for kept in list(_ALL_KEPT):
        kept.forget()


os.register_at_fork(after_in_child=_forget_kept)
