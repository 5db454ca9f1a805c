"""Running the handlers of an event: who is called, in which order, and
where: inline, or handed to a worker.

A dispatcher is the step between a claimed event and the answer. The
:class:`SyncDispatcher` runs the handlers inside the request; a dispatcher
that hands the event to a worker (see :mod:`flask_ploints._celery`) sets
:attr:`Dispatcher.runs_inline` to ``False`` and the worker settles the claim.
"""

from __future__ import annotations

import inspect
import typing as t

from flask import Flask

from ._errors import DispatchError
from ._errors import HandlerError
from ._events import Event
from ._events import check_event_types
from ._ordering import Guard
from .signals import require_runnable
from .signals import signal_for
from .stores import Claim

__all__ = [
    "DispatchError",
    "Dispatcher",
    "HandlerError",
    "Handlers",
    "SyncDispatcher",
    "WrappedHandlers",
]

Handler = t.Callable[[Event], t.Any]


class Handlers:
    """The handlers registered on one :class:`~flask_ploints.PlointsWebhooks`
    instance, by event type, plus those for every event.
    """

    def __init__(self) -> None:
        # Each handler with whether it is async, found once: only async ones
        # go through app.ensure_sync.
        self._by_type: dict[str, list[tuple[Handler, bool]]] = {}
        self._any: list[tuple[Handler, bool]] = []
        #: The handlers registered with ``latest_by``, by event type: their
        #: turns are taken with the event's claim.
        self.guards: dict[str, list[Guard]] = {}

    def connect(self, event_types: t.Iterable[str], func: Handler) -> None:
        """Call ``func`` for events of these types."""
        require_runnable(func)
        entry = (func, inspect.iscoroutinefunction(func))
        for event_type in check_event_types(event_types):
            self._by_type.setdefault(event_type, []).append(entry)
            if isinstance(func, Guard):
                self.guards.setdefault(event_type, []).append(func)

    def connect_any(self, func: Handler) -> None:
        """Call ``func`` for every verified event, unknown types included."""
        require_runnable(func)
        self._any.append((func, inspect.iscoroutinefunction(func)))

    def for_type(self, event_type: str) -> list[Handler]:
        """The handlers of one type, in the order they were connected; the
        handlers for every event are not included.
        """
        return [func for func, _ in self._by_type.get(event_type, ())]

    def for_any(self) -> list[Handler]:
        """The handlers for every event, in the order they were connected."""
        return [func for func, _ in self._any]

    def run(self, app: Flask, event: Event, name: str) -> None:
        """Run every handler of ``event`` in this order: this instance's
        handlers for its type, the receivers of the type's signal (handlers
        registered with :func:`flask_ploints.on` and raw blinker receivers),
        then this instance's handlers for every event.

        The first exception stops the rest and propagates.
        """
        for func, is_async in self._by_type.get(event.type, ()):
            (app.ensure_sync(func) if is_async else func)(event)
        signal = signal_for(event.type)
        if signal is not None and signal.receivers:
            signal.send(app, event=event, name=name)
        for func, is_async in self._any:
            (app.ensure_sync(func) if is_async else func)(event)


class WrappedHandlers(Handlers):
    """The handlers of a :class:`Handlers`, those connected later included,
    run in the same order with each call inside ``around(handler)``: a
    trace span per handler. A separate class, so that :meth:`Handlers.run`
    stays as cheap when nothing wraps the handlers.

    :param handlers: whose handlers to run.
    :param around: returns the context manager to call one handler in.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        handlers: Handlers,
        around: t.Callable[[t.Callable[..., t.Any]], t.ContextManager[object]],
    ) -> None:
        # Shared, not copied: handlers connected after init_app run too.
        self._by_type = handlers._by_type
        self._any = handlers._any
        self.guards = handlers.guards
        self.around = around

    def run(self, app: Flask, event: Event, name: str) -> None:
        """Run every handler as :meth:`Handlers.run` does, each inside
        ``around(handler)``; a signal's receivers each count as a handler.
        """
        around = self.around
        for func, is_async in self._by_type.get(event.type, ()):
            with around(func):
                (app.ensure_sync(func) if is_async else func)(event)
        signal = signal_for(event.type)
        if signal is not None and signal.receivers and not signal.is_muted:
            # What Signal.send does, one receiver at a time.
            for receiver in signal.receivers_for(app):
                if inspect.iscoroutinefunction(receiver):
                    raise RuntimeError("Cannot send to a coroutine function.")
                with around(receiver):
                    receiver(app, event=event, name=name)
        for func, is_async in self._any:
            with around(func):
                (app.ensure_sync(func) if is_async else func)(event)


@t.runtime_checkable
class Dispatcher(t.Protocol):
    """Hands a claimed event over for processing."""

    #: ``True`` when :meth:`dispatch` has run the handlers by the time it
    #: returns, so the view commits the claim; ``False`` when a worker will.
    runs_inline: bool
    #: Seconds of lease the view claims an event for: long enough to cover
    #: the handlers, or the wait in a queue.
    lease: float

    def dispatch(self, app: Flask, event: Event, claim: Claim, name: str) -> None:
        """Process ``event`` or hand it over.

        :raises DispatchError: the event could not be handed over; nothing
            ran.
        :raises Exception: what a handler raised, as it is or as the
            ``__cause__`` of a :class:`HandlerError`: a handler failure.
        """


class SyncDispatcher:
    """Runs the handlers inside the request, before the answer.

    :param handlers: the instance's handlers.
    :param lease: seconds a claim is held while the handlers run.
    """

    runs_inline = True

    def __init__(self, handlers: Handlers, lease: float) -> None:
        self.handlers = handlers
        self.lease = lease

    def dispatch(self, app: Flask, event: Event, claim: Claim, name: str) -> None:
        """Run the handlers; see :meth:`Handlers.run`. A handler's exception
        propagates as it is.
        """
        self.handlers.run(app, event, name)
