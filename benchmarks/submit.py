"""What queueing a big file costs: validation alone against the whole submit, and Redis memory.

    python benchmarks/submit.py [--lines N] [--json] [--redis-url URL]

Writes N short chat requests (about 440 bytes a line, as a batch file of short
questions is), then, in this process, times reading and validating the file
alone (``mlxq.jobs.files.read_file``) and queueing it (``mlxq.Client.submit``,
what ``mlxq submit`` runs: validate, store, send), and measures the Redis memory
the queued job holds (``used_memory`` after, less before, with no worker
taking anything). Then it runs ``mlxq submit`` itself as a subprocess, on the
file and on a file of 1,000 lines, for its wall time and peak RSS (bounded by
a chunk: about the same for both).

Redis: a private ``redis-server`` on a free port (no persistence), unless
``--redis-url`` names one; that database is flushed.

Output: a few lines on stderr; with ``--json``, one object on stdout:
``lines``, ``validate_lines_s`` and ``submit_lines_s`` (lines per second),
``redis_bytes_per_request``, ``request_json_bytes`` (a line's own bytes, on
average), ``queue_over_validate`` (store and send time over validation time:
at most 1 is the target), ``memory_over_json`` (at most 2 is the target), and
the seconds, the CLI's time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import MLXQ, BenchError, clean_env, connect_redis, log

#: A short chat request: a system prompt and a question, about 440 bytes as JSON.
_SYSTEM = ("You are a helpful assistant for newcomers. Answer in two or three short sentences, plainly, "
           "without lists, headings or code.")
_TOPICS = ("queues", "rivers", "bread", "autumn", "Paris", "tokens", "weather", "mountains", "vectors", "travel")


def request_line(i: int) -> str:
    topic = _TOPICS[i % len(_TOPICS)]
    return json.dumps({
        "custom_id": f"request-{i:07d}",
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Question {i}: what should a newcomer know about {topic}? "
                                        f"Give one fact, one common mistake and one tip about {topic}."},
        ],
        "max_tokens": 128,
        "temperature": 0.6,
        "seed": i + 1,
    })


def write_file(path: Path, lines: int) -> int:
    """N request lines; returns their bytes, newlines left out."""
    size = 0
    with open(path, "w", encoding="utf-8") as out:
        for i in range(lines):
            line = request_line(i)
            size += len(line.encode())
            out.write(line + "\n")
    return size


class PrivateRedis:
    """A redis-server of our own on a free port, without persistence; stopped on the way out."""

    def __init__(self, directory: Path):
        from helpers import free_port

        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server is not installed (or give --redis-url)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--logfile", str(directory / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "PrivateRedis":
        deadline = time.monotonic() + 15
        while True:
            try:
                connect_redis(self.url)
                return self
            except BenchError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise
                time.sleep(0.1)

    def __exit__(self, *exc_info) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cli_submit(url: str, path: Path, model: str) -> tuple[float, float]:
    """``mlxq submit`` as a subprocess: its wall time and peak RSS (MB)."""
    code = ("import resource, runpy, sys; sys.argv = ['mlxq'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('mlxq', run_name='__main__')\n"
            "finally:\n    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    started = time.perf_counter()
    out = subprocess.run([MLXQ[0], "-c", code, "--redis-url", url, "submit", str(path), "--model", model],
                         env=clean_env(), capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - started
    peaks = [line for line in out.stderr.splitlines() if line.startswith("peak ")]
    if out.returncode != 0 or not peaks:
        raise BenchError(f"mlxq submit failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return elapsed, int(peaks[-1].split()[1]) / 1024


def measure(url: str, lines: int, tmp: Path, rounds: int = 3) -> dict:
    from mlxq.client import Client
    from mlxq.jobs.files import Tally, read_file

    client = connect_redis(url)
    model = "bench/no-worker-serves-this"
    path = tmp / "requests.jsonl"
    json_bytes = write_file(path, lines)
    log(f"{lines} lines, {path.stat().st_size / 1e6:.1f} MB, {json_bytes / lines:.0f} bytes a line")

    def validate() -> float:
        started = time.perf_counter()
        tally = Tally(str(path))
        for line in read_file(str(path)):
            tally.add(line.error)
        tally.check()
        return time.perf_counter() - started

    client_ = Client(url)
    warm = tmp / "warm.jsonl"
    write_file(warm, 10)
    client_.submit(str(warm), model)  # imports and connections: paid once per process

    def submit() -> tuple[float, float, int]:
        client.flushdb()
        before = client.info("memory")["used_memory"]
        started = time.perf_counter()
        job = client_.submit(str(path), model)
        elapsed = time.perf_counter() - started
        after = client.info("memory")["used_memory"]
        if job.status().queued != lines:
            raise BenchError(f"{job.status().queued} of {lines} requests queued")
        return elapsed, (after - before) / lines, client.llen(f"mlxq:{model}")

    # Alternated, the median of each: the machine's speed drifts.
    validations, submits = [], []
    for _ in range(rounds):
        validations.append(validate())
        submits.append(submit())
    validate_s = statistics.median(validations)
    submit_s = statistics.median(s[0] for s in submits)
    per_request, queued = submits[-1][1], submits[-1][2]
    log(f"validate: {validate_s:.2f} s ({lines / validate_s:,.0f} lines/s), median of {rounds}")
    log(f"submit (validate, store, send): {submit_s:.2f} s ({lines / submit_s:,.0f} lines/s); "
        f"{queued} messages in the queue")
    log(f"Redis: {per_request:.0f} bytes per queued request ({per_request / (json_bytes / lines):.2f}x its JSON)")

    client.flushdb()
    cli_s, cli_rss = _cli_submit(url, path, model)
    small = tmp / "small.jsonl"
    write_file(small, 1000)
    client.flushdb()
    _, small_rss = _cli_submit(url, small, model)
    client.flushdb()
    log(f"mlxq submit: {cli_s:.2f} s; peak RSS {cli_rss:.0f} MB ({small_rss:.0f} MB for 1,000 lines)")
    return {
        "lines": lines,
        "validate_lines_s": round(lines / validate_s, 1),
        "submit_lines_s": round(lines / submit_s, 1),
        "redis_bytes_per_request": round(per_request, 1),
        "request_json_bytes": round(json_bytes / lines, 1),
        "rounds": rounds,
        "validate_s": round(validate_s, 3),
        "submit_s": round(submit_s, 3),
        "queue_over_validate": round((submit_s - validate_s) / validate_s, 3),
        "memory_over_json": round(per_request / (json_bytes / lines), 3),
        "messages_queued": queued,
        "cli_submit_s": round(cli_s, 3),
        "cli_peak_rss_mb": round(cli_rss, 1),
        "cli_peak_rss_1000_lines_mb": round(small_rss, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000, help="requests in the file (100000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--redis-url", help="use this Redis (its database is flushed) instead of a private one")
    parser.add_argument("--rounds", type=int, default=3, help="validations and submits, alternated (median; 3)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="mlxq-submit-") as tmp:
            if args.redis_url:
                result = measure(args.redis_url, args.lines, Path(tmp), args.rounds)
            else:
                with PrivateRedis(Path(tmp)) as server:
                    result = measure(server.url, args.lines, Path(tmp), args.rounds)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
