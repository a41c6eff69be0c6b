"""The configuration Mac users get, run on the CPU: a 4-bit, float16 model in its own dtype.

On Metal the worker keeps a model's dtype and quantization; on the CPU it
dequantizes to float32. ``load_model(..., force_cpu=True, keep_dtype=True)``
runs the first configuration on the CPU (slow, but the same arithmetic), so
CI checks it: the tiny model converted by ``mlx_lm.convert -q --dtype
float16``, through the engine and the slot batch, must give the same greedy
tokens as mlx-lm's own generation on that model: alone and batched,
streamed and not, with the prefix cache, with a LoRA adapter, and with
prompts whose prefill spans several chunks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlxq.jobs.models import MessagesRequest, PromptRequest
from mlxq.worker.engine import Engine
from mlxq.worker.model import load_model
from mlxq.worker.sampling import RowSampler
from mlxq.worker.slots import PREFILL_CHUNK, SlotBatch

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def q4_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model as ``mlx_lm.convert -q`` makes it: 4-bit weights, float16 scales and the rest."""
    out = tmp_path_factory.mktemp("q4") / "tiny-4bit"
    done = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(tiny_model), "--mlx-path", str(out),
         "-q", "--q-bits", "4", "--dtype", "float16"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def loaded(q4_model):
    return load_model(str(q4_model), force_cpu=True, keep_dtype=True)


@pytest.fixture(scope="module")
def engine(loaded, adapters_dir):
    streamed: dict = {}
    engine = Engine(loaded, width=8, adapters_dir=str(adapters_dir), prefix_cache_mb=64,
                    on_step=lambda steps: [streamed.setdefault(s.handle, []).append(s.delta) for s in steps])
    engine.streamed = streamed
    engine.start()
    yield engine
    engine.stop()


def _requests() -> list:
    """Chat and raw prompts of 1 to ~700 tokens, some streamed; several start with the same template."""
    return [
        PromptRequest(prompt="story 5", max_tokens=MAX_TOKENS, temperature=0, stream=True),
        PromptRequest(prompt="The queue said", max_tokens=MAX_TOKENS, temperature=0),
        MessagesRequest(messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hello " * 30}], max_tokens=MAX_TOKENS, temperature=0,
                        stream=True),
        PromptRequest(prompt="x", raw=True, max_tokens=MAX_TOKENS, temperature=0),
        PromptRequest(prompt="Write about " + "the sea and " * 120, max_tokens=MAX_TOKENS, temperature=0,
                      stream=True),
        PromptRequest(prompt="story 31", max_tokens=MAX_TOKENS, temperature=0),
    ]


def _stock(model, tokenizer, tokens) -> tuple[str, int]:
    """mlx-lm's own greedy generation: its text (its streaming detokenizer's) and token count."""
    text, count = "", 0
    for response in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=MAX_TOKENS,
                                    sampler=make_sampler(0.0)):
        text += response.text
        count += 1
    return text, count


def _check(engine, handles, expected) -> None:
    for handle, (text, count) in zip(handles, expected):
        got = handle.result(300)
        assert (got.text, got.completion_tokens) == (text, count)
        if handle.prepared.stream:
            assert "".join(engine.streamed.get(handle, [])) + got.tail == got.text


def test_the_model_keeps_its_quantization_and_dtype_on_the_cpu(loaded):
    assert (loaded.device, loaded.dtype) == ("cpu", "4-bit, float16")


def test_greedy_tokens_equal_mlx_lm_alone_batched_and_streamed(engine, q4_model):
    model, tokenizer = mlx_lm_load(str(q4_model))
    prepared = [engine.prepare(r, 1) for r in _requests()]
    assert max(len(p.tokens) for p in prepared) > PREFILL_CHUNK, "a prefill should span two chunks"
    expected = [_stock(model, tokenizer, p.tokens) for p in prepared]
    assert all(count == MAX_TOKENS for _, count in expected)  # no early end: every token is compared
    # Alone, one after another (the later ones find the template's first block in the prefix cache).
    for p, want in zip(prepared, expected):
        _check(engine, [engine.submit(p)], [want])
    # All at once: prefilled together, decoded in one batch.
    _check(engine, [engine.submit(p) for p in prepared], expected)


def test_a_lora_adapter_gives_mlx_lms_tokens_beside_the_base_model(engine, q4_model, adapters_dir):
    model, tokenizer = mlx_lm_load(str(q4_model), adapter_path=str(adapters_dir / "shift"))
    requests = _requests()[:3]
    adapted = [engine.prepare(r.model_copy(update={"lora": "shift"}), 1) for r in requests]
    expected = [_stock(model, tokenizer, p.tokens) for p in adapted]
    base = engine.prepare(requests[0], 1)
    base_alone = engine.submit(base).result(300)
    assert base_alone.text != expected[0][0], "the adapter should change the output"
    _check(engine, [engine.submit(adapted[0])], expected[:1])
    handles = [engine.submit(p) for p in adapted] + [engine.submit(base)]
    _check(engine, handles[:-1], expected)
    assert handles[-1].result(300).text == base_alone.text


def test_the_slot_batch_keeps_float16_keys_and_values_and_prefills_as_mlx_lm(loaded):
    """Rows of 1 to ~600 tokens join and leave a batch narrower than the prompts."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [tokenizer.encode("Hi", add_special_tokens=False)[:1]]
    prompts += [tokenizer.encode(f"Request {i}: " + "many words " * (i * 41 % 150), add_special_tokens=False)
                for i in (1, 3, 4)]
    assert max(map(len, prompts)) > PREFILL_CHUNK
    lengths = [4 + (i * 7) % 20 for i in range(len(prompts))]
    expected = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=n, sampler=make_sampler(0.0))]
                for p, n in zip(prompts, lengths)]
    batch = SlotBatch(model, width=2, prefill_tokens=700)
    uids = batch.insert(prompts, [RowSampler(0.0) for _ in prompts])
    want = dict(zip(uids, lengths))
    got: dict[int, list[int]] = {u: [] for u in uids}
    dtypes = set()
    while len(batch):
        for step in batch.next():
            got[step.uid].append(step.token)
        dtypes |= {c.keys.dtype for c in batch.caches if c.keys is not None}
        batch.remove([u for u in uids if len(got[u]) >= want[u] and u in {r.uid for r in batch.rows}])
    assert [got[u] for u in uids] == expected
    assert dtypes == {mx.float16}
