"""``mlxq serve``: the jobs over HTTP, in front of the same Redis and Celery workers (it serves no model).

Two APIs, so that existing code changes only its base URL: Cloudflare's
Workers AI REST API (:mod:`mlxq.server.workers_ai`) and OpenAI's Batch API
(:mod:`mlxq.server.openai_batch`), both on :class:`mlxq.Client`.
"""

from .app import DEFAULT_MAX_BODY_BYTES, ServerConfig, create_app

__all__ = ["ServerConfig", "create_app", "DEFAULT_MAX_BODY_BYTES"]
