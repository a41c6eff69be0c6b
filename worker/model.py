"""Find and load a model: a seed name, a Hugging Face repository or a local directory.

On the CPU the model computes in float32: quantized layers are dequantized and
half-precision weights upcast at load, because MLX's CPU matmul is fast only in
float32. On Apple Silicon (Metal) the model keeps its own dtype and quantization;
``keep_dtype`` does the same on the CPU (slow, but exact: how the tests run the
Metal configuration on machines without Metal).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mlxq.jobs.defaults import MODEL_ALIASES
from mlxq.jobs.errors import ModelNotFound

__all__ = ["LoadedModel", "resolve_model", "load_model", "describe_dtype"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    source: str
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    context_length: int


def resolve_model(name: str, model_dirs: Optional[Sequence[str]] = None) -> str:
    """Where ``name`` is loaded from: a local directory or a hub repository id.

    With ``model_dirs`` set, a name that is a filesystem path must lie inside one
    of them, so that a submitted job cannot point a worker at arbitrary files.
    """
    name = MODEL_ALIASES.get(name, name)
    looks_local = name.startswith((".", "/", "~")) or os.path.isdir(name)
    if not looks_local:
        return name
    path = Path(name).expanduser().resolve()
    if model_dirs:
        roots = [Path(d).expanduser().resolve() for d in model_dirs]
        if not any(path == r or r in path.parents for r in roots):
            raise ModelNotFound(f"model {name}: outside the allowed model directories")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"model {name}: not a model directory (no config.json in {path})")
    return str(path)


def _context_length(source: str) -> int:
    return context_length(source) or 32768


def context_length(source: str) -> Optional[int]:
    """``max_position_embeddings`` from the config of ``source`` (a directory, or a
    hub id already in the local cache); None where it cannot be read."""
    path = Path(source) / "config.json"
    if not os.path.isabs(source):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - a malformed id, a cache error
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        value = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if value else None


def describe_dtype(model) -> str:
    """What the model computes in: ``float32``, or ``4-bit, float16`` for a quantized one
    (its packed weights are ``uint32``; the float type is that of its scales and other weights)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    bits = sorted({m.bits for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")})
    counts: dict[str, int] = {}
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            name = str(value.dtype).replace("mlx.core.", "")
            counts[name] = counts.get(name, 0) + value.size
    floats = max(counts, key=counts.get) if counts else "unknown"
    if not bits:
        return floats
    return f"{'/'.join(str(b) for b in bits)}-bit, {floats}"


def load_model(name: str, model_dirs: Optional[Sequence[str]] = None, force_cpu: bool = False,
               keep_dtype: bool = False) -> LoadedModel:
    """Load ``name`` with mlx-lm; raises :class:`ModelNotFound` in plain words.

    ``force_cpu`` runs it on the CPU even where Metal is available; ``keep_dtype``
    keeps its own dtype and quantization there too, as on Metal (no upcast, no
    dequantization, MLX's own ``exp``).
    """
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load

    source = resolve_model(name, model_dirs)
    metal = not force_cpu and mx.metal.is_available()
    if not metal:
        mx.set_default_device(mx.cpu)
    try:
        model, tokenizer, config = load(source, return_config=True)
    except Exception as exc:  # hub and filesystem errors come in many types
        where = "a local directory" if os.path.isabs(source) else f"Hugging Face repository {source}"
        raise ModelNotFound(
            f"model {name}: cannot load {where} ({type(exc).__name__}: {exc}); "
            "check the name, or download it where there is network access"
        ) from exc
    if not metal and not keep_dtype:
        from .fastmath import patch_model

        model = dequantize_model(model)
        model.set_dtype(mx.float32)
        patch_model(model)  # MLX's CPU exp is slow; see worker/fastmath.py
    mx.eval(model.parameters())
    dtype = describe_dtype(model)
    context = int(config.get("max_position_embeddings") or 0) if isinstance(config, dict) else 0
    return LoadedModel(
        name=name, source=source, model=model, tokenizer=tokenizer,
        device="gpu (Metal)" if metal else "cpu", dtype=dtype,
        context_length=context or _context_length(source),
    )

