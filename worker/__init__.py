"""Execution: the Celery app and task, the generation engine, model loading.

Importing this package imports Celery (the app), not MLX. ``slots`` and
``fastmath`` import MLX when they are imported; the engine and the model
loader import them, and MLX, only when they run.
"""

from .app import app, broker_url, configure, queue_for

__all__ = ["app", "broker_url", "configure", "queue_for"]
