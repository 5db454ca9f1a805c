"""The worker's side: the task, which Flask app runs it, and one attempt
at an event through the :class:`~flask_ploints._processing.Processor`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
import weakref
from dataclasses import dataclass
from dataclasses import field

from celery.exceptions import Retry  # type: ignore[import-untyped]
from flask import Flask
from flask import current_app
from flask import has_app_context

from .. import signals
from .._config import CelerySettings
from .._errors import PlointsError
from .._errors import SecretLookupError
from .._events import Event
from .._events import InvalidEvent
from .._events import parse_event
from .._logfields import REJECTED
from .._logfields import delivery_fields
from .._logfields import log_event
from .._processing import Outcome
from .._signature import verify
from .._state import Receiver
from .._state import receiver_for
from .._state import receivers
from ..signals import notify
from .visibility import kept_from_others

if t.TYPE_CHECKING:
    from .._tracing import Tracing

__all__ = ["TASK_NAME", "Republisher", "bind", "task_for"]

logger = logging.getLogger("flask_ploints")

#: The name of the task registered on the Celery app. Its arguments are the
#: instance's name, the event's raw body as a string, the claim's token, the
#: proof that the endpoint verified the body (its HMAC-SHA256 under the
#: instance's current secret, as the sender signs it, or its account's), and
#: on an endpoint for many accounts, the account's name and the URL path of
#: the delivery (the worker calls the lookup with the value it converts to).
TASK_NAME = "flask_ploints.process_event"


class Republisher(t.Protocol):
    """What a worker needs of the instance's dispatcher to queue a retry,
    and to join the trace of the delivery.
    """

    celery_app: t.Any
    settings: CelerySettings
    tracing: Tracing | None

    def republish(
        self,
        name: str,
        raw: bytes,
        token: str,
        account: str | None = None,
        path: str | None = None,
        **options: t.Any,
    ) -> None:
        """Publish the event's task again, on a new connection."""


@dataclass
class _Binding:
    """What the worker needs to find the Flask app of a task. Held weakly,
    so that an app and its Celery app can be collected.
    """

    task: weakref.ref[t.Any]
    apps: list[weakref.ref[Flask]] = field(default_factory=list)


_bindings: weakref.WeakKeyDictionary[t.Any, _Binding] = weakref.WeakKeyDictionary()
_bindings_lock = threading.Lock()


def task_for(celery_app: t.Any) -> t.Any:
    with _bindings_lock:
        binding = _bindings.get(celery_app)
        task = binding.task() if binding is not None else None
        if task is None:
            task = celery_app.task(
                name=TASK_NAME,
                bind=True,
                # The message is acknowledged once the task is settled, and
                # given back when the worker dies, so it is never lost.
                acks_late=True,
                reject_on_worker_lost=True,
                ignore_result=True,
                # Retries are counted and scheduled by _retry, per instance.
                max_retries=None,
                # Not on every Celery app, only this one; and now, not at
                # finalisation, so the dispatcher holds the real task.
                shared=False,
                lazy=False,
            )(_process_event)
            _bindings[celery_app] = _Binding(weakref.ref(task), binding.apps if binding else [])
        return task


def bind(celery_app: t.Any, app: Flask) -> None:
    with _bindings_lock:
        binding = _bindings[celery_app]
        binding.apps = [ref for ref in binding.apps if ref() not in (None, app)]
        binding.apps.append(weakref.ref(app))


def _serves(app: Flask, celery_app: t.Any, name: str) -> bool:
    receiver = receivers(app).get(name)
    return receiver is not None and getattr(receiver.dispatcher, "celery_app", None) is celery_app


def _flask_app(celery_app: t.Any, name: str) -> Flask:
    if has_app_context():
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        if _serves(app, celery_app, name):
            return app
    binding = _bindings.get(celery_app)
    for ref in reversed(binding.apps if binding is not None else []):
        found = ref()
        if found is not None and _serves(found, celery_app, name):
            return found
    raise RuntimeError(
        f"no Flask app in this worker has a PlointsWebhooks instance named {name!r} dispatching"
        " to this Celery app: the worker must import the module that builds the Flask app"
    )


def _process_event(
    task: t.Any,
    name: str,
    body: str,
    token: str,
    proof: str | None = None,
    account: str | None = None,
    path: str | None = None,
) -> None:
    app = _flask_app(task.app, name)
    with app.app_context(), kept_from_others(task):
        attempt = _Attempt(task, app, receiver_for(app, name), body, token, account, path)
        tracing = attempt.dispatcher.tracing
        if tracing is None:
            attempt.run(proof)
        else:
            with tracing.joined(task.request):
                attempt.run(proof)


class _Attempt:
    """One run of the task for one event: the processor runs it, and this
    turns its outcome into a retry or the end of the attempts.
    """

    def __init__(
        self,
        task: t.Any,
        app: Flask,
        receiver: Receiver,
        body: str,
        token: str,
        account: str | None,
        path: str | None = None,
    ) -> None:
        self.task = task
        self.app = app
        self.name = receiver.name
        self.processor = receiver.processor
        self.dispatcher = t.cast(Republisher, receiver.dispatcher)
        self.settings = self.dispatcher.settings
        self.instance_settings = receiver.settings
        self.account = account
        self.path = path
        self.body = body
        self.token = token
        self.retries = int(task.request.retries or 0)

    def run(self, proof: str | None) -> None:
        raw = self.body.encode("utf-8")
        try:
            event = parse_event(raw, self.account)
        except InvalidEvent as exc:
            # Only this package publishes the task, from a verified body.
            logger.error(
                "task %s carries no valid event (%s); dropped",
                self.task.request.id,
                exc,
                extra=delivery_fields(REJECTED, account=self.account),
            )
            return
        try:
            secrets = self._secrets()
        except SecretLookupError as exc:
            # The lookup may be back by the next attempt.
            self._retry(event, exc, handlers_ran=False)
            return
        if not verify(raw, proof, secrets):
            # Not published by an endpoint of this app (injected into the
            # broker), or by one with another secret: nothing runs. The
            # claim's holder, if the token is its own, records the event
            # failed with its payload, so a real event can be replayed.
            self.processor.give_up(
                self.app,
                event,
                self.token,
                PlointsError("the task carries no proof that an endpoint verified its body"),
                attempts=self.retries + 1,
                handlers_ran=False,
            )
            return
        accounts = self.instance_settings.accounts
        if accounts is None or self.account is None:
            self._resume(event)
        else:
            # A retry is signed with these secrets and keeps the path.
            with accounts.verified(self.account, secrets, self.path):
                self._resume(event)

    def _secrets(self) -> tuple[str, ...]:
        """The secrets that the task's proof is checked against: the
        instance's, or those of the task's account, which the lookup must
        name again from the delivery's URL path.
        """
        accounts = self.instance_settings.accounts
        if accounts is None:
            return self.instance_settings.secrets
        if self.account is None:
            return ()
        endpoint = f"{self.name}.receive"
        found = accounts.for_task(self.app, endpoint, self.account, self.path)
        return () if found is None else found[1]

    def _resume(self, event: Event) -> None:
        result = self.processor.resume(self.app, event, self.token)
        if result.outcome is Outcome.FAILED:
            assert result.error is not None
            self.token = result.token
            self._retry(event, result.error, handlers_ran=True, duration=result.duration)
        elif result.outcome is Outcome.UNAVAILABLE:
            assert result.error is not None
            self._retry(event, result.error, handlers_ran=False)

    def _retry(
        self, event: Event, exc: BaseException, *, handlers_ran: bool, duration: float = 0.0
    ) -> None:
        """Queue the next attempt and raise :class:`celery.exceptions.Retry`,
        or give up when the attempts are spent or the retry cannot be queued.
        """
        attempts = self.retries + 1
        note = ""
        outcome, took = (Outcome.FAILED, duration) if handlers_ran else (Outcome.UNAVAILABLE, None)
        if self.retries < self.settings.max_retries:
            delay = self.settings.retry_delay(self.retries)
            try:
                if handlers_ran and not self.processor.keep(event, self.token):
                    log_event(logging.WARNING, event, outcome, took, "lost its claim while failing")
                    return
                self.dispatcher.republish(
                    self.name,
                    event.raw,
                    self.token,
                    event.account,
                    path=self.path,
                    countdown=delay,
                    retries=self.retries + 1,
                    task_id=self.task.request.id,
                )
            except Exception as publish_exc:
                note = f"\nThe retry could not be queued: {publish_exc!r}\n"
                log_event(logging.ERROR, event, outcome, took, "retry not queued", exc_info=True)
            else:
                log_event(
                    logging.WARNING,
                    event,
                    outcome,
                    took,
                    "failed (attempt %d of %d); retrying in %g s: %r",
                    attempts,
                    self.settings.max_retries + 1,
                    delay,
                    exc,
                )
                notify(
                    signals.attempt_failed,
                    self.app,
                    self.name,
                    event=event,
                    exception=exc,
                    duration=took,
                    attempt=attempts,
                    attempts=self.settings.max_retries + 1,
                    retry_at=time.time() + delay,
                )
                raise Retry(exc=exc, when=delay)
        self.processor.give_up(
            self.app,
            event,
            self.token,
            exc,
            attempts=attempts,
            handlers_ran=handlers_ran,
            duration=duration,
            note=note,
        )
