"""Build small Qwen2-architecture model directories offline, for tests.

``build_model(path, shape)`` writes a directory that ``mlx_lm.load(path)``
loads as-is, laid out like a Hugging Face Qwen1.5 chat checkpoint:

* ``config.json`` and ``generation_config.json`` (Qwen1.5-0.5B-Chat's fields),
* ``model.safetensors``: random float32 weights under the parameter names of
  ``mlx_lm.models.qwen2.Model``,
* ``tokenizer.json``: a byte-level BPE trained on a built-in corpus, with
  Qwen2's normalizer, pre-tokenizer and decoder, and the special tokens
  ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (ids 0, 1, 2),
* ``tokenizer_config.json`` with Qwen1.5's ChatML chat template.

Everything is deterministic for a given ``seed``; nothing is cached or
downloaded. Command line: ``python tests/modelfactory.py OUT_DIR [--shape S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.qwen2 import Model, ModelArgs
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

#: Vocabulary size the BPE trainer aims for (byte alphabet + specials + merges).
TOKENIZER_VOCAB_SIZE = 512

#: Random init, uniform and zero-mean (3-4x faster than normal for "0.5b"), with
#: standard deviation LINEAR_GAIN / sqrt(fan_in) for weight matrices, BIAS_STD
#: for biases, and LOGIT_STD / sqrt(hidden_size) for the embedding, so that the
#: (tied) logits have a standard deviation of about LOGIT_STD. With Qwen2's own
#: 0.02 everywhere, a tiny model's residual stream is all embedding, and greedy
#: decoding just repeats the prompt's last token.
LINEAR_GAIN = 2.0
LOGIT_STD = 3.0
BIAS_STD = 0.02

#: Hidden dimension 0 is a constant channel: every token's embedding holds
#: ANCHOR there and no layer writes to it (row 0 of each o_proj and down_proj
#: is zero), so it stays positive after the final norm. Padding rows (ids past
#: the tokenizer, which it never produces) hold PAD_ANCHOR there instead, which
#: puts their logits far below every real token's, as training would; without
#: it the ~150k padding ids of "0.5b" would take most of the sampled mass.
ANCHOR = 1.0
PAD_ANCHOR = -1000.0

#: Model shapes. A ``vocab_size`` of None means the tokenizer's size rounded
#: up to a multiple of 64. "0.5b" is Qwen1.5-0.5B exactly.
SHAPES: dict[str, dict[str, int | None]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": None,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 704,
        "vocab_size": 32000,
    },
    "0.5b": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 2816,
        "vocab_size": 151936,
    },
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Qwen2's pre-tokenization regex (as in transformers' Qwen2Tokenizer).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles "
    "begins with a single step, and every step teaches the traveller something new "
    "about the road, the weather, and the people who live along the way.",
    "You are a helpful assistant. The user asks a question and the assistant answers "
    "it clearly: What is the capital of France? The capital of France is Paris. "
    "How many days are there in a week? There are seven days in a week.",
    "In 1969, astronauts landed on the Moon for the first time. The mission took "
    "about 8 days, covered 384,400 kilometres each way, and was watched by roughly "
    "650 million people on television around the world.",
    "Machine learning models turn text into tokens, tokens into vectors, and vectors "
    "into predictions. A language model predicts the next token given the previous "
    "ones; sampling with a temperature of 0.7 makes its answers more varied.",
    'def greet(name: str) -> str:\n    return f"Hello, {name}!"\n\nprint(greet("world"))\n',
    "She ordered a café au lait and a croissant, feeling a little naïve about the "
    "prices in the old town. Zoë paid with a €20 note; the waiter said «merci» and "
    "smiled. Straße, façade, jalapeño, résumé and coöperate all have accents.",
    "日本語のテキストも少し含めます。東京は日本の首都です。"
    " Русский текст тоже есть. 中文也可以。 Emoji: 🎉 🚀 😀 👍 ❤️ — done!",
    "Please write a short poem about autumn leaves. Autumn leaves are falling down, "
    "red and gold upon the ground; the wind is cold, the days are short, and every "
    "tree has something to report.",
    "Batch processing lets a server handle many requests at once. Each request has an "
    "id, a prompt or a list of messages, and options such as max_tokens, temperature, "
    'top_p and a random seed. Results are written as JSON lines: {"id": 42}.',
]


def _train_tokenizer() -> Tokenizer:
    """Train a Qwen2-style byte-level BPE on ``CORPUS`` (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def _model_config(shape: str, vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` of a Qwen1.5 checkpoint with the given shape."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **SHAPES[shape],
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": SHAPES[shape]["num_hidden_layers"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": token_ids[ENDOFTEXT],
        "eos_token_id": token_ids[IM_END],
    }


def _tokenizer_config(token_ids: dict[str, int]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` of a Qwen1.5 chat checkpoint."""
    added = {
        str(token_ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _uniform(shape: tuple[int, ...], std: float) -> mx.array:
    """Zero-mean uniform float32 noise with standard deviation ``std``."""
    bound = std * 3**0.5
    return mx.random.uniform(-bound, bound, shape)


def _random_weights(config: dict[str, Any], n_tokens: int, seed: int) -> dict[str, mx.array]:
    """Random float32 weights for every parameter of ``mlx_lm``'s qwen2 Model."""
    model = Model(ModelArgs.from_dict(config))  # default init stays lazy, never evaluated
    mx.random.seed(seed)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            weight = mx.ones(param.shape, dtype=mx.float32)
        elif name.endswith("bias"):
            weight = _uniform(param.shape, BIAS_STD)
        elif name == "model.embed_tokens.weight":
            rows, dims = param.shape
            used = _uniform((n_tokens, dims), LOGIT_STD / dims**0.5)
            used[:, 0] = ANCHOR
            padding = mx.zeros((rows - n_tokens, dims))
            padding[:, 0] = PAD_ANCHOR
            weight = mx.concatenate([used, padding])
        else:
            weight = _uniform(param.shape, LINEAR_GAIN / param.shape[1] ** 0.5)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight[0] = 0.0
        weights[name] = weight
    return weights


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_model(
    path: str | os.PathLike[str],
    shape: str = "tiny",
    seed: int = 0,
    vocab_size: int | None = None,
) -> pathlib.Path:
    """Write a random Qwen2 chat model of ``shape`` into ``path`` and return it.

    ``vocab_size`` overrides the shape's model vocabulary size; it must be at
    least the tokenizer's size. The directory is created if missing, and files
    already in it are overwritten.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    tokenizer = _train_tokenizer()
    n_tokens = tokenizer.get_vocab_size()
    token_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if vocab_size is None:
        vocab_size = SHAPES[shape]["vocab_size"] or -(-n_tokens // 64) * 64
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens} tokens")

    config = _model_config(shape, vocab_size, token_ids)
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    weights = _random_weights(config, n_tokens, seed)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})

    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(token_ids))
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": token_ids[ENDOFTEXT],
            "pad_token_id": token_ids[ENDOFTEXT],
            "eos_token_id": [token_ids[IM_END], token_ids[ENDOFTEXT]],
        },
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a random Qwen2 chat model directory for tests.")
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=None, help="override the model's vocabulary size")
    args = parser.parse_args()
    print(build_model(args.out_dir, shape=args.shape, seed=args.seed, vocab_size=args.vocab_size))


if __name__ == "__main__":
    main()


def build_adapter(
    path: str | os.PathLike, model_dir: str | os.PathLike, zero: bool = False, rank: int = 4, seed: int = 1
) -> pathlib.Path:
    """A LoRA adapter for ``model_dir`` in mlx-lm's format, on q_proj and v_proj of every layer.

    ``zero`` makes ``lora_b`` zero: the adapter changes nothing. Otherwise its
    weights are large enough to change greedy output.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    outs = {"self_attn.q_proj": hidden, "self_attn.v_proj": config["num_key_value_heads"] * head_dim}
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": layers,
        "lora_parameters": {"rank": rank, "scale": 10.0, "dropout": 0.0, "keys": sorted(outs)},
    }))
    mx.random.seed(seed)
    weights = {}
    for i in range(layers):
        for key, out in outs.items():
            prefix = f"model.layers.{i}.{key}"
            weights[f"{prefix}.lora_a"] = mx.random.normal((hidden, rank)) / hidden**0.5
            weights[f"{prefix}.lora_b"] = mx.zeros((rank, out)) if zero else mx.random.normal((rank, out)) * 0.5
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    return path
