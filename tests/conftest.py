"""Session fixtures shared by the test modules: real servers started once per test run.

- `vllm_endpoint`: a real vLLM (CPU) server with the locally built tiny model, serving `generator` and `extender`;
- `s3_endpoint`: a moto S3 server on loopback with a bucket `runs`, AWS credentials set in the environment;
- `prometheus`: a factory starting real Prometheus servers (the Debian package) on loopback.
"""

from __future__ import annotations

import os
import shutil

import pytest

from prometheus_server import PrometheusServer

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "runs"


@pytest.fixture(scope="session")
def vllm_endpoint(tmp_path_factory):
    from selflengthen.pipeline.serving import VLLMServer
    from selflengthen.pipeline.tinymodel import ensure_tiny_model

    model = ensure_tiny_model()
    with VLLMServer(str(model), served_names=["generator", "extender", "base"], max_model_len=2048,
                    workdir=tmp_path_factory.mktemp("vllm")) as server:
        yield server.endpoint


@pytest.fixture(scope="session")
def s3_endpoint():
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    """prometheus(targets={job: [host:port, ...]}, rule_files=[...]) -> a started PrometheusServer."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run installs it (make tools)")
        pytest.skip("prometheus is not installed (make tools installs the Debian package)")
    servers = []

    def start(targets: dict[str, list[str]], rule_files=()) -> PrometheusServer:
        server = PrometheusServer(binary, targets, rule_files, tmp_path_factory.mktemp("prometheus"))
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def _paths(monkeypatch):
    """kmock's path parser with our fix for /api/v1/namespaces (kube_fixtures.parse_path), for one test."""
    from kmock._internal import parsing

    from kube_fixtures import parse_path

    monkeypatch.setattr(parsing, "parse_path", parse_path)


def imported_by(modules: list[str]) -> set[str]:
    """The selflengthen modules a fresh interpreter has loaded after importing `modules`: what an import pulls in,
    which the test process itself (already importing everything) cannot tell."""
    import json
    import subprocess
    import sys

    loaded = "print(json.dumps([m for m in sys.modules if m.startswith('selflengthen')]))"
    script = "; ".join([*(f"import {m}" for m in modules), "import sys, json", loaded])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))
