"""Generation throughput of mlxq, end to end, against the raw mlx-lm engine, stock mlx-lm and PyTorch.

Usage (with the project's venv)::

    .venv/bin/python benchmarks/throughput.py [--shape 0.5b|small] [--requests N] [--json]
        [--width W] [--redis-url URL] [--seed S] [--stock-requests K | --skip-stock]
        [--torch] [--llama-server BIN --llama-gguf FILE] [--workload standard|shared-prefix [--workers N]]

One run measures up to seven phases on the same requests (chat prompts of
~30-200 tokens, 64-128 new tokens each, temperature 0.6, all derived from
``--seed``), each in its own module:

``e2e`` (``phase_e2e.py``)
    a job through a real ``mlxq worker`` subprocess, as a user waits for it,
    and from the worker's log where its engine's time went (``engine``: prompt
    processing, decode steps and, within them, the KV cache's growth);
``raw`` (``phase_raw.py``)
    mlx-lm's ``batch_generate`` with the worker's dtype, BLAS and width;
``stock`` (``phase_stock.py``; ``--skip-stock`` leaves it out)
    mlx-lm as pip installs it, one request after another;
``torch`` (``phase_torch.py``; with ``--torch``)
    PyTorch with transformers ``generate``, static batches of the same width;
``llamacpp`` (``phase_llamacpp.py``; with ``--llama-server`` and ``--llama-gguf``)
    llama.cpp's server with ``--parallel`` the width (continuous batching) on a
    GGUF of the same model, every request sent at once; the report sets its
    model work against the same matmul rate (``llamacpp_roofline_fraction``);
``gemm`` (``phase_gemm.py``)
    the machine's float32 matmul rate on the model's own shapes at 512 rows
    (``gemm_gflops``: the higher of two measurements, before the step phase and
    right after e2e, both in ``gemm_gflops_runs``) and at the width: the report
    sets the useful model work per second end to end (``model_gflops``: 2 x the
    matmul parameters x prompt and generated tokens, plus attention, prompt
    tokens the prefix cache served included: ``cached_tokens``) against it
    (``roofline_fraction``), and the same less those tokens' matmuls, the work
    the worker computed (``computed_gflops``, ``computed_fraction``);
``step`` (``phase_step.py``)
    a decode step of ``--width`` rows timed in parts: matmuls (at the gemm
    rate), attention, sampling and the rest.

``--workload shared-prefix`` runs instead 64 greedy requests behind one
1,000-token system prompt with few-shot examples (a unique ~50-token
question each, 64 new tokens) end to end twice, with the prefix cache off and
then on, and reports both rates, their ratio, the prompt tokens the cache
served and whether the greedy outputs are identical. With ``--workers N`` both
runs use N workers against the one Redis, as several machines would; each
worker's cache serves only the requests it runs (``cached_tokens_by_worker``,
``prefix_computations``: how many times the shared prefix was prefilled).

Every phase but e2e runs in a process of its own, so each has its own BLAS
and peak memory. Tok/s counts generated tokens (the end token included, as
mlxq's usage does) over wall time, prompt processing included. ``--json``
prints one JSON object on stdout; the table and progress go to stderr then.
What the benchmarks share is in ``harness.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import phase_e2e
import phase_gemm
import phase_llamacpp
import phase_raw
import phase_step
import phase_stock
import phase_torch
from harness import (
    MB, BenchError, HelperFailure, PhaseResult, PromptCounter, check_environment, connect_redis, ensure_model,
    make_requests, make_shared_prefix_requests, model_facts, write_jsonl,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of mlxq end to end vs raw mlx-lm batch_generate vs stock mlx-lm.",
    )
    parser.add_argument("--shape", choices=("0.5b", "small"), default="0.5b",
                        help="model shape from tests/modelfactory.py (default: 0.5b)")
    parser.add_argument("--requests", type=_positive, default=64, help="requests per phase (default: 64)")
    parser.add_argument("--width", type=_positive, default=32,
                        help="worker --concurrency and batch_generate completion_batch_size (default: 32)")
    parser.add_argument("--workload", choices=("standard", "shared-prefix"), default="standard",
                        help="standard: the phases above; shared-prefix: 64 greedy requests behind one "
                             "1,000-token system prompt, end to end with the prefix cache on and off")
    parser.add_argument("--workers", type=_positive, default=1,
                        help="workers for the shared-prefix workload, each with --width rows (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the requests (default: 0)")
    parser.add_argument("--model-seed", type=int, default=0, help="seed of the model's weights (default: 0)")
    parser.add_argument("--stock-requests", type=_positive, default=4,
                        help="requests for the slow stock phase, the first K of the same set (default: 4)")
    parser.add_argument("--skip-stock", action="store_true", help="skip the stock phase")
    parser.add_argument("--torch", action="store_true",
                        help="also run PyTorch with transformers, static batches of --width "
                             "(needs: pip install torch==2.13.0 transformers)")
    parser.add_argument("--llama-server", metavar="BIN",
                        help="also run llama.cpp's llama-server (this binary) on the same requests, "
                             "with --llama-gguf (benchmarks/README.md says how to build both)")
    parser.add_argument("--llama-gguf", metavar="FILE", help="a GGUF of the benchmark's model for --llama-server")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                        help="Redis database for the e2e phase; its mlxq:* keys are flushed "
                             "(default: redis://127.0.0.1:6379/14)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="limit for each phase in seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    if bool(args.llama_server) != bool(args.llama_gguf):
        parser.error("--llama-server and --llama-gguf go together")
    if args.llama_server and args.workload != "standard":
        parser.error("--llama-server runs with the standard workload")
    for option, path in (("--llama-server", args.llama_server), ("--llama-gguf", args.llama_gguf)):
        if path and not Path(path).is_file():
            parser.error(f"{option} {path}: no such file (benchmarks/llamacpp_setup.py makes it)")
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


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


def model_flops(config: dict[str, Any], prompt_lengths: Sequence[int], new_tokens: Sequence[int]) -> float:
    """The useful work of generating: 2 x matmul parameters per prompt or generated token, plus
    attention (QK and AV: 4 x layers x heads x head_dim per key each token sees)."""
    params = phase_gemm.matmul_params(config)
    heads = config["num_attention_heads"]
    width = heads * (config.get("head_dim") or config["hidden_size"] // heads)
    flops = 0.0
    for prompt, new in zip(prompt_lengths, new_tokens):
        n = prompt + new
        flops += 2 * params * n + 4 * config["num_hidden_layers"] * width * n * (n + 1) / 2
    return flops


def model_gflops(config: dict[str, Any], phase: PhaseResult) -> float:
    """A phase's useful model work per second (its prompts and the tokens it generated)."""
    return model_flops(config, phase.extra["prompt_lengths"], phase.extra["completion_lengths"]) / phase.seconds / 1e9


def roofline(config: dict[str, Any], e2e: PhaseResult, gemm: PhaseResult,
             step: Optional[PhaseResult] = None) -> dict[str, Any]:
    """How close end to end came to the machine's matmul rate on the model's shapes, and a
    decode step's parts against the same rate."""
    gflops = model_gflops(config, e2e)
    # The same less the matmuls of the prompt tokens the prefix cache served (the work the
    # worker did compute; their attention, a few positions each, stays in).
    served = 2 * phase_gemm.matmul_params(config) * (e2e.extra.get("cached_tokens") or 0)
    computed_gflops = gflops - served / e2e.seconds / 1e9
    parts = {}
    if step is not None:
        rows = step.requests
        matmul_ms = 2 * phase_gemm.matmul_params(config) * rows / (gemm.extra["gemm_gflops_at_width"] * 1e9) * 1000
        x = step.extra
        parts = {"decode_step": {
            "rows": rows, "context": x["decode_context"], "step_ms": round(x["decode_step_ms"], 1),
            "matmuls_ms": round(matmul_ms, 1), "attention_ms": round(x["decode_attention_ms"], 1),
            "sampling_ms": round(x["decode_sampling_ms"], 1),
            "other_ms": round(x["decode_step_ms"] - matmul_ms - x["decode_attention_ms"] - x["decode_sampling_ms"], 1),
            "step_gflops": round(2 * phase_gemm.matmul_params(config) * rows / x["decode_step_ms"] / 1e6, 1),
        }}
    return {
        "gemm_gflops": round(gemm.extra["gemm_gflops"], 1),
        "gemm_gflops_at_width": round(gemm.extra["gemm_gflops_at_width"], 1),
        "gemm_gflops_runs": gemm.extra.get("gemm_gflops_runs"),
        "model_gflops": round(gflops, 1),
        "roofline_fraction": round(gflops / gemm.extra["gemm_gflops"], 3),
        "computed_gflops": round(computed_gflops, 1),
        "computed_fraction": round(computed_gflops / gemm.extra["gemm_gflops"], 3),
        "mean_rows": e2e.extra.get("mean_rows"),
        "row_occupancy": round(e2e.extra["mean_rows"] / e2e.extra["width"], 3) if e2e.extra.get("mean_rows") else None,
        "engine": e2e.extra.get("engine"),
        **parts,
    }


def summarize(args: argparse.Namespace, facts: dict[str, int], requests: Sequence[dict[str, Any]],
              e2e: PhaseResult, raw: PhaseResult, stock: Optional[PhaseResult],
              torch: Optional[PhaseResult] = None, gemm: Optional[PhaseResult] = None,
              config: Optional[dict[str, Any]] = None, step: Optional[PhaseResult] = None,
              llamacpp: Optional[PhaseResult] = None) -> dict[str, Any]:
    """The JSON report."""
    weights_mb = facts["weights_bytes"] / MB
    kv_estimate_mb = kv_cache_bytes(facts, e2e.extra["prompt_lengths"], [r["max_tokens"] for r in requests],
                                    args.width) / MB
    # The cache the worker held at its largest (rows and positions in blocks);
    # the estimate where its log does not say.
    kv_mb = e2e.extra.get("kv_peak_mb") or kv_estimate_mb
    prefix_mb = e2e.extra.get("prefix_peak_mb") or 0.0
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
        **(_llamacpp(llamacpp, e2e, gemm, config) if llamacpp else {}),
        "requests": e2e.requests,
        "new_tokens": e2e.tokens,
        "peak_rss_mb": round(peak, 1) if peak is not None else None,
        "weights_mb": round(weights_mb, 1),
        "kv_cache_mb": round(kv_mb, 1),
        "kv_estimate_mb": round(kv_estimate_mb, 1),
        "prefix_cache_mb": prefix_mb,
        "rss_over_budget_mb": round(peak - weights_mb - kv_mb - prefix_mb, 1) if peak is not None else None,
        "shape": args.shape,
        "width": args.width,
        "blas": {p.name: p.blas for p in (e2e, raw, stock, torch, llamacpp) if p},
        "seconds": {p.name: round(p.seconds, 2) for p in (e2e, raw, stock, torch, llamacpp) if p},
        "e2e_server_tok_s": round(e2e.tokens / server_s, 2) if server_s else None,
        "raw_new_tokens": raw.tokens,
        "raw_prefill_s": round(raw.extra["prefill_seconds"], 2),
        "raw_peak_rss_mb": _round(raw.extra.get("peak_rss_mb")),
        "raw_mlx_peak_mb": _round(raw.extra.get("mlx_peak_mb")),
        "stock_prefill_s": _round(stock.extra["prefill_seconds"], 2) if stock else None,
        "stock_requests": stock.requests if stock else 0,
        "stock_new_tokens": stock.tokens if stock else 0,
        "prompt_tokens": e2e.extra["prompt_tokens"],
        # Served by the prefix cache (the chat template's start): counted in model_gflops as
        # the work they stand for, though the worker copied their keys and values instead.
        "cached_tokens": e2e.extra.get("cached_tokens"),
        "same_prompts": e2e.extra["prompt_tokens"] == raw.extra["prompt_tokens"],
        "max_tokens_total": sum(r["max_tokens"] for r in requests),
        "seed": args.seed,
        "loadavg_1m_at_start": args.loadavg,
        **(roofline(config, e2e, gemm, step) if gemm and config else {}),
    }


def _llamacpp(llamacpp: PhaseResult, e2e: PhaseResult, gemm: Optional[PhaseResult],
              config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """llama.cpp's figures: its rate, mlxq's against it, its memory and its model work."""
    x = llamacpp.extra
    report = {
        "llamacpp_tok_s": round(llamacpp.tok_s, 2),
        "e2e_over_llamacpp": _ratio(e2e, llamacpp),
        "llamacpp_new_tokens": llamacpp.tokens,
        "llamacpp_peak_rss_mb": _round(x.get("peak_rss_mb")),
        "llamacpp_same_prompts": x["prompt_tokens"] == e2e.extra["prompt_tokens"],
    }
    if gemm and config:
        gflops = model_gflops(config, llamacpp)
        report["llamacpp_model_gflops"] = round(gflops, 1)
        report["llamacpp_roofline_fraction"] = round(gflops / gemm.extra["gemm_gflops"], 3)
    return report


def format_table(phases: Sequence[PhaseResult], report: dict[str, Any]) -> str:
    stock = next((p for p in phases if p.name == "stock"), None)
    header = f"{'phase':<8} {'requests':>8} {'gen tokens':>10} {'seconds':>9} {'tok/s':>9} {'x stock':>8}  blas"
    rows = [header, "-" * len(header)]
    for p in phases:
        vs_stock = f"{p.tok_s / stock.tok_s:.1f}" if stock and stock.tok_s else "-"
        rows.append(f"{p.name:<8} {p.requests:>8} {p.tokens:>10} {p.seconds:>9.2f} {p.tok_s:>9.2f} "
                    f"{vs_stock:>8}  {p.blas}")
    rows.append(f"e2e/raw {_fmt(report['e2e_over_raw'])}, e2e/stock {_fmt(report['e2e_over_stock'])}, "
                f"e2e/torch {_fmt(report['e2e_over_torch'])}, e2e/llamacpp {_fmt(report.get('e2e_over_llamacpp'))}; "
                f"worker-side e2e {_fmt(report['e2e_server_tok_s'])} tok/s (first claim to last result)")
    rows.append(f"worker peak RSS {_fmt(report['peak_rss_mb'])} MB = weights {report['weights_mb']} "
                f"+ KV cache {report['kv_cache_mb']} (estimate {report['kv_estimate_mb']}) "
                f"+ prefix cache {report['prefix_cache_mb']} "
                f"+ other {_fmt(report['rss_over_budget_mb'])}; "
                f"raw phase peak RSS {_fmt(report['raw_peak_rss_mb'])} MB")
    if "roofline_fraction" in report:
        runs = " and ".join(str(r) for r in report["gemm_gflops_runs"] or [])
        rows.append(f"model work {report['model_gflops']} GFLOP/s against the matmul peak {report['gemm_gflops']} "
                    f"GFLOP/s (512 rows, the faster of {runs}; {report['gemm_gflops_at_width']} at "
                    f"{report['width']} rows): "
                    f"roofline fraction {report['roofline_fraction']}; mean rows {_fmt(report['mean_rows'])} "
                    f"of {report['width']}; {_fmt(report['cached_tokens'])} of {report['prompt_tokens']} prompt "
                    f"tokens from the prefix cache (without them: {report['computed_gflops']} GFLOP/s, "
                    f"{report['computed_fraction']})")
    if "llamacpp_roofline_fraction" in report:
        rows.append(f"llama.cpp: model work {report['llamacpp_model_gflops']} GFLOP/s, roofline fraction "
                    f"{report['llamacpp_roofline_fraction']}; server peak RSS {_fmt(report['llamacpp_peak_rss_mb'])} MB")
    if report.get("engine"):
        rows.append(f"the job in the engine: {_engine(report['engine'])}")
    if "decode_step" in report:
        d = report["decode_step"]
        rows.append(f"decode step at {d['rows']} rows, context {d['context']}: {d['step_ms']} ms = matmuls "
                    f"{d['matmuls_ms']} (at the gemm rate) + attention {d['attention_ms']} + sampling "
                    f"{d['sampling_ms']} + other {d['other_ms']}; {d['step_gflops']} GFLOP/s")
    return "\n".join(rows)


def _engine(t: dict[str, Any]) -> str:
    step_ms = t["decode_s"] / t["decode_steps"] * 1000 if t["decode_steps"] else 0.0
    return (f"prompt processing {t['prefill_s']} s in {t['prefill_batches']} batches, decoding {t['decode_s']} s "
            f"in {t['decode_steps']} steps ({step_ms:.0f} ms a step), of these growing the KV cache "
            f"{t['kv_growth_s']} s")


def _round(value: Optional[float], digits: int = 1) -> Optional[float]:
    return None if value is None else round(value, digits)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


def shared_prefix(args: argparse.Namespace, model_dir: Path, facts: dict[str, int]) -> dict[str, Any]:
    """The shared-prefix workload, end to end with the prefix cache off and on (in that order)."""
    with tempfile.TemporaryDirectory(prefix="mlxq-bench-") as tmp:
        workdir = Path(tmp)
        counter = PromptCounter(model_dir)
        requests = make_shared_prefix_requests(args.requests, args.seed, counter)
        shared = _common_prefix([counter.ids(r["messages"]) for r in requests])
        requests_file = write_jsonl(workdir / "requests.jsonl", requests)
        off = phase_e2e.run(args, model_dir, requests_file, workdir, ["--prefix-cache-mb", "0"], name="prefix-off",
                            workers=args.workers)
        on = phase_e2e.run(args, model_dir, requests_file, workdir, name="prefix-on", workers=args.workers)
    from mlxq.jobs.defaults import DEFAULT_PREFIX_CACHE_MB
    from mlxq.worker.prefix import PREFIX_BLOCK

    weights_mb = facts["weights_bytes"] / MB * args.workers
    # What one hit of the shared prompt start serves: its whole cache blocks.
    per_hit = shared // PREFIX_BLOCK * PREFIX_BLOCK
    cached = on.extra.get("cached_tokens")
    peak, kv_mb = on.extra["peak_rss_mb"], on.extra.get("kv_peak_mb") or 0.0
    report = {
        "workload": "shared-prefix",
        "prefix_on_tok_s": round(on.tok_s, 2),
        "prefix_off_tok_s": round(off.tok_s, 2),
        "prefix_speedup": round(on.tok_s / off.tok_s, 3) if off.tok_s else None,
        "cached_tokens": cached,
        "cached_tokens_by_worker": on.extra.get("cached_tokens_by_worker"),
        "shared_prefix_tokens": shared,
        "prefix_computations": round(on.requests - cached / per_hit, 2) if cached is not None and per_hit else None,
        "workers": args.workers,
        "prompt_tokens": on.extra["prompt_tokens"],
        "outputs_identical": on.extra["responses"] == off.extra["responses"],
        "requests": on.requests,
        "new_tokens": on.tokens,
        "seconds": {"prefix_off": round(off.seconds, 2), "prefix_on": round(on.seconds, 2)},
        "peak_rss_mb": _round(peak),
        "weights_mb": round(weights_mb, 1),
        "kv_cache_mb": kv_mb,
        "prefix_cache_mb": on.extra.get("prefix_peak_mb"),
        "prefix_cache_bound_mb": DEFAULT_PREFIX_CACHE_MB,
        "rss_over_budget_mb": _round(peak - weights_mb - kv_mb - (on.extra.get("prefix_peak_mb") or 0))
        if peak is not None else None,
        "mean_rows": {"prefix_off": off.extra.get("mean_rows"), "prefix_on": on.extra.get("mean_rows")},
        "engine": {"prefix_off": off.extra.get("engine"), "prefix_on": on.extra.get("engine")},
        "shape": args.shape,
        "width": args.width,
        "seed": args.seed,
        "loadavg_1m_at_start": args.loadavg,
    }
    print(f"model {args.shape}, width {args.width}, {args.workers} worker(s), shared-prefix workload "
          f"({on.requests} requests, {shared}-token shared prefix, "
          f"{on.extra['prompt_tokens']} prompt tokens, {on.tokens} generated)\n"
          f"prefix cache off: {off.tok_s:.2f} tok/s ({off.seconds:.1f} s); on: {on.tok_s:.2f} tok/s "
          f"({on.seconds:.1f} s): {report['prefix_speedup']}x; {cached} prompt tokens from the cache "
          f"(by worker {report['cached_tokens_by_worker']}: the prefix computed {report['prefix_computations']} "
          f"times); greedy outputs identical: {report['outputs_identical']}\n"
          f"worker peak RSS {_fmt(report['peak_rss_mb'])} MB = weights {report['weights_mb']} + KV cache {kv_mb} "
          f"+ prefix cache {report['prefix_cache_mb']} + other {_fmt(report['rss_over_budget_mb'])}"
          + "".join(f"\nthe job in the engine, prefix cache {kind}: {_engine(t)}"
                    for kind, t in (("off", off.extra.get("engine")), ("on", on.extra.get("engine"))) if t),
          file=sys.stderr if args.json else sys.stdout, flush=True)
    return report


def _common_prefix(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence shares."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for other in sequences[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase on one request set; prints the table, returns the report."""
    args.loadavg = round(os.getloadavg()[0], 2)
    check_environment(args.torch)
    connect_redis(args.redis_url)  # fail before any long work
    model_dir = ensure_model(args.shape, args.model_seed, args.timeout)
    facts = model_facts(model_dir)
    if args.workload == "shared-prefix":
        return shared_prefix(args, model_dir, facts)
    config = json.loads((model_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="mlxq-bench-") as tmp:
        workdir = Path(tmp)
        requests = make_requests(args.requests, args.seed, PromptCounter(model_dir))
        requests_file = write_jsonl(workdir / "requests.jsonl", requests)
        gemm = phase_gemm.run(args, model_dir, requests_file)
        step = phase_step.run(args, model_dir, requests_file)
        e2e = phase_e2e.run(args, model_dir, requests_file, workdir)
        # Once more right after e2e, and the faster of the two is the peak: a matmul rate
        # measured in one of this shared machine's slow minutes would flatter the fraction.
        again = phase_gemm.run(args, model_dir, requests_file)
        rates = [round(g.extra["gemm_gflops"], 1) for g in (gemm, again)]
        gemm = max(gemm, again, key=lambda g: g.extra["gemm_gflops"])
        gemm.extra["gemm_gflops_runs"] = rates
        raw = phase_raw.run(args, model_dir, requests_file)
        stock = None if args.skip_stock else phase_stock.run(args, model_dir, requests_file)
        torch = phase_torch.run(args, model_dir, requests_file) if args.torch else None
        llamacpp = phase_llamacpp.run(args, model_dir, requests_file) if args.llama_server else None
    report = summarize(args, facts, requests, e2e, raw, stock, torch, gemm, config, step, llamacpp)
    phases = [p for p in (e2e, raw, stock, torch, llamacpp) if p]
    print(f"model {args.shape} ({model_dir}), width {args.width}\n{format_table(phases, report)}",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    return report


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `with` that stops the worker


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = benchmark(args)
    except (BenchError, HelperFailure) as exc:
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
