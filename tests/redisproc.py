"""A private ``redis-server`` for fault tests: own port, own directory, durable AOF.

``RedisProc(dir).start()`` runs ``redis-server`` on a free port of 127.0.0.1
with ``--appendonly yes --appendfsync always --save ""`` and ``--dir`` in
``dir``; :meth:`kill` SIGKILLs it (the AOF keeps every acknowledged write),
:meth:`stop` shuts it down cleanly, and :meth:`start` again brings it back on
the same port and directory. Never touches the shared server on 6379.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import redis

from helpers import free_port

__all__ = ["RedisProc"]


class RedisProc:
    def __init__(self, directory: os.PathLike[str] | str, port: Optional[int] = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisProc":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        args = [
            exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--daemonize", "no", "--protected-mode", "yes", "--logfile", str(self.log),
        ]
        deadline = time.monotonic() + timeout
        while True:  # the port may linger briefly after a kill
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            if self._wait_ready(deadline):
                return self
            self.proc.kill()
            self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log_text()}")
            time.sleep(0.2)

    def _wait_ready(self, deadline: float) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        # An AOF being replayed answers LOADING errors until done.
                        return True
                except redis.BusyLoadingError:
                    pass
                except redis.RedisError:
                    pass
                time.sleep(0.05)
            return False
        finally:
            client.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final save) and reap it."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        """Terminate the server cleanly (SIGTERM), SIGKILL if it lingers."""
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, timeout: float = 15.0) -> "RedisProc":
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""
