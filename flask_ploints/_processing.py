"""Processing an event: claim its id, run its handlers, settle the claim,
notify, and say what happened.

Every way an event is processed goes through one :class:`Processor` per
instance and app: a delivery (:meth:`~Processor.deliver`), a replay or a
re-run from the delivery log (:meth:`~Processor.rerun`), and a Celery
worker's attempt (:meth:`~Processor.resume`, then :meth:`~Processor.keep`
or :meth:`~Processor.give_up`). The callers only translate: the endpoint maps the :class:`Outcome` to an
HTTP status, replay to its return value, the worker to a retry. The three
differ in one thing, what a handler failure does to the claim. A delivery
releases it, so the sender's retry runs the event again; a replay records
the event failed with its traceback, so it can be found and replayed; a
worker keeps it while it retries, and records it failed when it gives up.

Handlers run inside the :class:`HandlerScope` of the store and of the
dispatcher, when they offer one: the one place where a store that must
commit the handlers' writes with its own (a database transaction) or a
dispatcher that must set up around them (a trace span) wraps them.

An event with ``latest_by`` handlers, run here by a store that takes their
turns with the claim (:class:`~flask_ploints._ordering.TurnsWithClaims`, or
:class:`~flask_ploints._ordering.TurnsWithHeldClaims` for a claim held in
the handlers' transaction), carries them in a
:class:`~flask_ploints._ordering.Turns` from the claim to the commit, or to
the release or failure that ends them.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import enum
import logging
import shlex
import time
import typing as t

from flask import Flask

from . import _effects as effects
from . import signals
from ._config import SENDER_TIMEOUT
from ._config import Settings
from ._dispatch import Dispatcher
from ._dispatch import Handlers
from ._dispatch import SyncDispatcher
from ._errors import DispatchError
from ._errors import HandlerError
from ._events import Event
from ._logfields import log_event as _log
from ._namespace import Namespace
from ._ordering import KeyBusy
from ._ordering import Turns
from ._ordering import TurnsWithClaims
from ._ordering import TurnsWithHeldClaims
from ._ordering import running
from ._outcomes import MAX_ERROR
from ._outcomes import Outcome
from ._outcomes import Result
from ._outcomes import error_text
from .signals import notify
from .stores import Claim
from .stores import ClaimStatus
from .stores import DedupeStore
from .stores import HandlerScope
from .stores import TransactionalStore

__all__ = ["MAX_ERROR", "Outcome", "Processor", "Result", "error_text"]

# Not a handler failure: the process is going away. The claim is released
# on the way out, so the sender's retry need not wait for the lease.
_PROCESS_EXITS = (KeyboardInterrupt, SystemExit)


class _Settle(enum.Enum):
    """What a failed delivery (release: the sender retries) or re-run (fail:
    recorded for a replay) does to its claim.
    """

    RELEASE = enum.auto()
    FAIL = enum.auto()


_PROCESSED_OUTCOME = Outcome.PROCESSED
_UNAVAILABLE = Outcome.UNAVAILABLE
_PROCESSED = Result(Outcome.PROCESSED)
_QUEUED = Result(Outcome.QUEUED)
_DUPLICATE = Result(Outcome.DUPLICATE)
_IN_FLIGHT = Result(Outcome.IN_FLIGHT)
_SLOW = (
    "took %.1f s in its handlers; Ploints gives up after %g s and retries, so move slow work"
    " to async dispatch (PLOINTS_DISPATCH = 'celery')"
)
_NOT_COMMITTED = "processed, but the dedupe store failed to commit it; a retry may process it again"
_ROLLED_BACK = "not committed: the dedupe store failed; its handlers' writes were rolled back"
_NOT_CLAIMED = "not claimed: the dedupe store failed"
_NOT_RECORDED = "not recorded failed: the dedupe store failed"
_NOT_RELEASED = "not released: the dedupe store failed"
_TURNS_NOT_ENDED = "latest_by turns not ended: the dedupe store failed"
_RAISED = "failed: a handler raised %r"
_SKIPPED = "skipped by the worker: %s"
_LAPSED_IN_QUEUE = "claimed again: its claim lapsed in the queue"
_GAVE_UP = "failed after %d attempt(s)%s; %s"
_RECORDED = "recorded as failed: replay it with: flask ploints replay %s"
_NOT_RESENT = "not recorded: have Ploints resend it"
_LAPSED = "processed after its claim lapsed (slower than its lease); a retry may process it again"


class Processor:
    """Claims, runs, settles and notifies for one instance on one app.

    :param name: the instance's name, passed to every signal.
    :param settings: the instance's checked settings.
    :param store: where the instance's event ids are claimed.
    :param dispatcher: where claimed events are processed: inline, or
        handed to a worker.
    :param handlers: the instance's handlers, which a worker runs.
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        store: DedupeStore,
        dispatcher: Dispatcher,
        handlers: Handlers,
    ) -> None:
        self.name = name
        self.store = store
        self.dispatcher = dispatcher
        self.handlers = handlers
        self._retention = settings.retention
        self._slow = settings.slow_handler_seconds
        # Only an event handed to a worker can end up failed in the store,
        # where its payload is kept for replay; an inline failure releases
        # the claim, so the store would hold the body for nothing.
        self._keep_payload = not dispatcher.runs_inline
        #: How the instance's event ids become store keys.
        self.namespace = Namespace(name, settings.namespace)
        self._replay_name = "" if name == "ploints" else f" --name {shlex.quote(name)}"
        self._scopes = tuple(
            part.handler_scope for part in (store, dispatcher) if isinstance(part, HandlerScope)
        )
        # A store that commits with the handlers' writes holds its claim in
        # their transaction, wherever they run.
        self._hold = store.hold if isinstance(store, TransactionalStore) else None
        # A store that takes latest_by's turns with the claim, for handlers
        # that run here, in this context (where their guards find them).
        self._turns_store: TurnsWithClaims | TurnsWithHeldClaims | None = None
        takes_turns = TurnsWithClaims if self._hold is None else TurnsWithHeldClaims
        if isinstance(dispatcher, SyncDispatcher) and isinstance(store, takes_turns):
            self._turns_store = store

    def deliver(self, app: Flask, event: Event) -> Result:
        """Process a delivery: claim its id, then run it here or hand it
        to a worker. A handler failure releases the claim, so the sender's
        retry runs the event again.

        :return: any :class:`Outcome`.
        """
        payload = event.raw if self._keep_payload else None
        return self._process(app, event, payload, _Settle.RELEASE, None)

    def rerun(self, app: Flask, event: Event, previous_error: str | None = None) -> Result:
        """Process an event again outside a delivery (a replay, the delivery
        log's button), through the same claim, dispatcher and settling. A
        handler failure records the event failed, with its traceback and
        payload, so it can be found and replayed again.

        :param previous_error: the error recorded when the event last failed;
            kept if the event cannot be handed to a worker now.
        :return: any :class:`Outcome`.
        """
        return self._process(app, event, event.raw, _Settle.FAIL, previous_error)

    def resume(self, app: Flask, event: Event, token: str) -> Result:
        """Run a queued event on a worker, holding the claim the endpoint
        took with ``token``. If that claim lapsed (the task waited longer
        than the lease), the id is claimed again; if it was processed or is
        held by another delivery meanwhile, nothing runs. A transactional
        store takes that durable claim over in the handlers' transaction.

        A handler failure keeps the claim (:attr:`~Outcome.FAILED`, with the
        token now held): the worker retries after :meth:`keep`, or ends
        with :meth:`give_up`.
        """
        lease = self.dispatcher.lease
        key = self._key(event)
        try:
            # Durably first: a failed run's retry needs a claim to keep.
            if not self.store.extend(key, token, lease):
                claim = self.store.claim(key, lease, event.raw)
                if claim.status is not ClaimStatus.CLAIMED:
                    return self._skipped(event, claim)
                _log(logging.WARNING, event, None, None, _LAPSED_IN_QUEUE)
                token = claim.token
            if self._hold is not None:
                claim = self._hold(key, lease, event.raw, self._retention, token)
                if claim.status is not ClaimStatus.CLAIMED:
                    return self._skipped(event, claim)
                token = claim.token
        except Exception as exc:
            _log(logging.WARNING, event, _UNAVAILABLE, None, "not run: the dedupe store failed")
            return Result(Outcome.UNAVAILABLE, error=exc)

        error, duration, pending = self._run(
            event, token, None, self.handlers.run, app, event, self.name
        )
        if error is not None:
            return Result(Outcome.FAILED, error=error, duration=duration, token=token)
        return self._processed(app, event, key, token, duration, pending)

    def keep(self, event: Event, token: str) -> bool:
        """Renew a worker's claim for the wait before its next attempt.

        :return: ``False`` when ``token`` no longer holds the claim.
        :raises flask_ploints._errors.StoreError: the store is unavailable.
        """
        return self.store.extend(self._key(event), token, self.dispatcher.lease)

    def give_up(
        self,
        app: Flask,
        event: Event,
        token: str,
        error: BaseException,
        *,
        attempts: int,
        handlers_ran: bool,
        duration: float = 0.0,
        note: str = "",
    ) -> bool:
        """End a worker's attempts: record the event failed with ``error``'s
        traceback and ``note``, log it, and send
        :data:`~flask_ploints.signals.handler_failed` if the handlers ran
        (not when the store failed before them).

        :return: whether the store recorded the failure.
        """
        failed = self._fail(event, token, error_text(error) + note, attempts)
        ran = "" if handlers_ran else " (its handlers did not run)"
        # Quoted for a shell: the id is the sender's text.
        replay = shlex.join([event.id] + (["--account", event.account] if event.account else []))
        end = _RECORDED % (replay + self._replay_name) if failed else _NOT_RESENT
        took = duration if handlers_ran else None
        _log(
            logging.ERROR, event, Outcome.FAILED, took, _GAVE_UP, attempts, ran, end, exc_info=error
        )
        if handlers_ran:
            self._failed(app, event, error, duration)
        return failed

    def _key(self, event: Event) -> str:
        return self.namespace.key(event.id, event.account)

    def _skipped(self, event: Event, claim: Claim) -> Result:
        result = _DUPLICATE if claim.status is ClaimStatus.DONE else _IN_FLIGHT
        _log(logging.INFO, event, result.outcome, None, _SKIPPED, claim.status.value)
        return result

    def _not_claimed(self, app: Flask, event: Event, claim: Claim) -> Result:
        if claim.status is ClaimStatus.DONE:
            _log(logging.INFO, event, Outcome.DUPLICATE, None, "skipped: duplicate")
            notify(signals.duplicate_skipped, app, self.name, event=event)
            return _DUPLICATE
        _log(logging.INFO, event, Outcome.IN_FLIGHT, None, "skipped: in flight")
        return Result(Outcome.IN_FLIGHT, retry_after=claim.retry_after)

    def _process(
        self,
        app: Flask,
        event: Event,
        payload: bytes | None,
        settle: _Settle,
        previous_error: str | None,
    ) -> Result:
        key = self._key(event)
        inline = self.dispatcher.runs_inline
        # The turns of its latest_by handlers, when the store takes them
        # with the claim.
        turns = None
        if self._turns_store is not None and event.type in self.handlers.guards:
            turns = self._turns(event)
        try:
            if turns is not None:
                claim = turns.claim(key, payload)
            elif inline and self._hold is not None:
                claim = self._hold(key, self.dispatcher.lease, payload, self._retention)
            else:
                claim = self.store.claim(key, self.dispatcher.lease, payload)
        except Exception as exc:
            _log(logging.ERROR, event, _UNAVAILABLE, None, _NOT_CLAIMED, exc_info=True)
            return Result(Outcome.UNAVAILABLE, error=exc)
        if claim.status is not ClaimStatus.CLAIMED:
            return self._not_claimed(app, event, claim)
        if not inline:
            try:
                self.dispatcher.dispatch(app, event, claim, self.name)
            except BaseException as exc:
                # A re-run stays failed with the error it had, rather than a
                # claim that lapses and takes the payload with it.
                self._settle(event, claim.token, settle, previous_error or "not run: not queued")
                if not isinstance(exc, DispatchError):
                    raise
                _log(logging.ERROR, event, _UNAVAILABLE, None, "could not be queued", exc_info=True)
                return Result(Outcome.UNAVAILABLE, error=exc)
            _log(logging.INFO, event, Outcome.QUEUED, None, "queued")
            return _QUEUED

        error, duration, pending = self._run(
            event, claim.token, turns, self.dispatcher.dispatch, app, event, claim, self.name
        )
        if isinstance(error, KeyBusy):
            # Not a failure: another delivery holds a latest_by key.
            self._release(event, claim.token, turns)
            _log(logging.INFO, event, Outcome.IN_FLIGHT, duration, "skipped: %s", error)
            return Result(Outcome.IN_FLIGHT, retry_after=error.retry_after)
        if error is not None:
            self._settle(event, claim.token, settle, error, turns)
            _log(logging.ERROR, event, Outcome.FAILED, duration, _RAISED, error, exc_info=error)
            return self._failed(app, event, error, duration)
        if duration > self._slow:
            _log(logging.WARNING, event, None, duration, _SLOW, duration, SENDER_TIMEOUT)
        return self._processed(app, event, key, claim.token, duration, pending, turns)

    def _turns(self, event: Event) -> Turns:
        """The turns of ``event``'s ``latest_by`` handlers, to take with its
        claim.
        """
        assert self._turns_store is not None
        guards = self.handlers.guards[event.type]
        lease = self.dispatcher.lease
        key_of = self.namespace.key
        held = self._hold is not None
        return Turns(self._turns_store, event, guards, key_of, lease, self._retention, held)

    def _processed(
        self,
        app: Flask,
        event: Event,
        key: str,
        token: str,
        duration: float,
        pending: list[t.Callable[[], object]],
        turns: Turns | None = None,
    ) -> Result:
        try:
            if turns is None:
                committed = self.store.commit(key, token, self._retention)
            else:
                committed = turns.commit(key, token)
        except Exception as exc:
            if self._hold is not None:
                _log(logging.ERROR, event, _UNAVAILABLE, duration, _ROLLED_BACK, exc_info=True)
                return Result(Outcome.UNAVAILABLE, error=exc, duration=duration)
            # The handlers' effects are done: answering an error now would
            # make the sender retry them, so a failed commit is only logged.
            _log(logging.ERROR, event, _PROCESSED_OUTCOME, duration, _NOT_COMMITTED, exc_info=True)
        else:
            if not committed:
                _log(logging.WARNING, event, _PROCESSED_OUTCOME, duration, _LAPSED)
        _log(logging.INFO, event, _PROCESSED_OUTCOME, duration, "processed")
        effects.run(pending, event)
        notify(signals.event_processed, app, self.name, event=event, duration=duration)
        return _PROCESSED

    def _settle(
        self,
        event: Event,
        token: str,
        settle: _Settle,
        error: str | BaseException,
        turns: Turns | None = None,
    ) -> None:
        if settle is _Settle.RELEASE:
            self._release(event, token, turns)
        else:
            self._end_turns(event, turns)
            self._fail(event, token, error if isinstance(error, str) else error_text(error))

    def _run(
        self,
        event: Event,
        token: str,
        turns: Turns | None,
        run: t.Callable[..., object],
        *args: t.Any,
    ) -> tuple[BaseException | None, float, list[t.Callable[[], object]]]:
        """Call ``run(*args)`` inside the handler scopes, with ``turns``
        for the guards, and return what it raised (``None`` when nothing),
        the seconds it took and its
        :func:`~flask_ploints._effects.after_commit` calls. A process exit
        releases the claim and goes on.
        """
        started = time.perf_counter()
        pending, collecting = effects.collect()
        # Set even when None: a delivery nested in a handler (a replay) has
        # turns of its own, or none.
        outer, running.turns = running.turns, turns
        try:
            if self._scopes:
                with contextlib.ExitStack() as stack:
                    for scope in self._scopes:
                        stack.enter_context(scope(event))
                    run(*args)
            else:
                run(*args)
        except HandlerError as exc:
            error: BaseException | None = exc.__cause__ or exc
        except _PROCESS_EXITS:
            self._release(event, token, turns)
            raise
        except BaseException as exc:
            # Whatever is not a process exit is the handler's failure, an
            # async handler's CancelledError included.
            error = exc
        else:
            error = None
        finally:
            running.turns = outer
            effects.finish(collecting)
        return error, time.perf_counter() - started, pending

    def _failed(self, app: Flask, event: Event, error: BaseException, duration: float) -> Result:
        notify(
            signals.handler_failed, app, self.name, event=event, exception=error, duration=duration
        )
        return Result(Outcome.FAILED, error=error, duration=duration)

    def _release(self, event: Event, token: str, turns: Turns | None = None) -> None:
        self._end_turns(event, turns)
        try:
            self.store.release(self._key(event), token)
        except Exception:
            # The lease runs out on its own; the retry after that succeeds.
            _log(logging.ERROR, event, None, None, _NOT_RELEASED, exc_info=True)

    def _end_turns(self, event: Event, turns: Turns | None) -> None:
        if turns is None:
            return
        try:
            turns.end()
        except Exception:
            # Their lease runs out on its own, as the claim's does.
            _log(logging.ERROR, event, None, None, _TURNS_NOT_ENDED, exc_info=True)

    def _fail(self, event: Event, token: str, error: str, attempts: int | None = None) -> bool:
        try:
            return self.store.fail(
                self._key(event), token, error, self._retention, attempts=attempts
            )
        except Exception:
            _log(logging.ERROR, event, None, None, _NOT_RECORDED, exc_info=True)
            return False
