"""LoRA adapters (mlx-lm format: ``adapter_config.json`` + ``adapters.safetensors``).

A request names an adapter in ``lora``: a name in the worker's adapters
directory, or a path inside it. Nothing outside that directory is ever read.
Each adapter gets a copy of the model's module tree that shares the base
weights (no copy of them) with the adapter's LoRA layers on top.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from .errors import RequestRejected

__all__ = ["resolve_adapter", "with_adapter"]


def resolve_adapter(adapters_dir: Optional[str], name: str) -> str:
    """The adapter directory that ``name`` means; raises :class:`RequestRejected`."""
    if not adapters_dir:
        raise RequestRejected(
            f"field 'lora': no LoRA adapters are configured on this worker (start it with --adapters-dir); "
            f"cannot use {name!r}"
        )
    root = Path(adapters_dir).expanduser().resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise RequestRejected(f"field 'lora': {name!r} is outside the adapters directory")
    if not (path / "adapter_config.json").is_file() or not (path / "adapters.safetensors").is_file():
        raise RequestRejected(f"field 'lora': no adapter {name!r} in the adapters directory")
    return str(path)


def _clone(module):
    """A copy of a module tree whose leaves (the weight arrays) are the original's."""
    import mlx.nn as nn

    new = copy.copy(module)
    for key, value in list(new.items()):
        if isinstance(value, nn.Module):
            new[key] = _clone(value)
        elif isinstance(value, list):
            new[key] = [_clone(v) if isinstance(v, nn.Module) else v for v in value]
    return new


def with_adapter(model, adapter: str, float32: bool):
    """``model`` with the LoRA adapter at ``adapter`` applied, base weights shared.

    ``float32``: compute in float32 (the CPU path); else the adapter keeps its dtype.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_adapters

    adapted = load_adapters(_clone(model), adapter)
    adapted.eval()
    if float32:
        adapted.set_dtype(mx.float32)
    mx.eval(adapted.parameters())
    return adapted
