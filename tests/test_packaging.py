"""Packaging: one import namespace, ``mlxq``, as installed from a wheel, away from the repository.

``python -m pytest`` from the repository root puts the root on ``sys.path``, so
a stale ``import jobs`` would still work inside the tests; these tests import
the built wheel from a directory outside the repository instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"cancel", "jobs", "models", "render", "results", "retry", "run", "serve", "status", "stream", "submit",
            "worker", "workers"}

# Imports every module of the installed package (MLX and Celery included), then
# reports where mlxq came from and whether any old top-level name got imported.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import mlxq
names = sorted(m.name for m in pkgutil.walk_packages(mlxq.__path__, "mlxq.") if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
print(json.dumps({"file": mlxq.__file__, "modules": names, "public": mlxq.__all__,
                  "stale": sorted(n for n in sys.modules if n.split(".")[0] in ("jobs", "worker", "cli", "server"))}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tree: setuptools' build/ left in the tree keeps deleted files."""
    source = tmp_path_factory.mktemp("source") / "mlxq"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, timeout=600)
    [built] = out.glob("mlxq-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked into a directory of its own (a pure-Python wheel installs so)."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def _python(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_installs_only_mlxq(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {name.split("/")[0] for name in names}
        dist_info = next(t for t in tops if t.endswith(".dist-info"))
        assert tops == {"mlxq", dist_info}, tops
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert re.search(r"^mlxq = mlxq\.cli:main$", entry_points, re.M), entry_points
    for module in ("__init__", "__main__", "jobs/store", "jobs/scripts", "worker/engine", "worker/tasks",
                   "cli/__init__", "cli/submit"):
        assert f"mlxq/{module}.py" in names, module
    assert "mlxq/worker/smallgemm.c" in names  # the worker compiles it where it runs
    assert not any("/tests/" in n or "/benchmarks/" in n for n in names)


def test_every_module_imports_from_outside_the_repository(installed, tmp_path):
    out = _python(installed, tmp_path, "-c", _IMPORT_ALL)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert Path(report["file"]).is_relative_to(installed), report["file"]
    assert {"mlxq.jobs.store", "mlxq.worker.service", "mlxq.cli.run", "mlxq.server.app", "mlxq.client"} <= set(
        report["modules"])
    assert report["stale"] == []
    assert {"Client", "Job", "JobStatus", "PromptRequest", "ResultLine", "MlxqError", "InputError"} <= set(
        report["public"])


def test_python_m_mlxq_lists_every_command_from_outside_the_repository(installed, tmp_path):
    out = _python(installed, tmp_path, "-m", "mlxq", "--help")
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^  (\w+)\s", out.stdout.split("Commands:")[1], re.M))
    assert listed == COMMANDS


def test_nothing_imports_the_old_top_level_names():
    """Code, tests and benchmarks: ``import jobs`` would work from the root, and only there."""
    stale = re.compile(r"^\s*(from|import)\s+(jobs|worker|cli|server)\b|[\"']-m[\"'],\s*[\"'](jobs|worker|cli|server)\b")
    found = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part.startswith(".") or part in ("build", "site-packages") for part in path.relative_to(ROOT).parts):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if stale.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
