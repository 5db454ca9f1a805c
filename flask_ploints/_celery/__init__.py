"""Processing events on Celery workers: ``PLOINTS_DISPATCH = "celery"``.

The endpoint claims a delivery's id for ``PLOINTS_CELERY_LEASE``, publishes
one task :data:`TASK_NAME` with publisher confirms and a short timeout, and
answers ``202`` (or ``503`` when the broker does not confirm). A worker runs
the task through :meth:`~flask_ploints._processing.Processor.resume`, retries
a failing event with backoff, and records it failed when its attempts are
spent. How it behaves, what it guarantees and how to run it are in
:doc:`/celery`.

Needs Celery: ``pip install 'flask-ploints[celery]'``. Importing
:mod:`flask_ploints` never imports this module.

.. versionadded:: 0.1
"""

from __future__ import annotations

try:
    import celery  # type: ignore[import-untyped]  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PLOINTS_DISPATCH = 'celery' needs Celery; install it with:"
        " pip install 'flask-ploints[celery]'"
    ) from exc

from .dispatcher import CeleryDispatcher
from .task import TASK_NAME

__all__ = ["TASK_NAME", "CeleryDispatcher"]
