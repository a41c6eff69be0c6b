"""The defaults that users can change: what the CLI's options start from, and the model aliases.

Nothing here reads the environment: the CLI maps ``MLXQ_*`` variables onto
options, and passes the values down. Constants that no option changes live
beside the code they tune (the event Stream's length in ``events.py``, a
sender's grace in ``store.py``, the malloc arenas in ``worker/memory.py``).
"""

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_MODEL = "@cf/qwen/qwen1.5-0.5b-chat"

#: Seed model names and the MLX repositories they resolve to.
MODEL_ALIASES = {
    "@cf/qwen/qwen1.5-0.5b-chat": "mlx-community/Qwen1.5-0.5B-Chat-4bit",
}

#: Requests a worker keeps in flight at once (continuous batching width).
DEFAULT_CONCURRENCY = 32

#: Jobs and their keys expire this long after the last change (seconds).
DEFAULT_RETENTION = 7 * 24 * 3600

#: Ingest limits; each is reported in the error when hit.
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_REQUESTS = 1_000_000
DEFAULT_MAX_TOTAL_TOKENS = 1_000_000_000

#: Sampling defaults from the seed schema.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6

#: The key prefix of everything mlxq stores in Redis.
KEY_PREFIX = "mlxq"

#: How often a running request's task looks at its job for a cancellation.
DEFAULT_CANCEL_POLL = 0.5

#: Celery: the broker re-delivers a message unacknowledged for this long. Kept
#: well above the time limit, so a running generation is not handed out twice;
#: a re-delivery is a no-op anyway (the request's lease is live or it ended).
DEFAULT_VISIBILITY_TIMEOUT = 6 * 3600

#: A running request's lease: its worker renews it every quarter of this; when
#: it lapses (the worker died; by the Redis server's clock), any live worker puts
#: the request back in the queue. A dead worker's requests run again within
#: about this and a second.
DEFAULT_LEASE = 60.0

#: Times a request may start (its worker dying each time) before it fails.
DEFAULT_MAX_ATTEMPTS = 3

#: Longest a single request may generate (seconds) before it fails.
DEFAULT_TIME_LIMIT = 3600.0

#: Memory a worker's prefix cache may hold (MiB): keys and values of prompt
#: prefixes already computed, reused by requests that start the same way.
DEFAULT_PREFIX_CACHE_MB = 1024

#: Seconds between a worker's heartbeats (its entry in ``mlxq workers``); an
#: entry not renewed for three of them has expired: that worker is gone.
DEFAULT_HEARTBEAT = 5.0

#: Celery messages kept in a model's queue ahead of its workers. A job's
#: messages are sent a window at a time: its sender sends this many, and the
#: model's workers send more as the queue runs below half of it, so the
#: queue (and Redis's memory) holds a window, not the whole job.
DEFAULT_QUEUE_AHEAD = 200
