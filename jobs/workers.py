"""Workers you can see: each live worker's heartbeat entry in Redis.

A worker writes its entry every few seconds (:data:`~mlxq.jobs.defaults.DEFAULT_HEARTBEAT`)
with a time to live of three beats, so the entry of a worker that died (or
lost Redis) disappears by itself. Keys:

- ``mlxq:worker:NAME``  :meth:`WorkerRegistry.key`: hash: the worker's :class:`WorkerInfo`
                        fields; expires unless renewed
- ``mlxq:workers``      :data:`WORKERS`: set: the names of workers that wrote an entry
                        (names whose entry expired are dropped when listed)

``started`` and ``last_seen`` are the Redis server's clock, like every time
mlxq compares; ``clock_skew`` is how far the worker's own clock is from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import redis

from .defaults import KEY_PREFIX
from .errors import StoreError
from .models import model_name

__all__ = ["WorkerInfo", "WorkerRegistry", "WORKERS", "serving"]

WORKERS = f"{KEY_PREFIX}:workers"

# Writes a worker's entry and renews its time to live; `started` and
# `last_seen` are the server's time, `clock_skew` the worker's clock less it.
# KEYS: the entry, the set of names. ARGV: name, ttl (s), the worker's clock,
# then field, value pairs.
_BEAT = """
local entry, names = KEYS[1], KEYS[2]
local name, ttl, clock = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 4, #ARGV, 2 do
  redis.call('HSET', entry, ARGV[i], ARGV[i + 1])
end
redis.call('HSETNX', entry, 'started', now)
redis.call('HSET', entry, 'name', name, 'last_seen', now, 'clock_skew', clock - now)
redis.call('EXPIRE', entry, ttl)
redis.call('SADD', names, name)
return 1
"""

_INTS = ("pid", "concurrency", "in_flight", "tokens")
_FLOATS = ("tokens_per_s", "started", "last_seen", "clock_skew")


@dataclass(frozen=True)
class WorkerInfo:
    """What a live worker last said of itself."""

    name: str
    host: str
    pid: int
    model: str
    state: str = "ready"  # "loading" while it loads its model, then "ready"
    device: str = ""
    dtype: str = ""
    blas: str = ""
    concurrency: int = 0
    in_flight: int = 0  # requests it runs now
    tokens: int = 0  # generated since it started
    tokens_per_s: float = 0.0  # over the last half minute or so
    started: float = 0.0  # Unix seconds, the Redis server's clock
    last_seen: float = 0.0  # Unix seconds, the Redis server's clock
    clock_skew: float = 0.0  # the worker's clock less the Redis server's, in seconds

    def serves(self, model: str) -> bool:
        """Whether this worker consumes the queue of ``model``'s jobs."""
        return model_name(self.model) == model_name(model)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> "WorkerInfo":
        d: dict[str, Any] = {k.decode(): v.decode() for k, v in h.items()}
        known = {f for f in cls.__dataclass_fields__}
        for name in _INTS:
            if name in d:
                d[name] = int(d[name])
        for name in _FLOATS:
            if name in d:
                d[name] = float(d[name])
        return cls(**{k: v for k, v in d.items() if k in known})


def serving(workers: list[WorkerInfo], model: str) -> int:
    """How many of ``workers`` serve ``model``."""
    return sum(1 for w in workers if w.serves(model))


class WorkerRegistry:
    """The heartbeat entries of every worker, in the Redis of ``client``."""

    def __init__(self, client: redis.Redis, where: str = "?"):
        self.redis = client
        self.where = where
        self._beat = client.register_script(_BEAT)

    @staticmethod
    def key(name: str) -> str:
        return f"{KEY_PREFIX}:worker:{name}"

    def beat(self, name: str, fields: dict[str, Any], ttl: float, clock: float) -> None:
        """Write worker ``name``'s entry, alive for ``ttl`` more seconds; ``clock`` is its own time."""
        args: list[Any] = [name, max(1, int(round(ttl))), repr(clock)]
        for field, value in fields.items():
            args += [field, value]
        try:
            self._beat(keys=[self.key(name), WORKERS], args=args)
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.where}: {exc}") from exc

    def remove(self, name: str) -> None:
        """A worker that stops says so at once (else its entry expires)."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.key(name))
            pipe.srem(WORKERS, name)
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.where}: {exc}") from exc

    def live(self, model: Optional[str] = None) -> list[WorkerInfo]:
        """The live workers (of ``model``, if given), by host and pid."""
        try:
            names = sorted(self.redis.smembers(WORKERS))
            if not names:
                return []
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.key(name.decode()))
            entries = pipe.execute()
            gone = [name for name, h in zip(names, entries) if not h]
            if gone:
                self.redis.srem(WORKERS, *gone)
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.where}: {exc}") from exc
        workers = [WorkerInfo.from_hash(h) for h in entries if h]
        if model is not None:
            workers = [w for w in workers if w.serves(model)]
        return sorted(workers, key=lambda w: (w.host, w.pid, w.name))
