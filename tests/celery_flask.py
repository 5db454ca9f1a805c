"""Flask's "Background Tasks with Celery" pattern, as every Celery test app
uses it: :mod:`tests.celery_app`, :mod:`tests.accounts_app` and
:mod:`tests.crash_app`. docs/celery.rst shows the same function. Importing it builds nothing, unlike those modules,
which build their worker's app on import when their variables are set.
"""

from __future__ import annotations

import typing as t

from celery import Celery
from celery import Task
from flask import Flask


def celery_settings(broker_url: str) -> dict[str, t.Any]:
    """The ``CELERY`` config of a test app on ``broker_url``."""
    return {
        "broker_url": broker_url,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        # One message at a time: a prefetched second one would wait in a
        # worker that a test kills.
        "worker_prefetch_multiplier": 1,
        # No pidbox queue or broadcast exchange per worker.
        "worker_enable_remote_control": False,
    }


def celery_init_app(app: Flask) -> Celery:
    """Flask's own pattern: a Celery app whose tasks run in an app context,
    kept in ``app.extensions["celery"]``.
    """

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    app.extensions["celery"] = celery_app
    return celery_app
