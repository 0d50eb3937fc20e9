"""Credentials come only from the environment and never leak: a small real pipeline (self-instruct -> respond ->
extend on the real vLLM CPU server, artifacts in S3 on moto) runs with distinctive test credentials, and every
stored object (keys, bodies, metadata: config, work shards, outputs, manifests, markers), every log record (DEBUG
and up), what the CLI printed and the metrics it exported are scanned for them: none may appear.

The stages run through the CLI in-process, exactly as a cluster Job runs them (`selflengthen -v stage NAME
--config FILE --iteration 1 --endpoint URL`), so the CLI's own logging set-up is part of what is tested.
"""

from __future__ import annotations

import logging
import secrets
import signal
import uuid

import boto3
import pytest
import yaml

from selflengthen import cli
from selflengthen.pipeline.config import load_config
from selflengthen.pipeline.identity import save_config
from selflengthen.pipeline.inference import InferenceClient
from selflengthen.pipeline.stages import DATA_STAGES
from selflengthen.pipeline.store import open_store

from conftest import BUCKET

pytestmark = pytest.mark.vllm

API_KEY_ENV = "SL_TEST_INFERENCE_API_KEY"


@pytest.fixture
def credentials(monkeypatch, s3_endpoint) -> dict[str, str]:
    """Distinctive credentials in the environment (the only place they may come from)."""
    token = secrets.token_hex(8)
    values = {
        "AWS_ACCESS_KEY_ID": f"SLTESTKEYID{token.upper()}",
        "AWS_SECRET_ACCESS_KEY": f"sl-test-secret-{token}",
        "AWS_SESSION_TOKEN": f"sl-test-session-{token}",
        API_KEY_ENV: f"sl-test-apikey-{token}",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_no_credential_leaks_into_store_logs_output_or_metrics(tmp_path, s3_endpoint, vllm_endpoint, credentials,
                                                              caplog, capsys, monkeypatch):
    prefix = f"secrets-{uuid.uuid4().hex[:8]}"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({
        "name": "secrets", "iterations": 1, "seed": 3,
        "models": {"apiKeyEnv": API_KEY_ENV},
        "sampling": {"maxTokens": 48},
        "selfInstruct": {"instructionsPerIteration": 4, "maxTries": 2, "maxTokens": 32, "judge": False},
        "respond": {"samplesPerInstruction": 1, "maxRetries": 2},
        "extend": {"attempts": 1, "passes": 1, "maxRetries": 1, "maxTokens": 64},
        "filters": {"checkEnding": False, "checkMeta": False, "dropShort": False},
        "client": {"concurrency": 4, "deadlineSeconds": 60},
        "storage": {"uri": f"s3://{BUCKET}/{prefix}", "endpointUrl": s3_endpoint, "shardSize": 2},
    }))
    # the API key really is used (read from the variable the configuration names)
    keys_used = []
    real_init = InferenceClient.__init__

    def spy(self, *args, **kwargs):
        keys_used.append(kwargs.get("api_key"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(InferenceClient, "__init__", spy)

    caplog.set_level(logging.DEBUG)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        config = load_config(config_path)
        save_config(open_store(config.storage.uri, config.storage.endpoint_url), config)  # as the local runner does
        for stage in DATA_STAGES:
            argv = ["-v", "stage", stage, "--config", str(config_path), "--iteration", "1", "--endpoint",
                    vllm_endpoint]
            assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # the CLI turns SIGTERM into KeyboardInterrupt: not for pytest
    printed = capsys.readouterr()
    assert keys_used == [credentials[API_KEY_ENV]] * len(DATA_STAGES)

    # everything the run left behind, and everything it said
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for obj in page.get("Contents", [])]
    assert f"{prefix}/secrets/config.yaml" in keys
    for stage in DATA_STAGES:
        assert f"{prefix}/secrets/iter-01/{stage}/manifest.json" in keys
        assert f"{prefix}/secrets/iter-01/{stage}/_SUCCESS" in keys
    assert sum("/work/part-" in key for key in keys) >= 3
    scanned = {"stdout": printed.out, "stderr": printed.err,
               "logs": "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)}
    for key in keys:
        head = client.head_object(Bucket=BUCKET, Key=key)
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        scanned[f"s3://{BUCKET}/{key}"] = f"{key}\n{head.get('Metadata')}\n{body.decode('utf-8', 'replace')}"
    from prometheus_client import REGISTRY, generate_latest

    scanned["metrics"] = generate_latest(REGISTRY).decode()
    assert caplog.records and printed.out  # the scan has something to scan
    assert "apiKeyEnv: " + API_KEY_ENV in scanned[f"s3://{BUCKET}/{prefix}/secrets/config.yaml"]  # the name, only

    leaks = [(where, name) for where, text in scanned.items() for name, value in credentials.items() if value in text]
    assert not leaks, leaks
