"""The command line as a user meets it: help, completion, listing, watching, packaging."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from helpers import run_cli, submit_and_wait, write_jsonl
from mlxq.cli import cli
from mlxq.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    listed = runner.invoke(cli, ["--help"]).output.split("Commands:")[1].split()
    assert set(COMMANDS) <= set(listed)
    for name in COMMANDS:
        out = runner.invoke(cli, [name, "--help"])
        assert out.exit_code == 0, name
        assert "Example" in out.output, f"mlxq {name} --help has no example"


def test_no_command_module_imports_the_group():
    """The group names its commands (mlxq.cli.main.COMMANDS); none imports it back."""
    for path in (ROOT / "cli").glob("*.py"):
        if path.name in ("__init__.py", "main.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = {alias.name for alias in node.names}
                assert target not in (".main", "mlxq.cli.main"), path.name
                assert not (target in (".", "mlxq.cli") and names & {"main", "cli"}), path.name


def test_shell_completion_script():
    out = subprocess.run([sys.executable, "-m", "mlxq"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, _MLXQ_COMPLETE="bash_source"))
    assert "_mlxq_completion" in out.stdout and "complete " in out.stdout


def test_jobs_lists_newest_first_and_status_watch_is_plain_when_piped(tmp_path, redis_client, redis_url,
                                                                      tiny_model, worker):
    first = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "max_tokens": 3}]))
    second = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "max_tokens": 3}]))
    out = run_cli(redis_url, "jobs")
    ids = [line.split()[0] for line in out.stdout.splitlines()]
    assert ids[:2] == [second["job_id"], first["job_id"]]
    assert "completed" in out.stdout and "1/1 done" in out.stdout
    out = run_cli(redis_url, "status", first["job_id"], "--watch")
    assert out.exit_code == 0
    assert f"job {first['job_id']}: completed 1/1 done, 0 failed" in out.stderr
    assert "tok/s" in out.stderr
    data = json.loads(run_cli(redis_url, "status", first["job_id"], "--json").stdout)
    assert data["tokens"] >= 1


def test_unreachable_redis_suggests_the_fix():
    out = CliRunner().invoke(cli, ["--redis-url", "redis://127.0.0.1:1/0", "jobs"])
    assert out.exit_code == 1 and "mlxq run" in out.stderr and "MLXQ_REDIS_URL" in out.stderr


def test_models_lists_the_seed_alias(tmp_path):
    out = CliRunner().invoke(cli, ["models", "--json"], env={"HF_HOME": str(tmp_path)})
    data = json.loads(out.stdout)
    assert data["aliases"] == [{"name": "@cf/qwen/qwen1.5-0.5b-chat",
                                "repo": "mlx-community/Qwen1.5-0.5B-Chat-4bit", "cached": False}]
    assert data["cached"] == []


def test_compose_file_has_persistent_redis_workers_the_api_and_flower():
    """No Docker engine runs here; this checks the file's structure, not a running stack."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    redis = compose["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    worker = compose["worker"]
    dockerfile = ROOT / worker["build"]["dockerfile"]
    assert dockerfile.is_file()
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["MLXQ_REDIS_URL"].startswith("redis://redis:")
    assert "flower" in compose["flower"]["command"]
    api = compose["api"]  # mlxq serve: beyond loopback in its container, so with a token
    assert api["command"][0] == "serve" and api["build"] == worker["build"]
    assert "MLXQ_API_TOKEN" in api["environment"] and api["ports"] == ["127.0.0.1:8000:8000"]
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    installs = " ".join(line for line in dockerfile.read_text().splitlines() if "apt-get install" in line)
    # OpenBLAS for speed, and g++: MLX builds its fused CPU kernels with it (unfused ones are ~2x slower).
    assert "libopenblas0-pthread" in installs.split() and "g++" in installs.split()
