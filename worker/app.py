"""The Celery application: Redis as the broker, one queue per model.

Results do not go through Celery's result backend; the worker writes them to
the job store itself, once per request.
"""

from __future__ import annotations

from celery import Celery

from mlxq.jobs.defaults import DEFAULT_VISIBILITY_TIMEOUT
from mlxq.jobs.models import model_name

__all__ = ["app", "configure", "broker_url", "queue_for"]

app = Celery("mlxq", set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # A request is acknowledged after it ended, so a worker that dies loses nothing.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Take no more requests than the engine holds: other workers get the rest.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    worker_send_task_events=False,
    task_create_missing_queues=True,
    broker_transport_options={"visibility_timeout": DEFAULT_VISIBILITY_TIMEOUT},
)


def broker_url(redis_url: str) -> str:
    """redis-py's ``unix://PATH`` is kombu's ``redis+socket://PATH``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://"):]
    return redis_url


def configure(redis_url: str, visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT) -> Celery:
    app.conf.broker_url = broker_url(redis_url)
    app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout}
    return app


def queue_for(model: str) -> str:
    """The Celery queue that workers serving ``model`` consume."""
    return f"mlxq:{model_name(model)}"
