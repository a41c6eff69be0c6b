"""Generation throughput of mlxq, end to end, against the raw mlx-lm engine and stock mlx-lm.

Usage (with the project's venv)::

    .venv/bin/python benchmarks/throughput.py [--shape 0.5b|small] [--requests N] [--json]
        [--width W] [--redis-url URL] [--seed S] [--stock-requests K | --skip-stock]
        [--torch]

One run measures three phases on the same requests (chat prompts of ~30-200
tokens, 64-128 new tokens each, temperature 0.6, all derived from ``--seed``):

``e2e``
    A real ``mlxq worker`` subprocess (``--concurrency W``) against Redis,
    started and warmed up first; the time of ``mlxq submit FILE --wait --json``
    until the job has ended. Tokens are the sum of ``usage.completion_tokens``
    in ``mlxq results``; the worker's peak RSS (VmHWM) is recorded.
``raw``
    mlx-lm's ``batch_generate`` in a subprocess with what the worker uses:
    float32, OpenBLAS preloaded, ``completion_batch_size=W``, the same chat
    rendering and ``max_tokens``, ``make_sampler(temp=0.6)``. Only generation
    is timed (after loading and a small warm-up).
``stock``
    mlx-lm as pip installs it (mlx's bundled reference BLAS, no preload): one
    request after another through ``stream_generate`` (what ``generate``
    wraps, which also reports the token count) on the first K requests.
``torch`` (with ``--torch``; needs ``pip install torch==2.13.0 transformers``)
    PyTorch on the CPU with transformers ``generate``: static batches of W in
    request order, left-padded, sampling at temperature 0.6 (top_p 1, top_k
    0), all CPU threads. A row's tokens count up to its own ``max_tokens`` or
    its first end token, though its batch runs until its longest row ends.
    This is the issue's PyTorch bar, measured in the same run.

Each phase runs in its own process (this script with the hidden ``--phase``
option, which prints one JSON line), so each can have its own BLAS. The model
is a random-weight Qwen2 built offline by ``tests/modelfactory.py`` and cached
in ``~/.cache/mlxq-bench/<shape>-<model seed>`` (``MLXQ_BENCH_CACHE`` moves it).

Tok/s counts generated tokens (the end token included, as mlxq's usage does)
over wall time, prompt processing included. ``--json`` prints one JSON object
on stdout; the table and progress go to stderr then.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
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


# -- command line ---------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of mlxq end to end vs raw mlx-lm batch_generate vs stock mlx-lm.",
    )
    parser.add_argument("--shape", choices=("0.5b", "small"), default="0.5b",
                        help="model shape from tests/modelfactory.py (default: 0.5b)")
    parser.add_argument("--requests", type=_positive, default=64, help="requests per phase (default: 64)")
    parser.add_argument("--width", type=_positive, default=32,
                        help="worker --concurrency and batch_generate completion_batch_size (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the requests (default: 0)")
    parser.add_argument("--model-seed", type=int, default=0, help="seed of the model's weights (default: 0)")
    parser.add_argument("--stock-requests", type=_positive, default=4,
                        help="requests for the slow stock phase, the first K of the same set (default: 4)")
    parser.add_argument("--skip-stock", action="store_true", help="skip the stock phase")
    parser.add_argument("--torch", action="store_true",
                        help="also run PyTorch with transformers, static batches of --width "
                             "(needs: pip install torch==2.13.0 transformers)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                        help="Redis database for the e2e phase; its mlxq:* keys are flushed "
                             "(default: redis://127.0.0.1:6379/14)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="limit for each phase in seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    # Internal: run one measurement in this (sub)process and print one JSON line.
    parser.add_argument("--phase", choices=("build", "raw", "stock", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--requests-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the model --------------------------------------------------------------------


def ensure_model(shape: str, seed: int, timeout: float) -> Path:
    """The cached model directory for ``shape``/``seed``, built (in a subprocess) if missing."""
    target = CACHE / f"{shape}-{seed}"
    if (target / "config.json").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{shape}-{seed}-", dir=CACHE))
    log(f"building the {shape} model into {target} (once; it is cached)")
    try:
        run_phase(["--phase", "build", "--shape", shape, "--model-seed", str(seed), "--model-dir", str(partial)],
                  env=clean_env(), timeout=timeout, what="model build")
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def phase_build(out: Path, shape: str, seed: int) -> dict[str, Any]:
    """Hidden phase: write the model with tests/modelfactory.py."""
    sys.path.insert(0, str(TESTS))
    from modelfactory import build_model

    build_model(out, shape=shape, seed=seed)
    return {"model_dir": str(out)}


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
        text = self.template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


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


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- subprocesses -------------------------------------------------------------------


def clean_env(preload: Optional[str] = None) -> dict[str, str]:
    """This environment without mlxq settings or a preload; with ``preload`` as LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_") and k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def run_phase(args: list[str], env: dict[str, str], timeout: float, what: str) -> dict[str, Any]:
    """Run this script with ``args``; returns the JSON line it prints, or raises BenchError."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what} took more than {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}): {last_line(proc.stderr)}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise BenchError(f"{what} printed no result: {last_line(proc.stdout + proc.stderr)}") from exc


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def mlxq_executable() -> str:
    beside = Path(sys.executable).parent / "mlxq"
    found = str(beside) if beside.exists() else shutil.which("mlxq")
    if found is None:
        raise BenchError("the mlxq command is not installed; run with the project's venv (.venv/bin/python)")
    return found


# -- the e2e phase ------------------------------------------------------------------


def check_environment(torch: bool = False) -> None:
    """The modules the phases need are importable by this Python, or BenchError."""
    import importlib.util

    if torch:
        absent = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if absent:
            raise BenchError(f"--torch needs {' and '.join(absent)}: .venv/bin/pip install torch==2.13.0 transformers")

    missing = [m for m in ("redis", "jinja2", "tokenizers", "mlx_lm") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(f"{sys.executable} lacks {', '.join(missing)}; run with the project's venv: "
                         ".venv/bin/python benchmarks/throughput.py")


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


class Worker:
    """An ``mlxq worker`` subprocess: started, awaited until ready, always stopped."""

    def __init__(self, mlxq: str, redis_url: str, model_dir: Path, width: int, log_path: Path):
        self.cmd = [mlxq, "--redis-url", redis_url, "worker", "--model", str(model_dir),
                    "--concurrency", str(width)]
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Worker":
        with open(self.log_path, "wb") as out:
            # A session of its own: a Ctrl-C reaches only us, and we stop it in order.
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                         cwd=REPO, start_new_session=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT) -> str:
        """Block until the worker logs "ready"; returns the BLAS it reports."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if any(" ready" in line for line in text.splitlines()):
                return self._blas(text)
            if self.proc.poll() is not None:
                raise BenchError(f"the worker exited ({self.proc.returncode}) before it was ready: "
                                 f"{last_line(text)}")
            time.sleep(0.2)
        raise BenchError(f"the worker was not ready after {timeout:.0f}s (log: {self.log_path})")

    @staticmethod
    def _blas(text: str) -> str:
        for line in text.splitlines():
            if " BLAS " in line:
                return line.split(" BLAS ", 1)[1].split(",", 1)[0].strip()
        return "unknown"

    def peak_rss_mb(self) -> Optional[float]:
        """The worker's VmHWM (peak resident set) in MB, while it still runs."""
        return read_vmhwm_mb(str(self.proc.pid))

    def check_healthy(self) -> None:
        """BenchError if the worker has exited or logged an ERROR (e.g. a task that raised)."""
        text = self.log_text()
        if self.proc.poll() is not None:
            raise BenchError(f"the worker exited ({self.proc.returncode}): {last_line(text)}")
        for line in text.splitlines():
            if " ERROR " in line or " CRITICAL " in line:
                raise BenchError(f"the worker logged an error: {line.split(': ', 1)[-1]}")

    def stop(self) -> None:
        """SIGTERM, wait, and SIGKILL if it does not end."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(WORKER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def read_vmhwm_mb(pid: str) -> Optional[float]:
    """VmHWM (peak resident set) of /proc/<pid> in MB, None where /proc has none."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def submit(mlxq: str, redis_url: str, model_dir: Path, path: Path, worker: Worker, timeout: float) -> dict[str, Any]:
    """``mlxq submit FILE --wait --json``; returns its JSON (the ended job).

    Gives up as soon as the worker exits or logs an error: a request whose task
    raised never ends, and ``--wait`` would wait for it forever.
    """
    cmd = [mlxq, "--redis-url", redis_url, "submit", str(path), "--model", str(model_dir), "--wait", "--json"]
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


def job_results(mlxq: str, redis_url: str, job_id: str) -> list[dict[str, Any]]:
    """The result lines of ``job_id`` (``mlxq results``); BenchError unless all completed."""
    proc = subprocess.run([mlxq, "--redis-url", redis_url, "results", job_id],
                          capture_output=True, text=True, env=clean_env(), cwd=REPO)
    if proc.returncode != 0:
        raise BenchError(f"mlxq results failed (exit {proc.returncode}): {last_line(proc.stderr)}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    bad = [line for line in lines if line["status"] != "completed"]
    if bad:
        raise BenchError(f"{len(bad)} of {len(lines)} requests did not complete; the first: "
                         f"{bad[0]['status']}: {(bad[0].get('error') or {}).get('message')}")
    return lines


def warm_up_requests() -> list[dict[str, Any]]:
    return [{"custom_id": f"warm{i}", "prompt": "Say hello.", "max_tokens": 8, "seed": i + 1} for i in range(2)]


def run_e2e(args: argparse.Namespace, model_dir: Path, requests_file: Path, workdir: Path) -> PhaseResult:
    """Time a job through a real worker; tokens from the job's results."""
    mlxq = mlxq_executable()
    client = connect_redis(args.redis_url)
    log(f"e2e: flushed {flush_mlxq_keys(client)} mlxq:* keys of {args.redis_url}; starting the worker")
    with Worker(mlxq, args.redis_url, model_dir, args.width, workdir / "worker.log") as worker:
        blas = worker.wait_ready()
        job = submit(mlxq, args.redis_url, model_dir, write_jsonl(workdir / "warmup.jsonl", warm_up_requests()),
                     worker, args.timeout)
        job_results(mlxq, args.redis_url, job["job_id"])
        log(f"e2e: worker ready (BLAS {blas}), warmed up; timing {args.requests} requests")
        start = time.perf_counter()
        job = submit(mlxq, args.redis_url, model_dir, requests_file, worker, args.timeout)
        seconds = time.perf_counter() - start
        peak_rss = worker.peak_rss_mb()
    # Logged by the engine as the worker stops (the `with` has stopped it).
    kv_logged = re.search(r"peak KV cache ([\d.]+) MiB", worker.log_text())
    lines = job_results(mlxq, args.redis_url, job["job_id"])
    usage = [line["result"]["usage"] for line in lines]
    tokens = sum(u["completion_tokens"] for u in usage)
    server_s = (job.get("finished_at") or 0) - (job.get("started_at") or 0)
    return PhaseResult("e2e", len(lines), tokens, seconds, blas, {
        "peak_rss_mb": peak_rss,
        "kv_peak_mb": float(kv_logged.group(1)) if kv_logged else None,
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "prompt_lengths": [u["prompt_tokens"] for u in usage],
        "server_seconds": server_s if server_s > 0 else None,
    })


# -- the raw and stock phases (each in its own process) ------------------------------


def load_prompts(tokenizer, requests_file: Path) -> tuple[list[list[int]], list[int], list[int]]:
    """Token lists rendered as the worker renders them (Engine.render/prepare), max_tokens, seeds."""
    prompts, max_tokens, seeds = [], [], []
    for request in read_jsonl(requests_file):
        text = tokenizer.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
        prompts.append(list(tokenizer.encode(text, add_special_tokens=False)))
        max_tokens.append(request["max_tokens"])
        seeds.append(request["seed"])
    return prompts, max_tokens, seeds


def own_peak_rss_mb() -> Optional[float]:
    """This process's VmHWM in MB."""
    return read_vmhwm_mb("self")


def mapped_blas() -> str:
    from mlxq.worker.blas import loaded_blas

    return loaded_blas()


def phase_raw(model_dir: Path, requests_file: Path, width: int, seed: int) -> dict[str, Any]:
    """Hidden phase: batch_generate over every request, float32 on the CPU, as the worker runs."""
    import mlx.core as mx
    from mlx_lm import batch_generate, load
    from mlx_lm.sample_utils import make_sampler

    mx.set_default_device(mx.cpu)
    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    prompts, max_tokens, _ = load_prompts(tokenizer, requests_file)
    options = {
        "sampler": make_sampler(temp=TEMPERATURE),
        "completion_batch_size": width,
        "prefill_batch_size": min(width, 8),  # as worker/engine.py
        "prefill_step_size": 512,
    }
    mx.random.seed(seed)
    batch_generate(model, tokenizer, prompts[:2], max_tokens=4, **options)
    start = time.perf_counter()
    response = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, **options)
    seconds = time.perf_counter() - start
    return {
        "requests": len(prompts), "tokens": response.stats.generation_tokens, "seconds": seconds,
        "blas": mapped_blas(), "prompt_tokens": sum(map(len, prompts)),
        "prefill_seconds": response.stats.prompt_time, "peak_rss_mb": own_peak_rss_mb(),
        "mlx_peak_mb": mx.get_peak_memory() / MB,
    }


def phase_stock(model_dir: Path, requests_file: Path, count: int) -> dict[str, Any]:
    """Hidden phase: mlx-lm as installed, one request after another (stream_generate)."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(model_dir))
    prompts, max_tokens, seeds = load_prompts(tokenizer, requests_file)
    prompts, max_tokens, seeds = prompts[:count], max_tokens[:count], seeds[:count]
    sampler = make_sampler(temp=TEMPERATURE)
    warm_text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    warm = list(tokenizer.encode(warm_text, add_special_tokens=False))
    for _ in stream_generate(model, tokenizer, warm, max_tokens=2, sampler=sampler):
        pass
    tokens, prefill = 0, 0.0
    start = time.perf_counter()
    for prompt, limit, seed in zip(prompts, max_tokens, seeds):
        mx.random.seed(seed)
        for last in stream_generate(model, tokenizer, prompt, max_tokens=limit, sampler=sampler):
            pass
        tokens += last.generation_tokens
        prefill += last.prompt_tokens / last.prompt_tps if last.prompt_tps else 0.0
    seconds = time.perf_counter() - start
    return {
        "requests": len(prompts), "tokens": tokens, "seconds": seconds, "blas": mapped_blas(),
        "prompt_tokens": sum(map(len, prompts)), "prefill_seconds": prefill,
    }


def phase_torch(model_dir: Path, requests_file: Path, width: int, seed: int) -> dict[str, Any]:
    """Hidden phase: PyTorch (transformers ``generate``), static batches of ``width`` in request order.

    Each batch is left-padded and runs until its longest ``max_tokens``; a row's
    tokens count up to its own ``max_tokens`` or its first end token, as mlxq's usage does.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts, max_tokens, _ = load_prompts(tokenizer, requests_file)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else min(eos)

    def run(batch: Sequence[list[int]], limits: Sequence[int]) -> int:
        longest = max(map(len, batch))
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(limits), min_new_tokens=0,
                                 do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0, pad_token_id=pad)
        count = 0
        for row, limit in zip(out[:, longest:].tolist(), limits):
            row = row[:limit]
            ends = [i for i, t in enumerate(row) if t in eos]
            count += ends[0] + 1 if ends else len(row)
        return count

    run(prompts[:2], [4, 4])
    tokens = 0
    start = time.perf_counter()
    for lo in range(0, len(prompts), width):
        tokens += run(prompts[lo:lo + width], max_tokens[lo:lo + width])
    seconds = time.perf_counter() - start
    return {
        "requests": len(prompts), "tokens": tokens, "seconds": seconds,
        "blas": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "prompt_tokens": sum(map(len, prompts)), "peak_rss_mb": own_peak_rss_mb(),
    }


def run_torch(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    log(f"torch: transformers generate, {args.requests} requests, static batches of {args.width}")
    out = run_phase(["--phase", "torch", "--model-dir", str(model_dir), "--requests-file", str(requests_file),
                     "--width", str(args.width), "--seed", str(args.seed)],
                    env=clean_env(), timeout=args.timeout, what="torch phase")
    return _phase_result("torch", out)


def run_raw(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    from mlxq.worker.blas import find_openblas

    openblas = find_openblas()
    if openblas is None:
        log("warning: OpenBLAS not found; the raw phase (like the worker) uses the reference BLAS")
    log(f"raw: batch_generate, {args.requests} requests, width {args.width}")
    out = run_phase(["--phase", "raw", "--model-dir", str(model_dir), "--requests-file", str(requests_file),
                     "--width", str(args.width), "--seed", str(args.seed)],
                    env=clean_env(preload=openblas), timeout=args.timeout, what="raw phase")
    return _phase_result("raw", out)


def run_stock(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    count = min(args.stock_requests, args.requests)
    log(f"stock: stream_generate one by one, {count} requests, no preload (slow)")
    out = run_phase(["--phase", "stock", "--model-dir", str(model_dir), "--requests-file", str(requests_file),
                     "--stock-requests", str(count)],
                    env=clean_env(), timeout=args.timeout, what="stock phase")
    return _phase_result("stock", out)


def _phase_result(name: str, out: dict[str, Any]) -> PhaseResult:
    extra = {k: v for k, v in out.items() if k not in ("requests", "tokens", "seconds", "blas")}
    return PhaseResult(name, out["requests"], out["tokens"], out["seconds"], out["blas"], extra)


# -- the report -----------------------------------------------------------------------


def kv_cache_bytes(facts: dict[str, int], prompt_lengths: Sequence[int], max_tokens: Sequence[int],
                   width: int) -> int:
    """float32 K and V of ``width`` in-flight requests, each as long as the longest request."""
    longest = max(p + m for p, m in zip(prompt_lengths, max_tokens))
    per_token = 2 * facts["layers"] * facts["kv_heads"] * facts["head_dim"] * 4
    return per_token * longest * min(width, len(prompt_lengths))


def _ratio(a: Optional[PhaseResult], b: Optional[PhaseResult]) -> Optional[float]:
    if a is None or b is None or b.tok_s == 0:
        return None
    return round(a.tok_s / b.tok_s, 3)


def summarize(args: argparse.Namespace, facts: dict[str, int], requests: Sequence[dict[str, Any]],
              e2e: PhaseResult, raw: PhaseResult, stock: Optional[PhaseResult],
              torch: Optional[PhaseResult] = None) -> dict[str, Any]:
    """The JSON report."""
    weights_mb = facts["weights_bytes"] / MB
    kv_estimate_mb = kv_cache_bytes(facts, e2e.extra["prompt_lengths"], [r["max_tokens"] for r in requests],
                                    args.width) / MB
    # The cache the worker held at its largest (rows and positions in blocks);
    # the estimate where its log does not say.
    kv_mb = e2e.extra.get("kv_peak_mb") or kv_estimate_mb
    peak = e2e.extra["peak_rss_mb"]
    server_s = e2e.extra["server_seconds"]
    return {
        "e2e_tok_s": round(e2e.tok_s, 2),
        "raw_tok_s": round(raw.tok_s, 2),
        "stock_tok_s": round(stock.tok_s, 3) if stock else None,
        "e2e_over_raw": _ratio(e2e, raw),
        "e2e_over_stock": _ratio(e2e, stock),
        "torch_tok_s": round(torch.tok_s, 2) if torch else None,
        "e2e_over_torch": _ratio(e2e, torch),
        "requests": e2e.requests,
        "new_tokens": e2e.tokens,
        "peak_rss_mb": round(peak, 1) if peak is not None else None,
        "weights_mb": round(weights_mb, 1),
        "kv_cache_mb": round(kv_mb, 1),
        "kv_estimate_mb": round(kv_estimate_mb, 1),
        "rss_over_budget_mb": round(peak - weights_mb - kv_mb, 1) if peak is not None else None,
        "shape": args.shape,
        "width": args.width,
        "blas": {p.name: p.blas for p in (e2e, raw, stock, torch) if p},
        "seconds": {p.name: round(p.seconds, 2) for p in (e2e, raw, stock, torch) if p},
        "e2e_server_tok_s": round(e2e.tokens / server_s, 2) if server_s else None,
        "raw_new_tokens": raw.tokens,
        "raw_prefill_s": round(raw.extra["prefill_seconds"], 2),
        "raw_peak_rss_mb": _round(raw.extra.get("peak_rss_mb")),
        "raw_mlx_peak_mb": _round(raw.extra.get("mlx_peak_mb")),
        "stock_prefill_s": _round(stock.extra["prefill_seconds"], 2) if stock else None,
        "stock_requests": stock.requests if stock else 0,
        "stock_new_tokens": stock.tokens if stock else 0,
        "prompt_tokens": e2e.extra["prompt_tokens"],
        "same_prompts": e2e.extra["prompt_tokens"] == raw.extra["prompt_tokens"],
        "max_tokens_total": sum(r["max_tokens"] for r in requests),
        "seed": args.seed,
        "loadavg_1m_at_start": args.loadavg,
    }


def format_table(phases: Sequence[PhaseResult], report: dict[str, Any]) -> str:
    stock = next((p for p in phases if p.name == "stock"), None)
    header = f"{'phase':<6} {'requests':>8} {'gen tokens':>10} {'seconds':>9} {'tok/s':>9} {'x stock':>8}  blas"
    rows = [header, "-" * len(header)]
    for p in phases:
        vs_stock = f"{p.tok_s / stock.tok_s:.1f}" if stock and stock.tok_s else "-"
        rows.append(f"{p.name:<6} {p.requests:>8} {p.tokens:>10} {p.seconds:>9.2f} {p.tok_s:>9.2f} "
                    f"{vs_stock:>8}  {p.blas}")
    rows.append(f"e2e/raw {_fmt(report['e2e_over_raw'])}, e2e/stock {_fmt(report['e2e_over_stock'])}, "
                f"e2e/torch {_fmt(report['e2e_over_torch'])}; "
                f"worker-side e2e {_fmt(report['e2e_server_tok_s'])} tok/s (first claim to last result)")
    rows.append(f"worker peak RSS {_fmt(report['peak_rss_mb'])} MB = weights {report['weights_mb']} "
                f"+ KV cache {report['kv_cache_mb']} (estimate {report['kv_estimate_mb']}) "
                f"+ other {_fmt(report['rss_over_budget_mb'])}; "
                f"raw phase peak RSS {_fmt(report['raw_peak_rss_mb'])} MB")
    return "\n".join(rows)


def _round(value: Optional[float], digits: int = 1) -> Optional[float]:
    return None if value is None else round(value, digits)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


# -- main ---------------------------------------------------------------------------


def run_phase_here(args: argparse.Namespace) -> None:
    """The hidden --phase: measure in this process, print one JSON line."""
    if args.phase == "build":
        out = phase_build(args.model_dir, args.shape, args.model_seed)
    elif args.phase == "raw":
        out = phase_raw(args.model_dir, args.requests_file, args.width, args.seed)
    elif args.phase == "torch":
        out = phase_torch(args.model_dir, args.requests_file, args.width, args.seed)
    else:
        out = phase_stock(args.model_dir, args.requests_file, args.stock_requests)
    print(json.dumps(out), flush=True)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """All three phases on one request set; prints the table, returns the report."""
    args.loadavg = round(os.getloadavg()[0], 2)
    check_environment(args.torch)
    connect_redis(args.redis_url)  # fail before any long work
    model_dir = ensure_model(args.shape, args.model_seed, args.timeout)
    facts = model_facts(model_dir)
    with tempfile.TemporaryDirectory(prefix="mlxq-bench-") as tmp:
        workdir = Path(tmp)
        requests = make_requests(args.requests, args.seed, PromptCounter(model_dir))
        requests_file = write_jsonl(workdir / "requests.jsonl", requests)
        e2e = run_e2e(args, model_dir, requests_file, workdir)
        raw = run_raw(args, model_dir, requests_file)
        stock = None if args.skip_stock else run_stock(args, model_dir, requests_file)
        torch = run_torch(args, model_dir, requests_file) if args.torch else None
    report = summarize(args, facts, requests, e2e, raw, stock, torch)
    phases = [p for p in (e2e, raw, stock, torch) if p]
    print(f"model {args.shape} ({model_dir}), width {args.width}\n{format_table(phases, report)}",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    return report


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the worker


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.phase:
        run_phase_here(args)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = benchmark(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
