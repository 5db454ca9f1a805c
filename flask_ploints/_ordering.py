"""Events out of order: handlers registered with ``latest_by`` apply, per
entity, only events no older than the newest they applied.

Ploints retries a failed delivery for hours and resends by hand, so an
older event about a customer often arrives after a newer one. A handler
registered with ``@webhooks.on(..., latest_by=key)`` is run through a
:class:`Guard`: for each value of ``key(event)``, it takes its turn on the
key in the dedupe store (no two deliveries for one key run the handler at
once), skips an event strictly older than the newest one it applied for that
key, and after it returns records the event's timestamp as the newest. See
:doc:`/ordering`.

A store offers this by implementing :class:`OrderedStore`; the receiver
refuses ``latest_by`` at start-up with a store that does not.

.. versionadded:: 0.2
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import time
import typing as t
import weakref
from datetime import UTC
from datetime import datetime

from flask import Flask
from flask import current_app

from . import signals
from ._errors import ConfigError
from ._logfields import log_event as _log

if t.TYPE_CHECKING:
    from ._events import Event

__all__ = ["KeyBusy", "OrderedStore", "Turn", "TurnStatus"]

# Between the handler's name and the key's value; both are the user's text,
# the separator keeps "a" + "b:c" apart from "a:b" + "c".
_SEPARATOR = "\x1f"
# The SQL stores keep keys of up to 255 characters.
_MAX_KEY = 255
# A busy key is asked again after these pauses, up to _WAIT seconds in all,
# before the delivery is answered 409.
_PAUSES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
_WAIT = 2.0


class TurnStatus(enum.Enum):
    """What :meth:`OrderedStore.order_begin` answers."""

    #: The caller holds the key and must run the handler, then call
    #: :meth:`~OrderedStore.order_end` with the turn's token.
    RUN = "run"
    #: The event is strictly older than the newest applied for the key.
    STALE = "stale"
    #: Another caller holds the key now.
    BUSY = "busy"


class Turn(t.NamedTuple):
    """The answer to :meth:`OrderedStore.order_begin`.

    :param status: what the caller must do.
    :param token: with :attr:`TurnStatus.RUN`, what proves the turn to
        :meth:`~OrderedStore.order_end`.
    :param newest: the newest timestamp applied for the key, in
        milliseconds since the epoch, when one is known.
    :param retry_after: with :attr:`TurnStatus.BUSY`, seconds left on the
        holder's turn when the store knows them.
    """

    status: TurnStatus
    token: str = ""
    newest: int | None = None
    retry_after: float = 0.0


@t.runtime_checkable
class OrderedStore(t.Protocol):
    """A dedupe store that keeps, per key, the newest event timestamp a
    handler applied, and serialises the handler's runs for one key: what
    ``latest_by`` needs. Both methods must be atomic across every process
    that shares the store.

    .. versionadded:: 0.2
    """

    def order_begin(self, key: str, timestamp: int, lease: float) -> Turn:
        """Take the turn on ``key`` for ``lease`` seconds, unless another
        caller holds it (:attr:`TurnStatus.BUSY`) or ``timestamp`` (ms since
        the epoch) is strictly older than the newest applied for ``key``
        (:attr:`TurnStatus.STALE`, taking nothing).
        """

    def order_end(self, key: str, token: str, timestamp: int | None, retention: float) -> bool:
        """End the turn ``token`` holds on ``key``. With ``timestamp``, the
        handler applied that event: it becomes the newest applied for
        ``key``, unless a newer one is, and is remembered for ``retention``
        seconds. With ``None``, the handler failed: nothing advances.

        :return: ``False`` when ``token`` no longer held the turn (its lease
            ran out); nothing changes then.
        """


class KeyBusy(Exception):
    """Raised by a guarded handler whose key stayed busy with another
    delivery past the bounded wait: the delivery is answered ``409`` with
    ``Retry-After``, and its claim released, as for an id in flight.

    :param retry_after: seconds after which a retry may find the key free.
    """

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(f"another delivery holds key {key!r}")
        self.retry_after = retry_after


def _millis(moment: datetime) -> int:
    """Milliseconds since the epoch of an event's timestamp."""
    return round(moment.timestamp() * 1000)


def _from_millis(value: int) -> datetime:
    """The aware datetime of :func:`_millis`."""
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def require_ordered(store: object) -> None:
    """Refuse ``latest_by`` with a store that cannot keep its promise.

    :raises ConfigError: the store is not an :class:`OrderedStore`; the
        message names ``PLOINTS_DEDUPE_STORE``.
    """
    if not isinstance(store, OrderedStore):
        raise ConfigError(
            f"PLOINTS_DEDUPE_STORE: latest_by needs a store that keeps the newest event applied"
            f" per key (memory, Redis, SQL or db); {type(store).__name__} does not"
        )


_Bound = tuple[
    t.Callable[[str, int, float], Turn],
    t.Callable[[str, str, "int | None", float], bool],
    t.Callable[[str, "str | None"], str],
    float,
    float,
]


class Guard:
    """A handler registered with ``latest_by``, as the receiver calls it.

    :param func: the handler (already bound to its model, when it has one).
    :param key: returns the entity the handler writes, from the event.
    :param name: the handler's stable identity in the store.
    :param instance: the name of the :class:`~flask_ploints.PlointsWebhooks`
        instance it is registered on.
    :param is_async: whether ``func`` is a coroutine function.
    :param find: returns the instance's state on an app (its
        :class:`~flask_ploints._state.Receiver`).
    """

    def __init__(
        self,
        func: t.Callable[..., t.Any],
        key: t.Callable[[Event], object],
        name: str,
        instance: str,
        is_async: bool,
        find: t.Callable[[Flask], t.Any],
    ) -> None:
        self.func = func
        self.find = find
        self.key = key
        self.name = name
        self.instance = instance
        self.is_async = is_async
        # What the guard needs of each app it runs on, found once.
        self._bound: weakref.WeakKeyDictionary[Flask, _Bound] = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, func)

    def __call__(self, event: Event) -> None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        bound = self._bound.get(app)
        if bound is None:
            bound = self._bound[app] = self._bind(app)
        begin, end, key_of, lease, retention = bound
        value = str(self.key(event))
        key = key_of(self.name + _SEPARATOR + value, event.account)
        if len(key) > _MAX_KEY:
            key = "#" + hashlib.sha256(key.encode()).hexdigest()
        stamp = _millis(event.timestamp)
        turn = begin(key, stamp, lease)
        if turn.status is TurnStatus.BUSY:
            turn = self._wait(begin, key, stamp, lease, turn)
        if turn.status is TurnStatus.STALE:
            assert turn.newest is not None
            newer = _from_millis(turn.newest)
            _log(
                logging.INFO,
                event,
                None,
                None,
                "skipped by handler %r: stale for key %r (%s applied)",
                self.name,
                value,
                newer.isoformat(),
            )
            signals.notify(
                signals.handler_skipped_stale,
                app,
                self.instance,
                event=event,
                handler=self.name,
                key=value,
                newer=newer,
            )
            return
        if turn.status is TurnStatus.BUSY:
            raise KeyBusy(value, turn.retry_after)
        try:
            (app.ensure_sync(self.func) if self.is_async else self.func)(event)
        except BaseException:
            end(key, turn.token, None, retention)
            raise
        end(key, turn.token, stamp, retention)

    def _bind(self, app: Flask) -> _Bound:
        receiver = self.find(app)
        store = t.cast(OrderedStore, receiver.store)
        processor = receiver.processor
        return (
            store.order_begin,
            store.order_end,
            processor.namespace.key,
            processor.dispatcher.lease,
            receiver.settings.retention,
        )

    @staticmethod
    def _wait(
        begin: t.Callable[[str, int, float], Turn], key: str, stamp: int, lease: float, turn: Turn
    ) -> Turn:
        deadline = time.monotonic() + _WAIT
        pause = iter(_PAUSES)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return turn
            time.sleep(min(next(pause, _PAUSES[-1]), left))
            turn = begin(key, stamp, lease)
            if turn.status is not TurnStatus.BUSY:
                return turn
