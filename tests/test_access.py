"""Access: password and TLS Redis URLs, no secret in any output, ids, prompts stay data."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import WorkerProcess, free_port, run_mlxq, wait_until, write_jsonl
from mlxq.jobs.errors import StoreError
from mlxq.jobs.models import PromptRequest
from mlxq.jobs.store import JobStore

SECRET = "s3cret-Pa55"


@pytest.fixture
def tls_redis(tmp_path):
    """A private Redis that takes only TLS connections with a password."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", SECRET, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"rediss://:{SECRET}@localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    store = JobStore.from_url(url)

    def answers() -> bool:
        try:
            store.ping()
            return True
        except StoreError:
            return False

    wait_until("the TLS redis-server to answer", answers, 60, 0.1)
    yield url
    proc.kill()
    proc.wait()


def test_tls_and_password_work_end_to_end_and_no_secret_is_shown(tmp_path, tls_redis, tiny_model):
    log = tmp_path / "worker.log"
    with WorkerProcess(tls_redis, tiny_model, log, concurrency=2):
        path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello", "max_tokens": 5}, {"prompt": ""}])
        done = run_mlxq("submit", str(path), "--model", str(tiny_model), "--wait", "--json", redis_url=tls_redis)
        assert done.returncode == 0, done.stderr + log.read_text()
        final = json.loads(done.stdout.splitlines()[-1])
        assert final["status"] == "completed" and final["counts"]["completed"] == 1
        outputs = [done.stdout, done.stderr]
        for args in (("status", final["job_id"]), ("results", final["job_id"]), ("status", "f" * 32)):
            r = run_mlxq(*args, redis_url=tls_redis)
            outputs += [r.stdout, r.stderr]
        assert "completed" in outputs[2]
    text = log.read_text()
    assert "Connected to rediss://" in text  # it really went over TLS
    assert "rediss://:***@localhost" in text  # and our own log line masks the password
    for output in outputs + [text]:
        assert SECRET not in output


def test_wrong_password_is_one_masked_line(tls_redis, tmp_path):
    wrong = tls_redis.replace(SECRET, "nope-nope")
    r = run_mlxq("jobs", redis_url=wrong)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "nope-nope" not in r.stderr and ":***@" in r.stderr


def test_job_ids_are_128_random_bits(store, tmp_path):
    ids = {store.new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_prompts_are_data_not_templates(worker):
    """Template syntax in a prompt reaches the model as text; nothing evaluates it."""
    sneaky = "{{ 7 * 7 }} {% for x in range(3) %}loop{% endfor %} $(rm -rf /) `id`"
    rendered = worker.engine.render(PromptRequest(prompt=sneaky))
    assert sneaky in rendered and "49" not in rendered and "looploop" not in rendered
    assert worker.engine.render(PromptRequest(prompt=sneaky, raw=True)) == sneaky
