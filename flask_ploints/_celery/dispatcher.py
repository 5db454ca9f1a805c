"""The endpoint's side: :class:`CeleryDispatcher` hands each claimed event
to a Celery worker.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
import warnings

import celery  # type: ignore[import-untyped]
from flask import Flask

from .. import signals
from .._accounts import Accounts
from .._config import CelerySettings
from .._config import ConfigError
from .._config import Settings
from .._errors import DispatchError
from .._errors import PlointsWarning
from .._events import Event
from .._signature import sign
from ..signals import notify
from .publisher import Publisher
from .task import bind
from .task import task_for
from .visibility import visibility_timeout

if t.TYPE_CHECKING:
    from .._tracing import Tracing
    from ..stores import Claim

__all__ = ["CeleryDispatcher"]


class CeleryDispatcher:
    """Hands each claimed event to a Celery worker; see the module.

    Built by the extension when ``PLOINTS_DISPATCH`` is ``"celery"``; the
    Celery app gets the task :data:`TASK_NAME` once, whatever the number of
    instances or Flask apps using it.

    :param celery_app: the Celery app to publish to and register the task on.
    :param settings: the instance's ``PLOINTS_CELERY_*`` settings.
    :param secret: the instance's current secret, which signs each task's
        body so that the worker runs only what an endpoint verified.
    :param accounts: on an endpoint for many accounts, their secrets: an
        event's task is signed with its account's current secret.

    .. versionchanged:: 0.2
        The ``secret`` and ``accounts`` parameters; tasks carry their proof.
    """

    runs_inline = False

    def __init__(
        self,
        celery_app: t.Any,
        settings: CelerySettings,
        secret: str,
        accounts: Accounts | None = None,
    ) -> None:
        self.celery_app = celery_app
        self.settings = settings
        self._secret = secret
        self._accounts = accounts
        #: ``PLOINTS_CELERY_LEASE``: the claim covers the wait in the queue,
        #: not only the handlers.
        self.lease = settings.lease
        self.task = task_for(celery_app)
        self._publisher = Publisher(celery_app, settings.publish_timeout)
        #: With ``PLOINTS_OPENTELEMETRY`` on, what carries the trace context
        #: to the worker, and joins it there; else ``None``.
        self.tracing: Tracing | None = None

    @classmethod
    def from_app(
        cls, app: Flask, settings: Settings, tracing: Tracing | None = None
    ) -> CeleryDispatcher:
        """Build the dispatcher of one instance on ``app``, with the Celery
        app of ``PLOINTS_CELERY_APP`` or else ``app.extensions["celery"]``.

        :param tracing: carries the trace context in each task's headers.

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
        secret = settings.secrets[0] if settings.secrets else ""
        dispatcher = cls(celery_app, settings.celery, secret, settings.accounts)
        dispatcher.tracing = tracing
        _check_visibility_timeout(celery_app, settings.celery)
        bind(celery_app, app)
        return dispatcher

    def dispatch(self, app: Flask, event: Event, claim: Claim, name: str) -> None:
        """Publish the event's task and wait for the broker to acknowledge
        it (see :doc:`/celery`, "Choosing a broker").

        :raises DispatchError: the broker could not be reached, refused the
            message or did not confirm it in time.
        """
        try:
            self._publish(name, event.raw, claim.token, event.account, pooled=True)
        except Exception as exc:
            raise DispatchError(f"could not queue event {event.id} on Celery: {exc!r}") from exc
        notify(signals.event_queued, app, name, event=event)

    def close(self) -> None:
        """Close the broker connections this dispatcher keeps for publishing.
        A later delivery opens new ones.
        """
        self._publisher.close()

    def republish(
        self,
        name: str,
        raw: bytes,
        token: str,
        account: str | None = None,
        path: str | None = None,
        **options: t.Any,
    ) -> None:
        """Publish an event's task again, for a worker's retry, on a new
        connection that cannot have gone stale. ``path`` is the URL path of
        the event's delivery, on an endpoint for many accounts.

        :raises Exception: whatever the broker client raised.
        """
        self._publish(name, raw, token, account, pooled=False, path=path, **options)

    def _publish(
        self,
        name: str,
        raw: bytes,
        token: str,
        account: str | None,
        *,
        pooled: bool,
        path: str | None = None,
        **options: t.Any,
    ) -> None:
        if self.settings.queue is not None:
            options["queue"] = self.settings.queue
        if self.tracing is not None:
            options["headers"] = self.tracing.headers()
        # The body is valid UTF-8 (parse_event checked it), so the string
        # encodes back to the exact bytes that were signed.
        args: tuple[str, ...]
        if account is None or self._accounts is None:
            args = (name, raw.decode("utf-8"), token, sign(raw, self._secret))
        else:
            secret, remembered = self._accounts.current(account)
            path = path or remembered
            args = (name, raw.decode("utf-8"), token, sign(raw, secret), account)
            if path is not None:
                args += (path,)
        self._publisher.publish(self.task, args, pooled=pooled, **options)


def _check_visibility_timeout(celery_app: t.Any, settings: CelerySettings) -> None:
    """Warn when a Redis broker would hand a retry waiting for its countdown
    to a second worker: the worker holds it unacknowledged until then (a
    running task's message is renewed, a waiting one's is not), and both
    copies carry the same claim token, so the handlers would run twice.
    """
    timeout = visibility_timeout(celery_app)
    if timeout is None:
        return
    longest_wait = settings.retry_delay(max(settings.max_retries - 1, 0))
    if settings.max_retries and timeout <= longest_wait:
        warnings.warn(
            f"the Redis broker's visibility_timeout ({timeout:g} s) is not longer than the"
            f" longest wait between retries ({longest_wait:g} s, from PLOINTS_CELERY_RETRY_BACKOFF"
            " and PLOINTS_CELERY_RETRY_BACKOFF_MAX): Redis gives a retry still waiting for its"
            " countdown to a second worker, and the handlers run twice; raise"
            " broker_transport_options['visibility_timeout']",
            PlointsWarning,
            # The caller of init_app.
            stacklevel=5,
        )
