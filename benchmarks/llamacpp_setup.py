"""Build llama.cpp's ``llama-server`` and a GGUF of the benchmark's model, for ``throughput.py --llama-server``.

Usage (with the project's venv)::

    .venv/bin/python benchmarks/llamacpp_setup.py [DIR] [--shape 0.5b|small] [--model-seed S] [--outtype f32|q8_0]

Everything comes from the package registries: llama.cpp's sources from
llama-cpp-python's source distribution on PyPI (it carries llama.cpp whole),
built with CMake and the system's C++ compiler for this CPU
(``GGML_NATIVE``), and a venv of its own in DIR with what llama.cpp's
``convert_hf_to_gguf.py`` imports (PyTorch 2.13.0 and transformers) to
convert the model, float32 by default. The benchmark model's tokenizer is a
small BPE trained with Qwen2's pre-tokenizer, which the converter does not
recognise by its hash, so it is told so. DIR (default
``~/.cache/mlxq-bench/llama.cpp``) keeps what each step made: a second run
redoes nothing. It prints the two options for ``throughput.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path
from typing import Optional

from harness import CACHE, BenchError, clean_env, ensure_model, log, run_command

TIMEOUT = 3600.0  # for each step (the build takes minutes)
LLAMA_CPP_PYTHON = "0.3.36"  # its sdist's vendor/llama.cpp: the llama.cpp this was measured with
CONVERT = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def _run(cmd: list, what: str, shown: Optional[list] = None) -> None:
    log(f"{what}: {' '.join(map(str, shown or cmd))}")
    run_command(list(map(str, cmd)), clean_env(), TIMEOUT, what)


def sources(root: Path) -> Path:
    """llama.cpp's source tree, from llama-cpp-python's sdist."""
    tree = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
              "--no-binary", ":all:", "-d", root], "download")
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    return tree


def server(root: Path, tree: Path) -> Path:
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    _run(["cmake", "-S", tree, "-B", root / "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
         "configure")
    _run(["cmake", "--build", root / "build", "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
         "build (several minutes)")
    return binary


def gguf(root: Path, tree: Path, model_dir: Path, outtype: str) -> Path:
    out = root / f"{model_dir.name}-{outtype}.gguf"
    if out.is_file():
        return out
    venv = root / "venv"
    python = venv / "bin" / "python"
    if not python.is_file():
        _run([sys.executable, "-m", "venv", venv], "venv")
        _run([python, "-m", "pip", "install", "-q", "torch==2.13.0", "transformers>=4.57,<5", "numpy",
              "sentencepiece", "safetensors", "protobuf", tree / "gguf-py"], "install the converter's packages")
    partial = out.with_suffix(".partial")
    options = [model_dir, "--outtype", outtype, "--outfile", partial]
    _run([python, "-c", CONVERT, tree, *options], "convert", [tree / "convert_hf_to_gguf.py", *options])
    partial.rename(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=CACHE / "llama.cpp")
    parser.add_argument("--shape", choices=("0.5b", "small"), default="0.5b")
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--outtype", choices=("f32", "q8_0"), default="f32")
    args = parser.parse_args()
    root = args.dir.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = ensure_model(args.shape, args.model_seed, 1800)
        tree = sources(root)
        binary = server(root, tree)
        model = gguf(root, tree, model_dir, args.outtype)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"--llama-server {binary} --llama-gguf {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
