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
refuses ``latest_by`` at start-up with a store that does not. A store that
also implements :class:`TurnsWithClaims` takes a delivery's turns with its
claim and ends them with its commit, so that ``latest_by`` costs no round
trip of its own: the receiver then gathers them in a :class:`Turns`.
Otherwise each guard takes and ends its own turn.

.. versionadded:: 0.2
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import threading
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
    from .stores._base import Claim

__all__ = [
    "KeyBusy",
    "OrderedStore",
    "Turn",
    "TurnEnd",
    "TurnStatus",
    "Turns",
    "TurnsWithClaims",
    "TurnsWithHeldClaims",
]

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


#: One turn to end, as :meth:`OrderedStore.order_end` takes it: the key,
#: the turn's token, and the event's timestamp (ms since the epoch) when the
#: handler applied it or ``None`` when nothing advances. A plain tuple: one
#: is made for every turn a delivery ends.
TurnEnd = tuple[str, str, "int | None"]


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


@t.runtime_checkable
class TurnsWithClaims(OrderedStore, t.Protocol):
    """An :class:`OrderedStore` that takes a delivery's turns in the same
    atomic step as its claim, and ends them in the same step as its commit:
    ``latest_by`` then costs no round trip beside the claim and the commit.
    The receiver checks for it once per store; a store without it is called
    through :meth:`~OrderedStore.order_begin` and
    :meth:`~OrderedStore.order_end`, once per guarded handler each.

    .. versionadded:: 0.2
    """

    def claim_with_turns(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        keys: t.Sequence[str],
        timestamp: int,
    ) -> tuple[Claim, list[Turn]]:
        """:meth:`~flask_ploints.stores.DedupeStore.claim` ``event_id``
        and, when it is claimed, :meth:`~OrderedStore.order_begin` each of
        ``keys`` with ``timestamp`` for the same ``lease``, at once.

        :return: the claim, and the turn of each key in order; no turn when
            the id was not claimed.
        """

    def commit_with_turns(
        self, event_id: str, token: str, retention: float, ends: t.Sequence[TurnEnd]
    ) -> bool:
        """:meth:`~flask_ploints.stores.DedupeStore.commit` ``event_id``
        and :meth:`~OrderedStore.order_end` each of ``ends`` with
        ``retention``, at once; each turn ends whether or not ``token``
        still owned the claim.

        :return: what the commit answers.
        """


@t.runtime_checkable
class TurnsWithHeldClaims(OrderedStore, t.Protocol):
    """A :class:`~flask_ploints.stores.TransactionalStore` that takes a
    delivery's turns with the claim it holds in the handlers' transaction,
    so that they commit, or roll back, with the handlers' writes.

    .. versionadded:: 0.2
    """

    def hold_with_turns(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        retention: float,
        keys: t.Sequence[str],
        timestamp: int,
    ) -> tuple[Claim, list[Turn]]:
        """Hold the claim of ``event_id`` and, when it is claimed, take the
        turns of any of ``keys`` it can in the same step.

        :return: the claim, and the turns taken, in the order of ``keys``;
            the guard of a key without one takes its own.
        """

    def commit_with_turns(
        self, event_id: str, token: str, retention: float, ends: t.Sequence[TurnEnd]
    ) -> bool:
        """See :meth:`TurnsWithClaims.commit_with_turns`."""


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


KeyOf = t.Callable[[str, "str | None"], str]


class _TurnSource(t.Protocol):
    """Where a :class:`Guard` takes and ends its turns: its own store calls
    (:class:`_OwnTurns`) or its delivery's (:class:`Turns`).
    """

    def begin(self, guard: Guard, event: Event) -> tuple[str, str, int, Turn]:
        """The guard's key and its value (see :meth:`Guard.order_key`),
        the event's timestamp in ms, and the guard's turn on the key.
        """

    def again(self, key: str, stamp: int) -> Turn:
        """Ask the store again, after a :attr:`TurnStatus.BUSY` turn."""

    def finish(self, key: str, turn: Turn, applied: int | None) -> None:
        """The handler returned (``applied`` is the event's stamp) or
        raised (``None``).
        """


class _OwnTurns:
    """A guard's turns taken and ended by its own store calls, one each."""

    def __init__(self, store: OrderedStore, key_of: KeyOf, lease: float, retention: float) -> None:
        self.store = store
        self.key_of = key_of
        self.lease = lease
        self.retention = retention

    def begin(self, guard: Guard, event: Event) -> tuple[str, str, int, Turn]:
        """Take the turn: :meth:`OrderedStore.order_begin`."""
        key, value = guard.order_key(event, self.key_of)
        stamp = _millis(event.timestamp)
        return key, value, stamp, self.again(key, stamp)

    def again(self, key: str, stamp: int) -> Turn:
        """Ask again: :meth:`OrderedStore.order_begin`."""
        return self.store.order_begin(key, stamp, self.lease)

    def finish(self, key: str, turn: Turn, applied: int | None) -> None:
        """End the turn: :meth:`OrderedStore.order_end`."""
        self.store.order_end(key, turn.token, applied, self.retention)


class Turns:
    """The turns of one delivery's guarded handlers with a
    :class:`TurnsWithClaims` or :class:`TurnsWithHeldClaims` store: their
    keys found before the claim, the turns taken with it, and ended with the
    commit (or, when the delivery fails, by :meth:`end`). Its guards find it
    in :data:`running`.

    :param store: the store.
    :param event: the event delivered.
    :param guards: the guarded handlers of the event's type.
    :param key_of: how the receiver's namespace makes a store key.
    :param lease: seconds of the claim's lease, and of the turns'.
    :param retention: seconds the newest applied is remembered.
    :param held: the store is a :class:`TurnsWithHeldClaims`, and the
        claim is held in the handlers' transaction.
    """

    __slots__ = (
        "_applied",
        "_distinct",
        "_keys",
        "_taken",
        "held",
        "key_of",
        "lease",
        "retention",
        "stamp",
        "store",
    )

    def __init__(
        self,
        store: TurnsWithClaims | TurnsWithHeldClaims,
        event: Event,
        guards: t.Iterable[Guard],
        key_of: KeyOf,
        lease: float,
        retention: float,
        held: bool = False,
    ) -> None:
        self.store = store
        self.held = held
        self.key_of = key_of
        self.lease = lease
        self.retention = retention
        self.stamp = _millis(event.timestamp)
        self._keys: dict[Guard, tuple[str, str]] = {}
        # Each key once, in order: what the claim takes.
        self._distinct: list[str] = []
        for guard in guards:
            try:
                found = self._keys[guard] = guard.order_key(event, key_of)
            except Exception:
                # Found again, and raised, when its guard runs: that
                # handler's failure.
                continue
            if found[0] not in self._distinct:
                self._distinct.append(found[0])
        self._taken: dict[str, Turn] = {}
        self._applied: set[str] = set()

    def claim(self, event_id: str, payload: bytes | None) -> Claim:
        """Claim ``event_id`` (held, with :attr:`held`) and take the turn
        of every key.
        """
        keys = self._distinct
        if self.held:
            held = t.cast(TurnsWithHeldClaims, self.store)
            claim, turns = held.hold_with_turns(
                event_id, self.lease, payload, self.retention, keys, self.stamp
            )
        else:
            plain = t.cast(TurnsWithClaims, self.store)
            claim, turns = plain.claim_with_turns(event_id, self.lease, payload, keys, self.stamp)
        # No turn when the id was not claimed.
        self._taken = dict(zip(keys, turns, strict=False))
        return claim

    def commit(self, event_id: str, token: str) -> bool:
        """Commit ``event_id`` and end every turn, advancing the applied."""
        return self.store.commit_with_turns(event_id, token, self.retention, self._ends())

    def end(self) -> None:
        """End every turn without the commit (the delivery failed): those
        whose handler applied the event still advance, since its effects
        are done; a held claim's roll back with the handlers' writes.
        """
        if not self.held:
            for key, token, stamp in self._ends():
                self.store.order_end(key, token, stamp, self.retention)
        self._taken.clear()

    def _ends(self) -> list[TurnEnd]:
        """The turns taken, each with the stamp it advances to, if any."""
        return [
            (key, turn.token, self.stamp if key in self._applied else None)
            for key, turn in self._taken.items()
            if turn.status is TurnStatus.RUN
        ]

    def begin(self, guard: Guard, event: Event) -> tuple[str, str, int, Turn]:
        """The key found and the turn taken with the claim; for a key the
        claim did not know, a turn of its own.
        """
        found = self._keys.get(guard)
        key, value = guard.order_key(event, self.key_of) if found is None else found
        turn = self._taken.get(key)
        if turn is None:
            turn = self.again(key, self.stamp)
        return key, value, self.stamp, turn

    def again(self, key: str, stamp: int) -> Turn:
        """Take the turn with :meth:`OrderedStore.order_begin`; it ends
        with the others.
        """
        turn = self._taken[key] = self.store.order_begin(key, stamp, self.lease)
        return turn

    def finish(self, key: str, turn: Turn, applied: int | None) -> None:
        """Note what the handler applied; the turn ends with the
        delivery's commit or :meth:`end`.
        """
        if applied is not None:
            self._applied.add(key)


class _Running(threading.local):
    """What the thread running a delivery's handlers holds for its guards:
    a thread's, not a context variable, which costs several times more to
    set on every delivery. The guards run in the thread of the claim (the
    receiver folds turns only with the inline dispatcher).
    """

    #: The :class:`Turns` of the delivery whose handlers run now, if any.
    turns: Turns | None = None


running = _Running()


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
        # The guard's own turns on each app it runs on, made once.
        self._own: weakref.WeakKeyDictionary[Flask, _OwnTurns] = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, func)

    def order_key(self, event: Event, key_of: KeyOf) -> tuple[str, str]:
        """The store key of ``event`` for this handler, and the value of
        ``latest_by`` it was made from.
        """
        value = str(self.key(event))
        key = key_of(self.name + _SEPARATOR + value, event.account)
        if len(key) > _MAX_KEY:
            key = "#" + hashlib.sha256(key.encode()).hexdigest()
        return key, value

    def __call__(self, event: Event) -> None:
        turns: _TurnSource | None = running.turns
        if turns is None:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
            turns = self._own.get(app)
            if turns is None:
                turns = self._own[app] = self._bind(app)
        key, value, stamp, turn = turns.begin(self, event)
        if turn.status is TurnStatus.BUSY:
            turn = self._wait(turns, key, stamp, turn)
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
                current_app._get_current_object(),  # type: ignore[attr-defined]
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
            (current_app.ensure_sync(self.func) if self.is_async else self.func)(event)
        except BaseException:
            turns.finish(key, turn, None)
            raise
        turns.finish(key, turn, stamp)

    def _bind(self, app: Flask) -> _OwnTurns:
        receiver = self.find(app)
        processor = receiver.processor
        return _OwnTurns(
            t.cast(OrderedStore, receiver.store),
            processor.namespace.key,
            processor.dispatcher.lease,
            receiver.settings.retention,
        )

    @staticmethod
    def _wait(turns: _TurnSource, key: str, stamp: int, turn: Turn) -> Turn:
        deadline = time.monotonic() + _WAIT
        pause = iter(_PAUSES)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return turn
            time.sleep(min(next(pause, _PAUSES[-1]), left))
            turn = turns.again(key, stamp)
            if turn.status is not TurnStatus.BUSY:
                return turn
