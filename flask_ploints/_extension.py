"""The :class:`PlointsWebhooks` extension."""

from __future__ import annotations

import inspect
import typing as t
import warnings

from flask import Blueprint
from flask import Flask

from ._compat import exempt_from_protections
from ._compat import exempt_on_first_delivery
from ._config import DEFAULTS
from ._config import DELIVERY_LOG_DEFAULTS
from ._config import Settings
from ._config import load_settings
from ._dispatch import Dispatcher
from ._dispatch import Handlers
from ._dispatch import SyncDispatcher
from ._errors import ConfigError
from ._errors import PlointsWarning
from ._events import Event
from ._events import check_event_types
from ._ordering import Guard
from ._ordering import require_ordered
from ._processing import Processor
from ._state import EXTENSION_KEY
from ._state import Receiver
from ._state import receiver_for
from ._state import receivers
from ._views import WebhookEndpoint
from .payloads import bind
from .stores import DedupeStore
from .stores import MemoryStore
from .stores import store_from_config

if t.TYPE_CHECKING:
    from ._tracing import Tracing

__all__ = ["PlointsWebhooks", "Receiver"]

_Handler = t.TypeVar("_Handler", bound=t.Callable[[Event], t.Any])
_Model = t.TypeVar("_Model")
_TypedHandler: t.TypeAlias = t.Callable[[Event, _Model], t.Any]
_OPTIONS = frozenset(argument for argument, _ in DEFAULTS.values())


class PlointsWebhooks:
    """Receives Ploints webhooks on a Flask app.

    .. code-block:: python

        webhooks = PlointsWebhooks(app)

        @webhooks.on("points.earned")
        def award(event):
            ...

    Settings come from keyword arguments first, then the app's ``PLOINTS_*``
    config keys, then the defaults; see :data:`flask_ploints._config.DEFAULTS`.
    Several instances can serve one app (two Ploints accounts) if each has
    its own ``name`` and ``url``.

    :param app: the app to set up now; or call :meth:`init_app` later.
    :param name: names this instance's blueprint, its state in
        ``app.extensions["ploints"]`` and the ``name`` argument of signals.
    :param options: one keyword per config key, each overriding its key on
        every app: ``secret``, ``url``, ``store``, ``namespace``, ``retention``, ``lease``,
        ``dispatch``, ``max_bytes``, ``require_https``, ``max_event_age``,
        ``slow_handler_share``, ``memory_store_max_entries``,
        ``redis_prefix``, ``metrics``, ``opentelemetry``, ``trace_context``, ``sql_table``, ``sql_timeout``, ``celery_app``,
        ``celery_queue``, ``celery_lease``, ``celery_publish_timeout``,
        ``celery_max_retries``, ``celery_retry_backoff`` and
        ``celery_retry_backoff_max``; see :doc:`/configuration`. The
        delivery log's keys are per app and have none.
    :raises TypeError: an unknown option.
    """

    def __init__(
        self, app: Flask | None = None, *, name: str = "ploints", **options: t.Any
    ) -> None:
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_OPTIONS))}"
            )
        self.name = name
        self.options = options
        self.handlers = Handlers()
        # The stores of the apps set up so far, for handlers registered
        # with latest_by afterwards; and whether any was registered before.
        self._stores: list[DedupeStore] = []
        self._ordered = False
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Check the settings, build the dedupe store and register the
        endpoint on ``app``.

        :raises RuntimeError: this instance, or another of the same name, is
            registered on ``app`` already.
        :raises ConfigError: a setting is missing or wrong; the message names
            the key.
        """
        registered = receivers(app)
        if self.name in registered:
            raise RuntimeError(
                f"a PlointsWebhooks instance named {self.name!r} is already registered on this app;"
                " give a second instance its own name and url"
            )
        for key, (_, default) in DEFAULTS.items():
            app.config.setdefault(key, default)
        for key, default in DELIVERY_LOG_DEFAULTS.items():
            app.config.setdefault(key, default)
        settings = load_settings(app.config, self.options)
        if any(other.settings.url == settings.url for other in registered.values()):
            raise ConfigError(
                f"PLOINTS_WEBHOOK_URL {settings.url!r} is used by another PlointsWebhooks instance"
            )
        store = self._make_store(app, settings)
        if self._ordered:
            require_ordered(store)
        tracing = _make_tracing(settings)
        # With tracing on, the handlers run each in its span.
        handlers = self.handlers if tracing is None else tracing.handlers(self.handlers)
        dispatcher = self._make_dispatcher(app, settings, handlers, tracing)
        self._connect_observers(app, settings)
        _init_delivery_log(app)
        processor = (
            Processor(self.name, settings, store, dispatcher, handlers)
            if tracing is None
            else tracing.processor(self.name, settings, store, dispatcher, handlers)
        )
        blueprint = Blueprint(self.name, __name__)
        blueprint.add_url_rule(
            settings.url,
            "receive",
            view_func=WebhookEndpoint(self.name, settings, processor).receive,
            methods=WebhookEndpoint.methods,
            # OPTIONS too gets the endpoint's JSON 405, not Flask's answer.
            provide_automatic_options=False,
        )
        # A delivery is signed and carries no CSRF token: app-wide CSRF
        # checks and rate limits set up before or after this one skip it.
        exempt_on_first_delivery(blueprint)
        app.register_blueprint(blueprint)
        exempt_from_protections(app, blueprint)
        app.extensions.setdefault(EXTENSION_KEY, registered)[self.name] = Receiver(
            name=self.name,
            settings=settings,
            store=store,
            dispatcher=dispatcher,
            handlers=self.handlers,
            processor=processor,
        )
        self._stores.append(store)

    def _make_store(self, app: Flask, settings: Settings) -> DedupeStore:
        try:
            store = store_from_config(settings.store, settings.values)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if isinstance(store, MemoryStore) and not app.testing:
            warnings.warn(
                "flask-ploints is using MemoryStore, which dedupes within one process only: with"
                " several workers or hosts a retry can be processed twice. Set"
                " PLOINTS_DEDUPE_STORE to a Redis or database URL in production.",
                PlointsWarning,
                stacklevel=3,
            )
        return store

    def _connect_observers(self, app: Flask, settings: Settings) -> None:
        if settings.values["PLOINTS_METRICS"] is not False:
            # Imported here: prometheus_client is an optional extra.
            from .metrics import connect_metrics

            try:
                connect_metrics(app, settings.values["PLOINTS_METRICS"])
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def _make_dispatcher(
        self, app: Flask, settings: Settings, handlers: Handlers, tracing: Tracing | None
    ) -> Dispatcher:
        if settings.dispatch == "sync":
            return SyncDispatcher(handlers, settings.lease)
        if isinstance(settings.dispatch, Dispatcher):
            return settings.dispatch
        if settings.dispatch == "celery":
            # Imported here: celery is an optional extra.
            from ._celery import CeleryDispatcher

            return CeleryDispatcher.from_app(app, settings, tracing)
        raise ConfigError(
            f"PLOINTS_DISPATCH must be 'sync', 'celery' or a dispatcher, not {settings.dispatch!r}"
        )

    @t.overload
    def on(
        self,
        *event_types: str,
        latest_by: t.Callable[[Event], object] | None = None,
        name: str | None = None,
    ) -> t.Callable[[_Handler], _Handler]: ...

    @t.overload
    def on(
        self,
        *event_types: str,
        model: type[_Model],
        latest_by: t.Callable[[Event], object] | None = None,
        name: str | None = None,
    ) -> t.Callable[[_TypedHandler[_Model]], _TypedHandler[_Model]]: ...

    def on(
        self,
        *event_types: str,
        model: type[t.Any] | None = None,
        latest_by: t.Callable[[Event], object] | None = None,
        name: str | None = None,
    ) -> t.Any:
        """Register a handler for one or more event types.

        The handler receives the :class:`~flask_ploints.Event`, may be
        ``async def``, and is held strongly. If it raises, the delivery is
        answered ``500`` and Ploints retries it, so handlers must be
        idempotent.

        :param event_types: documented event types.
        :param model: a dataclass (or pydantic model) for the event's data;
            the handler then receives ``(event, payload)`` with the data
            converted, and data that does not fit counts as a handler
            failure. See :mod:`flask_ploints.payloads`.
        :param latest_by: returns the entity the handler writes (``lambda
            e: e.data["customerEmail"]``): for each value, the handler
            applies events in timestamp order and skips one strictly older
            than the newest it applied. See :doc:`/ordering`.
        :param name: with ``latest_by``, the handler's identity in the
            store; default, its module and qualified name. Renaming it
            starts afresh.
        :raises ValueError: no type, or an unknown one; ``name`` without
            ``latest_by``.
        :raises ConfigError: ``latest_by`` with a store that cannot keep it
            (``PLOINTS_DEDUPE_STORE``).

        .. versionchanged:: 0.2
            The ``latest_by`` and ``name`` parameters.
        """
        event_types = check_event_types(event_types)
        if latest_by is None and name is not None:
            raise ValueError("name= names a handler's order, and goes with latest_by=")
        if latest_by is not None:
            for store in self._stores:
                require_ordered(store)
            self._ordered = True

        def decorator(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
            handler = func if model is None else bind(func, model)
            if latest_by is not None:
                handler = Guard(
                    handler,
                    latest_by,
                    name or f"{func.__module__}.{func.__qualname__}",
                    self.name,
                    inspect.iscoroutinefunction(handler),
                    self.receiver,
                )
            self.handlers.connect(event_types, handler)
            return func

        return decorator

    def on_any(self, func: _Handler) -> _Handler:
        """Register a handler for every verified event, including types this
        version does not know. It runs after the type's own handlers.
        """
        self.handlers.connect_any(func)
        return func

    def receiver(self, app: Flask | None = None) -> Receiver:
        """Return what this instance set up on ``app`` (default: the current
        app).

        :raises RuntimeError: :meth:`init_app` was not called for the app.
        """
        return receiver_for(app, self.name)


def _make_tracing(settings: Settings) -> Tracing | None:
    """Apply ``PLOINTS_OPENTELEMETRY``: ``None`` when it is off."""
    setting = settings.values["PLOINTS_OPENTELEMETRY"]
    if setting is False:
        return None
    # Imported only now: opentelemetry-api is an optional extra.
    try:
        from ._tracing import Tracing
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return Tracing.from_setting(setting)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _init_delivery_log(app: Flask) -> None:
    """Set up the delivery log when ``PLOINTS_DELIVERY_LOG`` is set, once
    per app whichever instance comes first: one log and one page serve every
    instance, and its rows carry the instance's name.
    """
    if app.config["PLOINTS_DELIVERY_LOG"] in (None, False):
        return
    # Imported only now: the package needs SQLAlchemy, an optional extra.
    try:
        from .delivery_log._configure import init_delivery_log
    except ImportError as exc:
        raise ConfigError(f"PLOINTS_DELIVERY_LOG: {exc}") from None
    init_delivery_log(app)
