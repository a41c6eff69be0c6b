"""Limits and hostile input: memory bounded by one line, clear errors, nothing half-queued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import run_cli, write_jsonl

NO_WORKER = "no-worker-serves-this-model"


def _no_job_left(redis_client) -> bool:
    return not any(k.startswith(b"mlxq:job:") for k in redis_client.scan_iter("mlxq:*"))


_COUNT = """
import resource, sys
from mlxq.jobs.ingest import read_lines
lines = errors = 0
with open(sys.argv[1], "rb") as f:
    for line in read_lines(f):
        lines += 1
        errors += line.error is not None
print(lines, errors, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _count(path) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", _COUNT, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    lines, errors, rss_kb = map(int, out.stdout.split())
    return lines, errors, rss_kb


def test_a_million_line_file_is_read_in_memory_bounded_by_one_line(tmp_path):
    good = b'{"prompt": "hello there", "max_tokens": 8}\n'
    big, small = tmp_path / "million.jsonl", tmp_path / "ten.jsonl"
    with open(big, "wb") as f:
        for _ in range(100_000):
            f.write(good * 9 + b'{"prompt": 5}\n')
    small.write_bytes(good * 9 + b'{"prompt": 5}\n')
    lines, errors, rss_big = _count(big)
    assert (lines, errors) == (1_000_000, 100_000)
    _, _, rss_small = _count(small)
    # A 40 MB file costs the reader no more memory than a ten-line one (give or take allocator noise).
    assert os.path.getsize(big) > 40_000_000
    assert rss_big - rss_small < 8_000, (rss_big, rss_small)


def test_too_many_requests_refuses_the_file_and_leaves_nothing(tmp_path, redis_client, redis_url):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"prompt": "x"}\n' * 200_001)
    out = run_cli(redis_url, "submit", str(path), "--model", NO_WORKER, "--max-requests", "200000")
    assert out.exit_code == 2
    assert "more than the limit of 200000 requests" in out.stderr and "--max-requests" in out.stderr
    assert _no_job_left(redis_client)


def test_too_many_tokens_refuses_the_file_and_leaves_nothing(tmp_path, redis_client, redis_url):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "x", "max_tokens": 600}] * 3)
    out = run_cli(redis_url, "submit", str(path), "--model", NO_WORKER, "--max-total-tokens", "1000")
    assert out.exit_code == 2
    assert "line 2" in out.stderr and "limit of 1000 tokens" in out.stderr and "--max-total-tokens" in out.stderr
    assert _no_job_left(redis_client)


def test_an_oversized_line_fails_alone(tmp_path, redis_client, redis_url):
    rows = [{"prompt": "ok"}, {"prompt": "y" * 131072}, {"prompt": "y" * 131073}, {"prompt": "z" * 3_000_000}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    out = run_cli(redis_url, "submit", str(path), "--model", NO_WORKER, "--json", "--max-line-bytes", "1000000")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) | {"job_id": None} == {"job_id": None, "total": 4, "invalid": 2}
    assert "line 3: field 'prompt'" in out.stderr and "131072" in out.stderr
    assert "line 4: longer than the limit of 1000000 bytes" in out.stderr


def test_retention_is_applied_to_the_job(tmp_path, store, redis_client, redis_url):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "x"}])
    out = run_cli(redis_url, "submit", str(path), "--model", NO_WORKER, "--json", "--retention", "120")
    job_id = json.loads(out.stdout)["job_id"]
    assert 100 < redis_client.ttl(store.keys(job_id).job) <= 120
    assert 100 < redis_client.ttl(store.keys(job_id).requests) <= 120


_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
)
_json = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)
_line = st.one_of(
    st.binary(max_size=200).filter(lambda b: b"\n" not in b),
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"prompt": st.text(max_size=50)}, optional={
        "temperature": _json, "max_tokens": _json, "messages": _json, "seed": _json, "raw": _json,
    }).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"NaN", b'{"prompt": "x", "temperature": Infinity}', b"[" * 5000, b'{"prompt": "\\u0000\\u001f"}',
                     b'{"prompt": "x", "seed": 99999999999999999999999999}', b"\xff\xfe\xfd"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=12))
def test_fuzzed_files_never_crash_and_never_half_enqueue(tmp_path_factory, redis_client, redis_url, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(b"\n".join(lines))
    before = {k for k in redis_client.scan_iter("mlxq:job:*")}
    out = run_cli(redis_url, "submit", str(path), "--model", NO_WORKER, "--json")
    assert "Traceback" not in out.output
    created = {k for k in redis_client.scan_iter("mlxq:job:*")} - before
    if out.exit_code == 0:
        summary = json.loads(out.stdout)
        assert summary["total"] >= 1 and summary["invalid"] < summary["total"]
        assert out.stderr.count("warning: line ") == min(summary["invalid"], 10)
    else:
        assert out.exit_code == 2 and out.stderr.startswith("Error: ") and out.stderr.count("\n") == 1
        assert created == set()
