"""Processing events on Celery workers: ``PLOINTS_DISPATCH = "celery"``.

The endpoint claims a delivery's id for ``PLOINTS_CELERY_LEASE``, publishes
one task :data:`TASK_NAME` with publisher confirms and a short timeout, and
answers ``202`` (or ``503`` when the broker does not confirm). A worker runs
the task through :meth:`~flask_ploints.processing.Processor.resume`, retries
a failing event with backoff, and records it failed when its attempts are
spent. How it behaves, what it guarantees and how to run it are in
:doc:`/celery`.

Needs Celery: ``pip install 'flask-ploints[celery]'``. Importing
:mod:`flask_ploints` never imports this module.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t
import weakref
from dataclasses import dataclass
from dataclasses import field

from flask import Flask
from flask import current_app
from flask import has_app_context

from .config import CelerySettings
from .config import ConfigError
from .config import Settings
from .errors import DispatchError
from .errors import PlointsError
from .events import Event
from .events import InvalidEvent
from .events import parse_event
from .processing import Outcome
from .signature import sign
from .signature import verify
from .state import Receiver
from .state import receiver_for
from .state import receivers

try:
    import celery  # type: ignore[import-untyped]
    from celery.exceptions import Retry  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PLOINTS_DISPATCH = 'celery' needs Celery; install it with:"
        " pip install 'flask-ploints[celery]'"
    ) from exc

if t.TYPE_CHECKING:
    from .stores import Claim

__all__ = ["TASK_NAME", "CeleryDispatcher"]

logger = logging.getLogger("flask_ploints")

#: The name of the task registered on the Celery app. Its arguments are the
#: instance's name, the event's raw body as a string, the claim's token, and
#: the proof that the endpoint verified the body: its HMAC-SHA256 under the
#: instance's current secret, as the sender signs it.
TASK_NAME = "flask_ploints.process_event"


class _Publisher:
    """Publishes tasks over connections of its own, made from the Celery
    app's broker settings with publisher confirms on and every network step
    bounded by ``timeout``. The app's own pool is left as its owner set it.
    """

    def __init__(self, celery_app: t.Any, timeout: float) -> None:
        self.celery_app = celery_app
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pool: t.Any = None
        self._pid = 0

    def _connection(self) -> t.Any:
        options = dict(self.celery_app.conf.broker_transport_options or {})
        # Building a connection object does not connect.
        probe = self.celery_app.connection_for_write()
        # One attempt per broker URL, without sleeping in between: the
        # sender retries a 503 anyway, and kombu's loop of reconnects would
        # outlast its 10 s timeout.
        options["max_retries"] = max(len(probe.alt) - 1, 0)
        if probe.transport.driver_type == "amqp":
            # Passed to py-amqp's Connection: without confirms a message the
            # broker drops is never reported; without socket timeouts a
            # broker that accepts connections but never answers holds the
            # request.
            options.update(
                confirm_publish=True, read_timeout=self.timeout, write_timeout=self.timeout
            )
        else:
            options.update(socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        return self.celery_app.connection_for_write(
            connect_timeout=self.timeout, transport_options=options
        )

    def _pool_here(self) -> t.Any:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # After a fork the parent's connections are the parent's:
                # they are dropped unclosed, since closing them would close
                # them for the parent too.
                self._pool = self._connection().Pool(limit=self.celery_app.conf.broker_pool_limit)
                self._pid = os.getpid()
            return self._pool

    def close(self) -> None:
        """Close the pooled connections of this process."""
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None and self._pid == os.getpid():
                pool.force_close_all()

    def publish(
        self, task: t.Any, args: tuple[t.Any, ...], *, pooled: bool, **options: t.Any
    ) -> None:
        """Publish one message of ``task`` and wait for the broker's confirm.

        :param pooled: take a connection from the pool (the endpoint), or
            use a new one that cannot have gone stale (the worker, which
            publishes rarely and must not lose a retry to a dead socket).
        :raises Exception: whatever the broker client raised.
        """
        if pooled:
            connection = self._pool_here().acquire(block=True, timeout=self.timeout)
        else:
            connection = self._connection()
        try:
            task.apply_async(
                args,
                connection=connection,
                retry=False,
                timeout=self.timeout,
                confirm_timeout=self.timeout,
                add_to_parent=False,
                **options,
            )
        except BaseException:
            # A confirm may still be on its way or a frame half written: the
            # next publish must not share this connection's state.
            connection.collect()
            raise
        finally:
            connection.release()


class CeleryDispatcher:
    """Hands each claimed event to a Celery worker; see the module.

    Built by the extension when ``PLOINTS_DISPATCH`` is ``"celery"``; the
    Celery app gets the task :data:`TASK_NAME` once, whatever the number of
    instances or Flask apps using it.

    :param celery_app: the Celery app to publish to and register the task on.
    :param settings: the instance's ``PLOINTS_CELERY_*`` settings.
    :param secret: the instance's current secret, which signs each task's
        body so that the worker runs only what an endpoint verified.

    .. versionchanged:: 0.2
        The ``secret`` parameter; tasks carry their proof.
    """

    runs_inline = False

    def __init__(self, celery_app: t.Any, settings: CelerySettings, secret: str) -> None:
        self.celery_app = celery_app
        self.settings = settings
        self._secret = secret
        #: ``PLOINTS_CELERY_LEASE``: the claim covers the wait in the queue,
        #: not only the handlers.
        self.lease = settings.lease
        self.task = _task_for(celery_app)
        self._publisher = _Publisher(celery_app, settings.publish_timeout)

    @classmethod
    def from_app(cls, app: Flask, settings: Settings) -> CeleryDispatcher:
        """Build the dispatcher of one instance on ``app``, with the Celery
        app of ``PLOINTS_CELERY_APP`` or else ``app.extensions["celery"]``.

        :raises ConfigError: neither is set, or it is not a Celery app.
        """
        celery_app = settings.celery.app
        where = "PLOINTS_CELERY_APP"
        if celery_app is None:
            celery_app = app.extensions.get("celery")
            where = 'app.extensions["celery"]'
        if celery_app is None:
            raise ConfigError(
                "PLOINTS_DISPATCH is 'celery' but there is no Celery app: set PLOINTS_CELERY_APP"
                ' to your celery.Celery instance, or put it in app.extensions["celery"] before'
                " init_app (as Flask's celery_init_app does)"
            )
        if not isinstance(celery_app, celery.Celery):
            raise ConfigError(
                f"{where} must be a celery.Celery instance, not {type(celery_app).__name__}"
            )
        dispatcher = cls(celery_app, settings.celery, settings.secrets[0])
        _bind(celery_app, app)
        return dispatcher

    def dispatch(self, app: Flask, event: Event, claim: Claim, name: str) -> None:
        """Publish the event's task and wait for the broker to confirm it.

        :raises DispatchError: the broker could not be reached, refused the
            message or did not confirm it in time.
        """
        try:
            self._publish(name, event.raw, claim.token, pooled=True)
        except Exception as exc:
            raise DispatchError(f"could not queue event {event.id} on Celery: {exc!r}") from exc

    def close(self) -> None:
        """Close the broker connections this dispatcher keeps for publishing.
        A later delivery opens new ones.
        """
        self._publisher.close()

    def _publish(
        self, name: str, raw: bytes, token: str, *, pooled: bool, **options: t.Any
    ) -> None:
        if self.settings.queue is not None:
            options["queue"] = self.settings.queue
        # The body is valid UTF-8 (parse_event checked it), so the string
        # encodes back to the exact bytes that were signed.
        args = (name, raw.decode("utf-8"), token, sign(raw, self._secret))
        self._publisher.publish(self.task, args, pooled=pooled, **options)


@dataclass
class _Binding:
    """What the worker needs to find the Flask app of a task. Held weakly,
    so that an app and its Celery app can be collected.
    """

    task: weakref.ref[t.Any]
    apps: list[weakref.ref[Flask]] = field(default_factory=list)


_bindings: weakref.WeakKeyDictionary[t.Any, _Binding] = weakref.WeakKeyDictionary()
_bindings_lock = threading.Lock()


def _task_for(celery_app: t.Any) -> t.Any:
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


def _bind(celery_app: t.Any, app: Flask) -> None:
    with _bindings_lock:
        binding = _bindings[celery_app]
        binding.apps = [ref for ref in binding.apps if ref() not in (None, app)]
        binding.apps.append(weakref.ref(app))


def _serves(app: Flask, celery_app: t.Any, name: str) -> bool:
    receiver = receivers(app).get(name)
    return (
        receiver is not None
        and isinstance(receiver.dispatcher, CeleryDispatcher)
        and receiver.dispatcher.celery_app is celery_app
    )


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


def _process_event(task: t.Any, name: str, body: str, token: str, proof: str | None = None) -> None:
    app = _flask_app(task.app, name)
    with app.app_context():
        _Attempt(task, app, receiver_for(app, name), body, token).run(proof)


class _Attempt:
    """One run of the task for one event: the processor runs it, and this
    turns its outcome into a retry or the end of the attempts.
    """

    def __init__(self, task: t.Any, app: Flask, receiver: Receiver, body: str, token: str) -> None:
        self.task = task
        self.app = app
        self.name = receiver.name
        self.processor = receiver.processor
        self.dispatcher = t.cast(CeleryDispatcher, receiver.dispatcher)
        self.settings = self.dispatcher.settings
        self.secrets = receiver.settings.secrets
        self.body = body
        self.token = token
        self.retries = int(task.request.retries or 0)

    def run(self, proof: str | None) -> None:
        raw = self.body.encode("utf-8")
        try:
            event = parse_event(raw)
        except InvalidEvent as exc:
            # Only this package publishes the task, from a verified body.
            logger.error("task %s carries no valid event (%s); dropped", self.task.request.id, exc)
            return
        if not verify(raw, proof, self.secrets):
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
        if self.retries < self.settings.max_retries:
            delay = self.settings.retry_delay(self.retries)
            try:
                if handlers_ran and not self.processor.keep(event, self.token):
                    logger.warning("event %s (%s): claim lost while failing", event.id, event.type)
                    return
                self.dispatcher._publish(
                    self.name,
                    event.raw,
                    self.token,
                    pooled=False,
                    countdown=delay,
                    retries=self.retries + 1,
                    task_id=self.task.request.id,
                )
            except Exception as publish_exc:
                note = f"\nThe retry could not be queued: {publish_exc!r}\n"
                logger.exception("event %s (%s): retry not queued", event.id, event.type)
            else:
                logger.warning(
                    "event %s (%s) failed (attempt %d of %d); retrying in %g s: %r",
                    event.id,
                    event.type,
                    attempts,
                    self.settings.max_retries + 1,
                    delay,
                    exc,
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
