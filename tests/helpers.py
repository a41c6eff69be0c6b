"""What the tests and the benchmarks share: input files, waiting, and mlxq as a user runs it.

- :func:`write_jsonl` writes a request file;
- :func:`wait_until` polls for a condition with a deadline (never a fixed sleep);
- :func:`run_cli`, :func:`submit_and_wait`, :func:`results_of` drive the CLI in
  this process (Click's ``CliRunner``); :func:`run_mlxq` runs it as a
  subprocess, ``python -m mlxq``;
- :class:`WorkerProcess` is an ``mlxq worker`` subprocess with its log in a file.

The benchmarks import this module too (``benchmarks/harness.py``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

__all__ = [
    "ROOT", "MLXQ", "HelperFailure", "write_jsonl", "free_port", "wait_until", "stop_process", "clean_env", "run_mlxq",
    "run_cli", "submit_and_wait", "results_of", "read_vmhwm_mb", "readme_blocks", "WorkerProcess",
]

ROOT = Path(__file__).resolve().parent.parent

#: The ``mlxq`` command of this interpreter's installation.
MLXQ = (sys.executable, "-m", "mlxq")

T = TypeVar("T")


class HelperFailure(AssertionError):
    """A condition that did not come true in time, or a helper process that failed."""


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    """One line per row: a JSON object, or a string written as it is (a bad line on purpose)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HelperFailure(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, and SIGKILL if ``proc`` has not ended after ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def clean_env(preload: Optional[str] = None, **extra: str) -> dict[str, str]:
    """This environment without ``MLXQ_*`` settings or a preload; ``preload`` as LD_PRELOAD, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_") and k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    env.update(extra)
    return env


def run_mlxq(*args: str, redis_url: Optional[str] = None, timeout: float = 120,
             env: Optional[dict[str, str]] = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m mlxq [--redis-url URL] ARGS`` as a subprocess, its output captured as text."""
    head = ["--redis-url", redis_url] if redis_url else []
    return subprocess.run([*MLXQ, *head, *args], cwd=ROOT, env=env if env is not None else clean_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def run_cli(redis_url: str, *args: str):
    """``mlxq --redis-url URL ARGS`` in this process (Click's CliRunner)."""
    from click.testing import CliRunner

    from mlxq.cli import cli

    return CliRunner().invoke(cli, ["--redis-url", redis_url, *args], catch_exceptions=False)


def submit_and_wait(redis_url: str, model, path: Path) -> dict:
    """``mlxq submit PATH --wait --json``: the ended job's JSON."""
    out = run_cli(redis_url, "submit", str(path), "--model", str(model), "--wait", "--json")
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout.strip().splitlines()[-1])


def results_of(redis_url: str, job_id: str) -> list[dict]:
    out = run_cli(redis_url, "results", job_id)
    assert out.exit_code == 0, out.output
    return [json.loads(line) for line in out.stdout.splitlines()]


def readme_blocks(section: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of the README's section ``section`` (a ``## `` heading), in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end >= 0 else None]
    return re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


def read_vmhwm_mb(pid: str) -> Optional[float]:
    """VmHWM (peak resident set) of /proc/<pid> (or ``self``) in MB; None where /proc has none."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class WorkerProcess:
    """An ``mlxq worker`` subprocess in a session of its own, its output in ``log``.

    As a context manager it is stopped (SIGTERM, then SIGKILL) on the way out,
    also on an exception or Ctrl-C.
    """

    def __init__(self, redis_url: str, model, log: Path, *args: str, concurrency: int = 4,
                 env: Optional[dict[str, str]] = None, name: str = "worker"):
        self.name = name
        self.log = Path(log)
        cmd = [*MLXQ, "--redis-url", redis_url, "worker", "--model", str(model), "--concurrency", str(concurrency),
               *args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env if env is not None else clean_env(),
                                         start_new_session=True)
        self.pid = self.proc.pid

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive:
            raise HelperFailure(f"{self.name} exited with {self.proc.returncode}: {_last_line(self.text())}")

    def check_healthy(self) -> None:
        """Fail if the worker has exited or logged an ERROR (a task that raised never ends)."""
        self.check_alive()
        for line in self.text().splitlines():
            if " ERROR " in line or " CRITICAL " in line:
                raise HelperFailure(f"{self.name} logged an error: {line.split(': ', 1)[-1]}")

    def wait_ready(self, timeout: float = 60) -> "WorkerProcess":
        # Celery prints "mlxq-<pid>@<host> ready." (the OpenBLAS re-exec keeps the pid).
        pattern = re.compile(rf"mlxq-{self.pid}@\S+ ready")

        def ready():
            self.check_alive()
            return pattern.search(self.text())

        wait_until(f"{self.name} to be ready", ready, timeout, 0.1)
        return self

    def blas(self) -> str:
        """The BLAS the worker's log says it uses."""
        found = re.search(r" BLAS (\S+?),", self.text())
        return found.group(1) if found else "unknown"

    def openblas_kernels(self) -> str:
        """The OpenBLAS core whose kernels the worker's log says it runs ("-" without OpenBLAS)."""
        found = re.search(r" OpenBLAS kernels (\S+?),", self.text())
        return found.group(1) if found else "unknown"

    def peak_rss_mb(self) -> Optional[float]:
        """The worker's VmHWM in MB, while it runs."""
        return read_vmhwm_mb(str(self.pid))

    def succeeded(self) -> list[str]:
        """The return values of the tasks this worker ran ('completed', 'skipped', ...)."""
        return re.findall(r"Task mlxq\.generate\[[^\]]+\] succeeded in [\d.e-]+s: '(\w+)'", self.text())

    def kill(self) -> None:
        """SIGKILL: no shutdown, no acknowledgement, leases left to lapse."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a warm shutdown), and SIGKILL if it has not ended after ``timeout`` s."""
        if self.alive:
            stop_process(self.proc, timeout)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
