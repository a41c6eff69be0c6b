"""What streaming costs: throughput with and without ``stream``, and event latency.

    python benchmarks/streaming.py [--shape small|0.5b] [--requests N] [--rounds R] [--json]

One real ``mlxq worker`` runs the same requests as jobs without and with
``"stream": true``, alternating (R rounds each, so both see the same machine).
A subscriber on the jobs' pub/sub channels timestamps every delta event on
arrival: latency = arrival - the moment the text left the engine (the event's
``ts``). Throughput is taken worker-side: generated tokens / (first claim to
last result). The set-up is ``harness.py``'s, as for ``throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from harness import (
    BenchError, HelperFailure, PromptCounter, check_environment, connect_redis, ensure_model, flush_mlxq_keys,
    log, make_requests, start_worker, submit, warm_up_requests, write_jsonl,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["small", "0.5b"], default="small")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


class Listener(threading.Thread):
    """Timestamps every delta event of every job on arrival."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.pubsub = client.pubsub()
        self.pubsub.psubscribe("mlxq:job:*:events")
        self.latencies: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg and msg["type"] == "pmessage":
                arrived = time.time()
                event = json.loads(msg["data"])
                if not event.get("done") and event.get("ts"):
                    self.latencies.append(arrived - event["ts"])

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.pubsub.close()


def _rate(final: dict[str, Any]) -> float:
    return final["tokens"] / (final["finished_at"] - final["started_at"])


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    check_environment()
    client = connect_redis(args.redis_url)
    flush_mlxq_keys(client)
    model_dir = ensure_model(args.shape, 0, args.timeout)
    workdir = Path(tempfile.mkdtemp(prefix="mlxq-stream-bench-"))
    rows = make_requests(args.requests, 0, PromptCounter(model_dir))
    plain = write_jsonl(workdir / "plain.jsonl", rows)
    streamed = write_jsonl(workdir / "streamed.jsonl", [dict(r, stream=True) for r in rows])
    rates: dict[str, list[float]] = {"plain": [], "stream": []}
    listener = Listener(client)
    with start_worker(args.redis_url, model_dir, args.width, workdir / "worker.log") as worker:
        submit(args.redis_url, model_dir, write_jsonl(workdir / "warm.jsonl", warm_up_requests()),
               worker, args.timeout)
        listener.start()
        for r in range(args.rounds):
            for name, path in (("plain", plain), ("stream", streamed)):
                final = submit(args.redis_url, model_dir, path, worker, args.timeout)
                rates[name].append(_rate(final))
                log(f"round {r + 1} {name}: {rates[name][-1]:.1f} tok/s")
    listener.stop()
    lat = sorted(listener.latencies)
    if not lat:
        raise BenchError("no delta event reached the subscriber")

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2)

    plain_rate, stream_rate = statistics.mean(rates["plain"]), statistics.mean(rates["stream"])
    return {
        "shape": args.shape, "requests": args.requests, "rounds": args.rounds, "width": args.width,
        "plain_tok_s": round(plain_rate, 2), "stream_tok_s": round(stream_rate, 2),
        "stream_cost_pct": round(100 * (1 - stream_rate / plain_rate), 2),
        "rates": {k: [round(v, 2) for v in vs] for k, vs in rates.items()},
        "events": len(lat),
        "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": round(lat[-1] * 1000, 2)},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        report = benchmark(args)
    except (BenchError, HelperFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        print(f"plain {report['plain_tok_s']} tok/s, streamed {report['stream_tok_s']} tok/s "
              f"(cost {report['stream_cost_pct']}%); {report['events']} delta events, latency ms "
              f"p50 {report['latency_ms']['p50']} p95 {report['latency_ms']['p95']} "
              f"p99 {report['latency_ms']['p99']} max {report['latency_ms']['max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
