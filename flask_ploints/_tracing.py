"""OpenTelemetry traces: ``PLOINTS_OPENTELEMETRY = True``.

When it is on, each instance makes these spans with the tracer
``flask_ploints``, each (but a fresh delivery's) a child of the span
current where it starts:

=====================  ========================================================
span                   where
=====================  ========================================================
``ploints.deliver``    a delivery, inside the request: the root of a new
                       trace, linked to the span current in the request
                       (``PLOINTS_TRACE_CONTEXT = "fresh"``, the default), or
                       its child (``"join"``)
``ploints.rerun``      a replay, or a re-run from the delivery log
``ploints.process``    a Celery worker's attempt at an event, in the trace of
                       the delivery that queued it
*the handler's name*   each handler, and each receiver of the event type's
                       signal (its ``__qualname__``)
=====================  ========================================================

The three event spans carry ``ploints.event.id``, ``ploints.event.type``,
``ploints.account`` (when the event has one), ``ploints.outcome`` (an
:class:`~flask_ploints._processing.Outcome` value), ``ploints.duplicate`` and
``ploints.in_flight``; their status is ``ERROR`` when the outcome is
``failed`` or ``unavailable``. A handler span records what its handler
raised, with status ``ERROR``; that of a ``latest_by`` handler that
skipped a stale event carries ``ploints.stale`` (``True``),
``ploints.stale.key`` and ``ploints.stale.newer`` (the newer timestamp, ISO
8601). With Celery dispatch the W3C trace context
(the globally configured propagator's headers) travels in each task
message's headers, so the worker's spans join the delivery's trace.

A delivery's trace starts fresh by default because the request's trace
context is the caller's: an instrumented app (opentelemetry-instrumentation-
flask, or code that extracts the ``traceparent`` and ``baggage`` headers
with the global propagator) makes it current before the signature is
checked, so anyone who can reach the endpoint would choose the trace the
handlers' spans join and the baggage they read. A fresh delivery runs in an
empty context: no baggage, a new trace id, and the incoming span only as a
link.

Needs ``opentelemetry-api``: ``pip install 'flask-ploints[otel]'``, plus an
SDK and exporter set up by the app. Imported only when the key is on.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import typing as t
from datetime import datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate
    from opentelemetry import trace
    from opentelemetry.propagators.textmap import Getter
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PLOINTS_OPENTELEMETRY needs opentelemetry-api; install it with:"
        " pip install 'flask-ploints[otel]'"
    ) from exc

from flask import Flask

from . import signals
from ._config import Settings
from ._config import redact
from ._dispatch import Handlers
from ._dispatch import WrappedHandlers
from ._events import Event
from ._outcomes import Outcome
from ._outcomes import Result
from ._processing import Processor

__all__ = [
    "DELIVER_SPAN",
    "PROCESS_SPAN",
    "RERUN_SPAN",
    "TRACER_NAME",
    "TracedProcessor",
    "Tracing",
]

#: The name of the tracer every span is made with.
TRACER_NAME = "flask_ploints"
#: The span of a delivery.
DELIVER_SPAN = "ploints.deliver"
#: The span of a replay or a re-run.
RERUN_SPAN = "ploints.rerun"
#: The span of a worker's attempt.
PROCESS_SPAN = "ploints.process"

_ERRORS = frozenset({Outcome.FAILED, Outcome.UNAVAILABLE})


def _version() -> str | None:
    try:
        return version("flask-ploints")
    except PackageNotFoundError:  # pragma: no cover - a source tree not installed
        return None


def event_attributes(event: Event) -> dict[str, str]:
    """Return the attributes that name ``event`` on its spans."""
    attributes = {"ploints.event.id": event.id, "ploints.event.type": event.type}
    # An attribute cannot be None: an event of a single-account endpoint has
    # no account attribute.
    if event.account is not None:
        attributes["ploints.account"] = event.account
    return attributes


def set_outcome(span: trace.Span, result: Result) -> None:
    """Record ``result`` on ``span``: its outcome and flags, and an
    ``ERROR`` status when the event failed or could not be processed.
    """
    outcome = result.outcome
    span.set_attribute("ploints.outcome", outcome.value)
    span.set_attribute("ploints.duplicate", outcome is Outcome.DUPLICATE)
    span.set_attribute("ploints.in_flight", outcome is Outcome.IN_FLIGHT)
    if outcome in _ERRORS:
        if outcome is Outcome.UNAVAILABLE and result.error is not None:
            # A handler's exception is recorded on its own span.
            span.record_exception(result.error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{outcome.value}: {result.error!r}"))


class _RequestGetter(Getter[t.Any]):
    """Reads a Celery task request's message headers, which Celery makes
    attributes of the request.
    """

    def get(self, carrier: t.Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        if value is None:
            return None
        return [value] if isinstance(value, str) else list(value)

    def keys(self, carrier: t.Any) -> list[str]:
        return []


_REQUEST_GETTER = _RequestGetter()


def _mark_stale(sender: Flask, *, newer: datetime, key: str, **extra: t.Any) -> None:
    """Mark the span of a ``latest_by`` handler that skipped a stale event."""
    span = trace.get_current_span()
    span.set_attribute("ploints.stale", True)
    span.set_attribute("ploints.stale.key", key)
    span.set_attribute("ploints.stale.newer", newer.isoformat())


class Tracing:
    """The tracer of one instance on one app, and what makes its spans.

    :param provider: the tracer provider; ``None`` for the global one, as
        set by the app (or by the OpenTelemetry distro) at any time.
    """

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer(TRACER_NAME, _version(), tracer_provider=provider)
        # Once for every app: outside a recording span it does nothing.
        signals.handler_skipped_stale.connect(_mark_stale, weak=False)

    @classmethod
    def from_setting(cls, setting: object) -> Tracing:
        """Apply ``PLOINTS_OPENTELEMETRY``: ``True`` for the global tracer
        provider, or a :class:`~opentelemetry.trace.TracerProvider`.

        :raises ValueError: any other value.
        """
        if setting is True:
            return cls()
        if isinstance(setting, trace.TracerProvider):
            return cls(setting)
        raise ValueError(
            "PLOINTS_OPENTELEMETRY must be True, False or an OpenTelemetry TracerProvider, not"
            f" {redact(setting)}"
        )

    def event_span(
        self,
        name: str,
        event: Event,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        context: otel_context.Context | None = None,
    ) -> t.ContextManager[trace.Span]:
        """Start the current span ``name`` about ``event``, a child of
        ``context`` (default: the current one).
        """
        return self.tracer.start_as_current_span(
            name, context=context, kind=kind, attributes=event_attributes(event)
        )

    @contextlib.contextmanager
    def fresh_span(self, name: str, event: Event) -> t.Iterator[trace.Span]:
        """Start the current span ``name`` about ``event`` as the root of a
        new trace, in a context without the current one's values (its
        baggage), linked to the span current where it starts, if any.
        """
        incoming = trace.get_current_span().get_span_context()
        links = [trace.Link(incoming)] if incoming.is_valid else None
        token = otel_context.attach(otel_context.Context())
        try:
            with self.tracer.start_as_current_span(
                name, links=links, attributes=event_attributes(event)
            ) as span:
                yield span
        finally:
            otel_context.detach(token)

    def handler_span(self, func: t.Callable[..., t.Any]) -> t.ContextManager[trace.Span]:
        """Start the current span of one handler, named after it."""
        name = getattr(func, "__qualname__", None) or repr(func)
        module = getattr(func, "__module__", None)
        return self.tracer.start_as_current_span(
            name, attributes={"code.function.name": f"{module}.{name}" if module else name}
        )

    def handlers(self, handlers: Handlers) -> Handlers:
        """Return ``handlers`` with a span around each."""
        return WrappedHandlers(handlers, self.handler_span)

    def processor(self, *args: t.Any) -> Processor:
        """Return a :class:`TracedProcessor` made with these arguments."""
        return TracedProcessor(self, *args)

    def headers(self) -> dict[str, str]:
        """Return the current trace context as message headers."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    @contextlib.contextmanager
    def joined(self, request: t.Any) -> t.Iterator[None]:
        """Make the trace context a Celery task's message carries the
        current one, so that the worker's spans join the delivery's trace.

        :param request: the task's ``request``, whose attributes are the
            message's headers.
        """
        token = otel_context.attach(propagate.extract(request, getter=_REQUEST_GETTER))
        try:
            yield
        finally:
            otel_context.detach(token)


class TracedProcessor(Processor):
    """A :class:`~flask_ploints._processing.Processor` whose deliveries,
    re-runs and worker attempts are spans. A subclass, so that an instance
    without tracing runs no check for it.

    :param tracing: makes the spans.
    :param args: the processor's arguments.
    """

    def __init__(
        self, tracing: Tracing, name: str, settings: Settings, *args: t.Any, **kwargs: t.Any
    ) -> None:
        super().__init__(name, settings, *args, **kwargs)
        self.tracing = tracing
        self._fresh = settings.values["PLOINTS_TRACE_CONTEXT"] == "fresh"

    def deliver(self, app: Flask, event: Event) -> Result:
        """See :meth:`Processor.deliver`; in a ``ploints.deliver`` span,
        which starts a new trace unless ``PLOINTS_TRACE_CONTEXT`` is
        ``"join"``.

        .. versionchanged:: 0.2
            The span starts a new trace by default.
        """
        started: t.ContextManager[trace.Span]
        if self._fresh:
            started = self.tracing.fresh_span(DELIVER_SPAN, event)
        else:
            started = self.tracing.event_span(DELIVER_SPAN, event)
        with started as span:
            result = super().deliver(app, event)
            set_outcome(span, result)
            return result

    def rerun(self, app: Flask, event: Event, previous_error: str | None = None) -> Result:
        """See :meth:`Processor.rerun`; in a ``ploints.rerun`` span."""
        with self.tracing.event_span(RERUN_SPAN, event) as span:
            result = super().rerun(app, event, previous_error)
            set_outcome(span, result)
            return result

    def resume(self, app: Flask, event: Event, token: str) -> Result:
        """See :meth:`Processor.resume`; in a ``ploints.process`` span."""
        with self.tracing.event_span(PROCESS_SPAN, event, trace.SpanKind.CONSUMER) as span:
            result = super().resume(app, event, token)
            set_outcome(span, result)
            return result
