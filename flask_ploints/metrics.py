"""Prometheus metrics, built on the lifecycle signals.

Needs ``prometheus_client``: ``pip install 'flask-ploints[prometheus]'``.
Enable with one line, ``app.config["PLOINTS_METRICS"] = True``, before the
extension starts; the metrics go to prometheus_client's default registry,
which your ``/metrics`` endpoint (or ``prometheus_client.make_wsgi_app()``)
already serves. Pass a :class:`Metrics` instance instead of ``True`` to use
another registry.

=============================================  ==============================
metric                                          labels
=============================================  ==============================
``ploints_deliveries_total``                    ``type``, ``outcome``
``ploints_signature_failures_total``
``ploints_duplicates_total``                    ``type``
``ploints_handler_failures_total``              ``type``
``ploints_handler_duration_seconds``            ``type`` (histogram)
``ploints_handler_stale_total``                 ``type``, ``handler``
=============================================  ==============================

``outcome`` is ``processed``, ``duplicate``, ``failed`` or ``rejected``.
Unknown event types are counted under ``type="other"`` so a sender cannot
grow the label set. ``ploints_handler_stale_total`` counts the events a
handler registered with ``latest_by`` skipped as stale (see
:doc:`/ordering`); ``handler`` is the handler's name, from your code.
"""

from __future__ import annotations

import typing as t
import weakref

from flask import Flask

from . import signals
from ._config import redact
from ._events import EVENT_TYPES

try:
    from prometheus_client import REGISTRY
    from prometheus_client import CollectorRegistry
    from prometheus_client import Counter
    from prometheus_client import Histogram
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "metrics need prometheus_client; install it with: pip install 'flask-ploints[prometheus]'"
    ) from exc

if t.TYPE_CHECKING:
    from ._events import Event

__all__ = ["Metrics"]

_KNOWN = frozenset(EVENT_TYPES)


def _label(event: Event) -> str:
    return event.type if event.type in _KNOWN else "other"


class Metrics:
    """The collectors, registered once on ``registry``, and the signal
    receivers that feed them for each app passed to :meth:`connect`.

    :param registry: where the collectors are registered.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.deliveries = Counter(
            "ploints_deliveries",
            "Webhook deliveries by event type and outcome.",
            ["type", "outcome"],
            registry=registry,
        )
        self.signature_failures = Counter(
            "ploints_signature_failures",
            "Deliveries rejected for a missing or wrong signature.",
            registry=registry,
        )
        self.duplicates = Counter(
            "ploints_duplicates",
            "Deliveries of already processed events.",
            ["type"],
            registry=registry,
        )
        self.handler_failures = Counter(
            "ploints_handler_failures", "Events whose handlers raised.", ["type"], registry=registry
        )
        self.handler_duration = Histogram(
            "ploints_handler_duration_seconds",
            "Time spent in the handlers of one event.",
            ["type"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.handler_stale = Counter(
            "ploints_handler_stale",
            "Events a latest_by handler skipped, older than the newest it applied.",
            ["type", "handler"],
            registry=registry,
        )
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()

    def connect(self, app: Flask) -> None:
        """Count the deliveries of ``app``; connecting an app twice (two
        instances on it) counts each delivery once.
        """
        if app in self._apps:
            return
        self._apps.add(app)
        pairs: list[tuple[t.Any, t.Callable[..., None]]] = [
            (signals.event_processed, self._processed),
            (signals.duplicate_skipped, self._duplicate),
            (signals.handler_failed, self._failed),
            (signals.signature_rejected, self._signature_rejected),
            (signals.payload_rejected, self._payload_rejected),
            (signals.handler_skipped_stale, self._stale),
        ]
        for signal, receiver in pairs:
            signal.connect(receiver, sender=app, weak=False)

    def _processed(self, sender: Flask, *, event: Event, duration: float, **extra: t.Any) -> None:
        label = _label(event)
        self.deliveries.labels(label, "processed").inc()
        self.handler_duration.labels(label).observe(duration)

    def _duplicate(self, sender: Flask, *, event: Event, **extra: t.Any) -> None:
        label = _label(event)
        self.deliveries.labels(label, "duplicate").inc()
        self.duplicates.labels(label).inc()

    def _failed(self, sender: Flask, *, event: Event, duration: float, **extra: t.Any) -> None:
        label = _label(event)
        self.deliveries.labels(label, "failed").inc()
        self.handler_failures.labels(label).inc()
        self.handler_duration.labels(label).observe(duration)

    def _stale(self, sender: Flask, *, event: Event, handler: str, **extra: t.Any) -> None:
        self.handler_stale.labels(_label(event), handler).inc()

    def _signature_rejected(self, sender: Flask, **extra: t.Any) -> None:
        self.deliveries.labels("unknown", "rejected").inc()
        self.signature_failures.inc()

    def _payload_rejected(self, sender: Flask, **extra: t.Any) -> None:
        self.deliveries.labels("unknown", "rejected").inc()


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The :class:`Metrics` on prometheus_client's default registry, made on
    first use so that several apps in one process share its collectors.
    """
    global _default
    if _default is None:
        _default = Metrics()
    return _default


def connect_metrics(app: Flask, setting: object) -> None:
    """Apply ``PLOINTS_METRICS``: ``True`` for the default registry, or a
    :class:`Metrics` instance.

    :raises ValueError: any other value.
    """
    if setting is True:
        default_metrics().connect(app)
    elif isinstance(setting, Metrics):
        setting.connect(app)
    else:
        raise ValueError(
            f"PLOINTS_METRICS must be True, False or a Metrics instance, not {redact(setting)}"
        )
