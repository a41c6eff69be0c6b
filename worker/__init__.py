"""Execution: the Celery app and task, the generation engine, model loading.

Importing this package does not import MLX; the engine and model modules do.
"""

from .app import app, broker_url, configure, queue_for

__all__ = ["app", "broker_url", "configure", "queue_for"]
