"""The engine on its own: continuous batching keeps each request's semantics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxq.jobs.errors import ModelNotFound
from mlxq.jobs.models import MessagesRequest, PromptRequest
from mlxq.worker.engine import RequestRejected
from mlxq.worker.model import resolve_model

ROOT = Path(__file__).resolve().parent.parent


def _generate(engine, requests, seeds=None):
    handles = [engine.submit(engine.prepare(r, s)) for r, s in zip(requests, seeds or [1] * len(requests))]
    return [h.result(timeout=120) for h in handles]


def test_greedy_and_seeded_outputs_are_the_same_alone_and_batched(worker):
    engine = worker.engine
    greedy = PromptRequest(prompt="The queue said", max_tokens=24, temperature=0)
    seeded = PromptRequest(prompt="The queue said", max_tokens=24, temperature=1.2, top_k=40, top_p=0.95)
    alone_greedy = _generate(engine, [greedy])[0]
    alone_seeded = _generate(engine, [seeded], [77])[0]
    # Beside 30 others of different lengths, sampling settings and seeds.
    others = [PromptRequest(prompt="x " * (i + 1), max_tokens=5 + i, temperature=0.1 * (i % 12), seed=i + 1,
                            repetition_penalty=1.1 if i % 3 == 0 else None) for i in range(30)]
    batch = _generate(engine, [others[0], greedy, *others[1:15], seeded, *others[15:]],
                      [o.seed for o in others[:1]] + [1] + [o.seed for o in others[1:15]] + [77]
                      + [o.seed for o in others[15:]])
    assert batch[1].text == alone_greedy.text and batch[1].completion_tokens == alone_greedy.completion_tokens
    assert batch[16].text == alone_seeded.text
    assert _generate(engine, [seeded], [78])[0].text != alone_seeded.text


def test_the_engine_records_the_largest_its_kv_cache_was(worker, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4  # K, V float32
    out = _generate(worker.engine, [PromptRequest(prompt="x " * 40, max_tokens=16, temperature=0)] * 3)
    # The cache has a row for each request it may hold (8 here), each at least a prompt long.
    assert worker.engine.peak_kv_bytes >= per_token * worker.engine.width * out[0].prompt_tokens


def test_max_tokens_usage_and_finish_reason(worker):
    out = _generate(worker.engine, [PromptRequest(prompt="count", max_tokens=n, temperature=0.7) for n in (1, 2, 7)])
    for gen, n in zip(out, (1, 2, 7)):
        assert gen.completion_tokens <= n
        assert gen.finish_reason == ("length" if gen.completion_tokens == n else "stop")
        assert gen.prompt_tokens > 5  # the chat template is around the prompt


def test_chat_template_and_raw_rendering(worker):
    engine = worker.engine
    chat = engine.render(MessagesRequest(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]))
    assert chat == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert engine.render(PromptRequest(prompt="P")).endswith("<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n")
    assert engine.render(PromptRequest(prompt="P", raw=True)) == "P"


def test_requests_past_the_context_or_with_unknown_adapters_are_rejected(worker):
    engine = worker.engine
    with pytest.raises(RequestRejected, match="exceeds the model's context of"):
        engine.prepare(PromptRequest(prompt="x", max_tokens=engine.loaded.context_length), 1)
    with pytest.raises(RequestRejected, match="lora"):
        engine.prepare(PromptRequest(prompt="x", lora="nope"), 1)


def test_the_cpu_model_computes_in_float32(worker):
    assert worker.engine.loaded.dtype == "float32"
    assert worker.engine.loaded.device == "cpu"


def test_model_resolution_and_plain_errors(tmp_path, tiny_model):
    assert resolve_model("@cf/qwen/qwen1.5-0.5b-chat") == "mlx-community/Qwen1.5-0.5B-Chat-4bit"
    assert resolve_model(str(tiny_model)) == str(tiny_model.resolve())
    with pytest.raises(ModelNotFound, match="not a model directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFound, match="outside the allowed model directories"):
        resolve_model(str(tiny_model), model_dirs=[str(tmp_path)])
    assert resolve_model(str(tiny_model), model_dirs=[str(tiny_model.parent)]) == str(tiny_model.resolve())


def test_an_unreachable_hub_model_is_said_plainly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run(
        [sys.executable, "-m", "mlxq", "worker", "--model", "no-such-org/no-such-model", "--no-blas-setup"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: model no-such-org/no-such-model: cannot load Hugging Face repository")
    assert "Traceback" not in out.stderr


_GREEDY = """
import json, sys
from mlxq.worker.blas import loaded_blas
from mlxq.worker.model import load_model
from mlx_lm import generate
m = load_model(sys.argv[1])
prompt = m.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
print(json.dumps({"blas": loaded_blas(), "text": generate(m.model, m.tokenizer, prompt, max_tokens=40)}))
"""


def test_openblas_gives_the_same_greedy_tokens_as_the_reference_blas(tiny_model):
    from mlxq.worker.blas import find_openblas, openblas_env

    lib = find_openblas()
    assert lib, "OpenBLAS is not installed (apt-get install libopenblas0-pthread); .ci/setup installs it"
    runs = {}
    for name, preload in (("reference", ""), ("openblas", lib)):
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if preload:
            env.update(openblas_env(preload), LD_PRELOAD=preload)  # with the kernels the worker would name
        out = subprocess.run([sys.executable, "-c", _GREEDY, str(tiny_model)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120, check=True)
        runs[name] = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert runs["reference"]["blas"] == "reference" and runs["openblas"]["blas"] == "openblas"
    assert runs["reference"]["text"] == runs["openblas"]["text"]


_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("core, flags, named", [
    ("Prescott", _AVX512 | {"avx2", "fma", "avx512_bf16"}, "SkylakeX"),  # Emerald Rapids, Debian 12's OpenBLAS
    ("Prescott", {"sse3", "avx", "avx2", "fma"}, "Haswell"),
    ("Sandybridge", {"sse3", "avx", "avx2", "fma"}, "Haswell"),
    ("Prescott", {"sse3"}, None),  # nothing better to name
    ("SkylakeX", _AVX512 | {"avx2", "fma"}, None),  # OpenBLAS knew the CPU
    ("Cooperlake", _AVX512 | {"avx2", "fma"}, None),
    ("Haswell", {"avx2", "fma"}, None),
    ("Zen", {"avx2", "fma"}, None),
    (None, _AVX512, None),  # an OpenBLAS that does not say
])
def test_openblas_is_given_vector_kernels_only_where_it_took_the_cpu_for_an_older_one(core, flags, named):
    from mlxq.worker.blas import coretype_for

    assert coretype_for(core, flags) == named


def test_a_coretype_the_user_set_is_left_alone(monkeypatch):
    from mlxq.worker.blas import fast_blas_env, find_openblas, openblas_env

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert openblas_env(find_openblas()) == {}
    assert "OPENBLAS_CORETYPE" not in fast_blas_env()
