"""What the benchmarks share: the model, the requests, phases in subprocesses, mlxq driven as a user drives it.

The model is a random-weight Qwen2 of a given shape, built offline by
``tests/modelfactory.py`` and cached in ``~/.cache/mlxq-bench/<shape>-<seed>``
(``MLXQ_BENCH_CACHE`` moves it). The worker subprocess, request files and
clean environments come from ``tests/helpers.py``, which the tests use too.

A phase that measures in a process of its own (its own BLAS, its own peak
memory) is a module ``phase_<name>.py`` here: its ``run`` starts the module as
a script (:func:`run_phase`), whose ``measure`` prints one JSON line
(:func:`phase_main`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TESTS = REPO / "tests"
sys.path.append(str(TESTS))  # the tests' helpers and model factory (not an installed package)

from helpers import (  # noqa: E402
    MLXQ, HelperFailure, WorkerProcess, clean_env, read_vmhwm_mb, run_mlxq, write_jsonl,
)

__all__ = [
    "BenchError", "HelperFailure", "PhaseResult", "WorkerProcess", "TEMPERATURE", "MB", "log", "ensure_model",
    "huge_pages_env",
    "model_facts", "PromptCounter", "make_requests", "make_shared_prefix_requests", "read_jsonl", "write_jsonl", "load_prompts", "clean_env",
    "run_command", "run_phase", "phase_main", "own_peak_rss_mb", "mapped_blas", "connect_redis", "flush_mlxq_keys",
    "check_environment", "start_worker", "submit", "job_results", "warm_up_requests", "last_line",
]

CACHE = Path(os.environ.get("MLXQ_BENCH_CACHE", "~/.cache/mlxq-bench")).expanduser()

TEMPERATURE = 0.6  # the schema's default; the requests leave it out
PROMPT_TOKENS = (30, 200)
NEW_TOKENS = (64, 128)
WORKER_READY_TIMEOUT = 900.0
WORKER_STOP_TIMEOUT = 60.0
MB = 1024 * 1024

#: Words the prompts are made of (any text works: the model's weights are random).
WORDS = (
    "the queue holds many requests and each worker takes one when a slot is free while "
    "batches grow and shrink as answers end so the engine keeps every core busy with "
    "matrix products over keys values and attention heads; a short poem about autumn "
    "leaves, a recipe for bread, the capital of France, seven days in a week, Paris, "
    "rivers, mountains, tokens, vectors, predictions, temperature, travel, weather"
).split()
OPENERS = (
    "Please explain", "Write a short story about", "Summarize this:", "Answer briefly:",
    "Translate into plain English:", "List three facts about", "What do you think of",
)


class BenchError(Exception):
    """A failure the user must see as one line."""


@dataclass
class PhaseResult:
    """What one phase measured."""

    name: str
    requests: int
    tokens: int
    seconds: float
    blas: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def from_output(cls, name: str, out: dict[str, Any]) -> "PhaseResult":
        """From the JSON line of a phase's ``measure``."""
        extra = {k: v for k, v in out.items() if k not in ("requests", "tokens", "seconds", "blas")}
        return cls(name, out["requests"], out["tokens"], out["seconds"], out["blas"], extra)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# -- the model --------------------------------------------------------------------


def huge_pages_env() -> dict[str, str]:
    """``GLIBC_TUNABLES`` with malloc's huge pages, as a worker's process runs (``worker/memory.py``)."""
    from mlxq.worker.memory import with_huge_pages

    return {"GLIBC_TUNABLES": with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))}


def ensure_model(shape: str, seed: int, timeout: float) -> Path:
    """The cached model directory for ``shape``/``seed``, built (in a subprocess) if missing."""
    target = CACHE / f"{shape}-{seed}"
    if (target / "config.json").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{shape}-{seed}-", dir=CACHE))
    log(f"building the {shape} model into {target} (once; it is cached)")
    try:
        run_command([sys.executable, str(TESTS / "modelfactory.py"), str(partial), "--shape", shape, "--seed", str(seed)],
             clean_env(), timeout, "model build")
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def model_facts(model_dir: Path) -> dict[str, int]:
    """Layer and head counts from config.json, and the weights' size on disk."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    return {
        "layers": config["num_hidden_layers"],
        "kv_heads": config.get("num_key_value_heads", heads),
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "weights_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
    }


# -- the requests -----------------------------------------------------------------


class PromptCounter:
    """Counts a chat prompt's tokens the way the worker renders it (template + tokenizer.json)."""

    def __init__(self, model_dir: Path):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(config["chat_template"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def __call__(self, content: str) -> int:
        return self.messages([{"role": "user", "content": content}])

    def messages(self, messages: list[dict[str, str]]) -> int:
        return len(self.ids(messages))

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.template.render(messages=messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def make_requests(count: int, seed: int, counter: PromptCounter) -> list[dict[str, Any]]:
    """``count`` chat requests with prompts of ~30-200 tokens and 64-128 new tokens."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        target = rng.randint(*PROMPT_TOKENS)
        words = [rng.choice(OPENERS)]
        while counter(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        requests.append({
            "custom_id": f"r{i:04d}",
            "messages": [{"role": "user", "content": " ".join(words)}],
            "max_tokens": rng.randint(*NEW_TOKENS),
            "seed": rng.randint(1, 9_999_999_999),
        })
    return requests


#: The shared-prefix workload: one system prompt (instructions and few-shot
#: examples) in front of every request, a short question of its own on each.
SHARED_PREFIX_TOKENS = 1000
UNIQUE_TOKENS = 50
SHARED_NEW_TOKENS = 64


def make_shared_prefix_requests(count: int, seed: int, counter: PromptCounter) -> list[dict[str, Any]]:
    """``count`` greedy chat requests behind one ~1,000-token system prompt, each with a
    unique ~50-token question and 64 new tokens."""
    rng = random.Random(seed)
    system = ["You answer questions about travel, cooking and science. Follow the style of the examples."]
    example = 0
    while counter.messages([{"role": "system", "content": " ".join(system)}]) < SHARED_PREFIX_TOKENS:
        example += 1
        question = " ".join(rng.choice(WORDS) for _ in range(12))
        answer = " ".join(rng.choice(WORDS) for _ in range(30))
        system.append(f"Example {example}. Question: {question}? Answer: {answer}.")
    system_text = " ".join(system)
    requests = []
    for i in range(count):
        words = [f"Question {i}:", rng.choice(OPENERS)]
        while counter.messages([{"role": "system", "content": system_text},
                                {"role": "user", "content": " ".join(words)}]) < (
                counter.messages([{"role": "system", "content": system_text}]) + UNIQUE_TOKENS):
            words.append(rng.choice(WORDS))
        requests.append({
            "custom_id": f"s{i:04d}",
            "messages": [{"role": "system", "content": system_text}, {"role": "user", "content": " ".join(words)}],
            "max_tokens": SHARED_NEW_TOKENS,
            "temperature": 0,
        })
    return requests


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_prompts(tokenizer, requests_file: Path) -> tuple[list[list[int]], list[int], list[int]]:
    """Token lists rendered as the worker renders them (Engine.render/prepare), max_tokens, seeds."""
    prompts, max_tokens, seeds = [], [], []
    for request in read_jsonl(requests_file):
        text = tokenizer.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
        prompts.append(list(tokenizer.encode(text, add_special_tokens=False)))
        max_tokens.append(request["max_tokens"])
        seeds.append(request["seed"])
    return prompts, max_tokens, seeds


# -- phases in processes of their own ------------------------------------------------


def run_command(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    """Run ``cmd``; its stdout, or BenchError."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what} took more than {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}): {last_line(proc.stderr)}")
    return proc.stdout


def run_phase(name: str, model_dir: Path, requests_file: Path, env: dict[str, str], timeout: float,
              **options: Any) -> PhaseResult:
    """Run ``phase_<name>.py`` as a script with ``options`` (``--width 32`` for ``width=32``)."""
    cmd = [sys.executable, str(BENCH / f"phase_{name}.py"), "--model-dir", str(model_dir),
           "--requests-file", str(requests_file)]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = run_command(cmd, env, timeout, f"{name} phase")
    try:
        return PhaseResult.from_output(name, json.loads(out.strip().splitlines()[-1]))
    except (IndexError, ValueError) as exc:
        raise BenchError(f"{name} phase printed no result: {last_line(out)}") from exc


def phase_main(measure: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    """The script side of :func:`run_phase`: parse the options, measure, print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--requests-file", type=Path, required=True)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=None, help="the first COUNT requests only")
    print(json.dumps(measure(parser.parse_args())), flush=True)


def own_peak_rss_mb() -> Optional[float]:
    """This process's VmHWM in MB."""
    return read_vmhwm_mb("self")


def mapped_blas() -> str:
    from mlxq.worker.blas import loaded_blas

    return loaded_blas()


# -- Redis and a real worker ------------------------------------------------------------


def check_environment(torch: bool = False) -> None:
    """The modules the phases need are importable by this Python, or BenchError."""
    import importlib.util

    if torch:
        absent = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if absent:
            raise BenchError(f"--torch needs {' and '.join(absent)}: .venv/bin/pip install torch==2.13.0 transformers")
    missing = [m for m in ("mlxq", "redis", "jinja2", "tokenizers", "mlx_lm") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(f"{sys.executable} lacks {', '.join(missing)}; run with the project's venv: "
                         f".venv/bin/python benchmarks/{Path(sys.argv[0]).name}")


def connect_redis(url: str):
    """A redis-py client for ``url`` that answered a ping, or BenchError."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise BenchError(f"no Redis at {url}: {exc}") from exc
    return client


def flush_mlxq_keys(client) -> int:
    """Delete the database's mlxq:* keys (jobs, and the worker's queue ``mlxq:<model>``)."""
    keys = list(client.scan_iter("mlxq:*", count=1000))
    if keys:
        client.delete(*keys)
    return len(keys)


def start_worker(redis_url: str, model_dir: Path, width: int, log_path: Path, *args: str) -> WorkerProcess:
    """An ``mlxq worker`` of ``width`` rows (and options ``args``), ready; stop it with ``with``."""
    worker = WorkerProcess(redis_url, model_dir, log_path, *args, concurrency=width, name="the worker")
    try:
        return worker.wait_ready(WORKER_READY_TIMEOUT)
    except BaseException:
        worker.stop(WORKER_STOP_TIMEOUT)
        raise


def submit(redis_url: str, model_dir: Path, path: Path, worker: WorkerProcess, timeout: float) -> dict[str, Any]:
    """``mlxq submit FILE --wait --json``; returns its JSON (the ended job).

    Gives up as soon as the worker exits or logs an error: a request whose task
    raised never ends, and ``--wait`` would wait for it forever.
    """
    cmd = [*MLXQ, "--redis-url", redis_url, "submit", str(path), "--model", str(model_dir), "--wait", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                            cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                worker.check_healthy()
                if time.monotonic() > deadline:
                    raise BenchError(f"mlxq submit did not end within {timeout:.0f}s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"mlxq submit failed (exit {proc.returncode}): {last_line(err)}")
    return json.loads(out)


def job_results(redis_url: str, job_id: str) -> list[dict[str, Any]]:
    """The result lines of ``job_id`` (``mlxq results``); BenchError unless all completed."""
    proc = run_mlxq("results", job_id, redis_url=redis_url, timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"mlxq results failed (exit {proc.returncode}): {last_line(proc.stderr)}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    bad = [line for line in lines if line["status"] != "completed"]
    if bad:
        raise BenchError(f"{len(bad)} of {len(lines)} requests did not complete; the first: "
                         f"{bad[0]['status']}: {(bad[0].get('error') or {}).get('message')}")
    return lines


def warm_up_requests(count: int = 2) -> list[dict[str, Any]]:
    return [{"custom_id": f"warm{i}", "prompt": "Say hello.", "max_tokens": 8, "seed": i + 1} for i in range(count)]
