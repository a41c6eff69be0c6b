"""A job's progress in one line: what ``mlxq status --watch``, ``submit --wait`` and
:meth:`mlxq.Job.wait` print."""

from __future__ import annotations

import time
from typing import Optional

from .store import JobInfo

__all__ = ["rates", "summary", "now_of"]


def rates(info: JobInfo, now: float) -> tuple[float, float, Optional[float]]:
    """(elapsed seconds, tokens/s, ETA seconds or None)."""
    start = info.started_at or info.created_at
    end = info.finished_at or now
    elapsed = max(end - start, 1e-9)
    rate = info.tokens / elapsed if info.started_at else 0.0
    eta = None
    if 0 < info.done < info.total and info.started_at:
        eta = elapsed / info.done * (info.total - info.done)
    return elapsed, rate, eta


def now_of(info: JobInfo) -> float:
    """The time to set against the job's times: the Redis server's, read with them
    (the job's times are the server's; this machine's clock may differ)."""
    return info.now if info.now is not None else time.time()


def summary(info: JobInfo, now: Optional[float] = None) -> str:
    """One parseable line: ``job J: running 10/64 done, 1 failed, 2300 tokens, 45.2 tok/s, ...``."""
    elapsed, rate, eta = rates(info, now or now_of(info))
    text = (
        f"job {info.job_id}: {info.status.value} {info.done}/{info.total} done, {info.failed} failed, "
        f"{info.cancelled} cancelled, {info.tokens} tokens, {rate:.1f} tok/s, {elapsed:.0f}s elapsed"
    )
    return text + (f", eta {eta:.0f}s" if eta is not None else "")
