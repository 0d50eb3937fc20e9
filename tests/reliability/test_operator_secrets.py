"""The operator never leaks the credentials of a run (issue 8, security): S3 credentials (with a session token)
and a Hugging Face token live in Secrets the spec names; the operator reads the S3 ones itself (the real store
probe, boto3 against the moto S3 server on loopback) to follow the run's completion markers, and hands all of them
to pods by secretKeyRef only.

Two runs go through kmock: one to Succeeded with a stage that failed once, one to Failed. Then everything the
operator wrote to the API server (children, status, Events, kopf's own annotations), every run's final status,
every Event, every log record at every level (kopf, ours, botocore, aiohttp) and the operator's metrics are
scanned for the secret values and their base64 forms: none may appear.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import uuid

import aiohttp
import pytest

from kube_fixtures import PATHS, Cluster, RealisticKubernetes, Replica, prepare_api, spec
from selflengthen.operator.handlers import default_probe
from selflengthen.pipeline.store import open_store

from conftest import BUCKET

pytestmark = pytest.mark.kmock(cls=RealisticKubernetes)

TOKEN = "replica-secrets"  # the operator's own bearer token (not a secret of the run)


@pytest.fixture
def credentials() -> dict[str, str]:
    token = secrets.token_hex(8)
    return {
        "AWS_ACCESS_KEY_ID": f"SLOPKEYID{token.upper()}",
        "AWS_SECRET_ACCESS_KEY": f"sl-op-secret-{token}",
        "AWS_SESSION_TOKEN": f"sl-op-session-{token}",
        "HF_TOKEN": f"hf_sl_op_{token}",
    }


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


async def test_no_credential_in_status_events_logs_or_child_manifests(_paths, kmock, s3_endpoint, credentials,
                                                                     caplog):
    caplog.set_level(logging.DEBUG)
    await prepare_api(kmock)
    prefix = f"op-secrets-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{BUCKET}/{prefix}"
    # the stage "pods" write their markers with credentials of their own (the environment's)
    store = open_store(uri, s3_endpoint)
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        cluster = Cluster(kmock, session, store=store)
        s3 = {k: b64(v) for k, v in credentials.items() if k.startswith("AWS_")}
        await cluster.request("POST", PATHS["Secret"], {"metadata": {"name": "s3-credentials"}, "data": s3})
        await cluster.request("POST", PATHS["Secret"], {"metadata": {"name": "hf-token"},
                                                        "data": {"token": b64(credentials["HF_TOKEN"])}})

        def run_spec(**overrides):
            return spec(iterations=1, storage={"uri": uri, "endpointUrl": s3_endpoint,
                                               "credentialsSecret": "s3-credentials", "region": "us-east-1"},
                        inference={"hfTokenSecret": {"name": "hf-token", "key": "token"}}, **overrides)

        operator = await Replica(cluster, TOKEN, probe=default_probe).start()
        try:
            # run 1: self-instruct fails once (retried), then everything succeeds
            await cluster.apply("demo", run_spec(retry={"maxAttempts": 2, "backoffSeconds": 0}))
            await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
            await cluster.play()
            await cluster.fail("demo-i01-self-instruct-a1", "error: the inference server stayed unreachable")
            await cluster.wait(lambda s: s.get("history", [{}])[0].get("stages", {}).get("self-instruct", {})
                               .get("attempts") == 2, "attempt 2")
            while (await cluster.status()).get("phase") not in ("Succeeded", "Failed"):
                await cluster.play()
            st = await cluster.status()
            assert st["phase"] == "Succeeded", st
            # the operator really read the store with the Secret's credentials: the records come from manifests
            extend = st["history"][0]["stages"]["extend"]
            assert extend["averageWords"] == 2310.4 and st["averageWords"] == 2310
            # run 2: fails for good
            await cluster.apply("doomed", run_spec(retry={"maxAttempts": 1}))
            await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving", name="doomed")
            await cluster.play("doomed")
            await cluster.fail("doomed-i01-self-instruct-a1", "error: stage self-instruct: nothing accepted")
            failed = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed", name="doomed")
            assert "nothing accepted" in failed["failureMessage"]
        finally:
            await operator.stop()

        # credentials reach pods by reference only
        templates = [obj["spec"]["template"]["spec"] for kind in ("Job", "Deployment")
                     for obj in await cluster.items(kind)]
        assert len(templates) >= 8
        refs = set()
        for pod in templates:
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                for env in c.get("env", []):
                    if env["name"] in credentials:
                        assert "value" not in env, (c["name"], env)
                        ref = env["valueFrom"]["secretKeyRef"]
                        refs.add((env["name"], ref["name"], ref["key"]))
        assert refs == {("AWS_ACCESS_KEY_ID", "s3-credentials", "AWS_ACCESS_KEY_ID"),
                        ("AWS_SECRET_ACCESS_KEY", "s3-credentials", "AWS_SECRET_ACCESS_KEY"),
                        ("AWS_SESSION_TOKEN", "s3-credentials", "AWS_SESSION_TOKEN"),
                        ("HF_TOKEN", "hf-token", "token")}

        scanned = {
            "writes": json.dumps([(w.action, w.plural, w.name, w.body) for w in kmock.log if w.who == TOKEN]),
            "runs": json.dumps([await cluster.run("demo"), await cluster.run("doomed")]),
            "events": json.dumps(await cluster.events()),
            "children": json.dumps([await cluster.items(kind) for kind in ("Job", "Deployment", "Service",
                                                                           "ConfigMap")]),
            "logs": "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records),
        }
        from prometheus_client import REGISTRY, generate_latest

        scanned["metrics"] = generate_latest(REGISTRY).decode()

    # the scan has something to scan: the operator's writes, its logs at every level, the store client's too
    assert any(w.plural == "jobs" for w in kmock.log if w.who == TOKEN)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert any(r.getMessage().startswith("created Job/") for r in caplog.records)  # ours (kopf.objects)
    assert "s3-credentials" in scanned["children"]  # the Secret's name, only
    leaks = [(where, name) for where, text in scanned.items() for name, value in credentials.items()
             if value in text or b64(value) in text]
    where = sorted({r.name for r in caplog.records for v in credentials.values() if v in r.getMessage()})
    assert not leaks, (leaks, where)
