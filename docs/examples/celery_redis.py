import os

from celery import Celery
from flask import Flask

from flask_ploints import PlointsWebhooks

#: Seconds after which Redis gives an unacknowledged task to another worker:
#: a dead worker's events come back after it. Longer than the longest retry
#: countdown (PLOINTS_CELERY_RETRY_BACKOFF_MAX); a running task is renewed.
VISIBILITY_TIMEOUT = 3600


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        PLOINTS_WEBHOOK_SECRET=os.environ["PLOINTS_WEBHOOK_SECRET"],
        PLOINTS_DEDUPE_STORE=os.environ["PLOINTS_DEDUPE_STORE"],
        PLOINTS_DISPATCH="celery",
        PLOINTS_CELERY_QUEUE="ploints",
        PLOINTS_CELERY_RETRY_BACKOFF_MAX=600,
    )
    celery = Celery(app.name)
    celery.conf.update(
        broker_url=os.environ["CELERY_BROKER_URL"],  # "redis://broker.internal:6379/0"
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
    )
    app.extensions["celery"] = celery
    PlointsWebhooks(app)
    return app
