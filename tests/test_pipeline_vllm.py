"""The data stages end to end on a real vLLM (CPU) server with the tiny model, into S3 on a moto server.

One server for the whole module (it takes about a minute to start); every stage is run the way a cluster Job
runs it (`selflengthen stage NAME --config FILE --iteration K --endpoint URL`), in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from selflengthen.pipeline.artifacts import StageArtifacts
from selflengthen.pipeline.stages import DATA_STAGES
from selflengthen.pipeline.store import S3Store

from conftest import BUCKET, S3_CREDENTIALS

pytestmark = pytest.mark.vllm


def write_config(path: Path, name: str, s3_endpoint: str, **overrides) -> Path:
    config = {
        "name": name,
        "iterations": 1,
        "seed": 7,
        "sampling": {"maxTokens": 64},
        "selfInstruct": {"instructionsPerIteration": 12, "maxTries": 3, "maxTokens": 40, "judge": False},
        "respond": {"samplesPerInstruction": 2, "maxRetries": 2},
        "extend": {"attempts": 1, "passes": 2, "maxRetries": 2, "maxTokens": 120},
        "filters": {"checkEnding": False, "checkMeta": False, "dropShort": False},
        "client": {"concurrency": 4, "deadlineSeconds": 60},
        "storage": {"uri": f"s3://{BUCKET}/pipeline", "endpointUrl": s3_endpoint, "shardSize": 2},
        **overrides,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def stage_command(name: str, config: Path, endpoint: str) -> list[str]:
    return [sys.executable, "-m", "selflengthen", "stage", name, "--config", str(config), "--iteration", "1",
            "--endpoint", endpoint]


def stage_env() -> dict:
    return {**os.environ, **S3_CREDENTIALS, "PYTHONSAFEPATH": "1"}


def run_stage_cli(name: str, config: Path, endpoint: str) -> dict:
    proc = subprocess.run(stage_command(name, config, endpoint), capture_output=True, text=True, env=stage_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture
def store(s3_endpoint):
    return S3Store(BUCKET, "pipeline", endpoint_url=s3_endpoint)


def rows(store, run: str, stage: str) -> list[dict]:
    return list(StageArtifacts(store, run, 1, stage).read_outputs())


def test_data_stages_on_real_vllm_into_s3(vllm_endpoint, s3_endpoint, store, tmp_path):
    config = write_config(tmp_path / "run.yaml", "e2e", s3_endpoint)
    manifests = {name: run_stage_cli(name, config, vllm_endpoint) for name in DATA_STAGES}

    si = manifests["self-instruct"]["counts"]
    instructions = rows(store, "e2e", "self-instruct")
    assert si["requested"] == 12 and si["accepted"] == len(instructions) > 0
    assert si["requests"] >= si["requested"]
    texts = [r["instruction"].strip().lower() for r in instructions]
    assert len(set(texts)) == len(texts), "self-instruct must deduplicate"
    assert all(3 < r["words"] < 500 for r in instructions)

    responses = rows(store, "e2e", "respond")
    rc = manifests["respond"]["counts"]
    assert rc["requested"] == 2 * len(instructions)
    assert rc["accepted"] == len(responses) > 0
    assert {r["instructionId"] for r in responses} <= {r["id"] for r in instructions}
    assert len({r["id"] for r in responses}) == len(responses)

    extended = rows(store, "e2e", "extend")
    ec = manifests["extend"]["counts"]
    assert ec["requested"] == len(responses) and ec["accepted"] == len(extended)
    assert ec["requests"] > 0
    for row in extended:  # every accepted extension really grew past the minimum
        assert row["words"] > 1.2 * row["initialWords"]
        assert row["responseId"] in {r["id"] for r in responses}
    for name in DATA_STAGES:
        assert StageArtifacts(store, "e2e", 1, name).done()

    # A finished stage run again does nothing: same manifest, no new requests.
    again = run_stage_cli("respond", config, vllm_endpoint)
    assert again["finishedAt"] == manifests["respond"]["finishedAt"]


def test_killed_stage_resumes_without_duplicates(vllm_endpoint, s3_endpoint, store, tmp_path):
    config = write_config(tmp_path / "run.yaml", "resume", s3_endpoint,
                          selfInstruct={"instructionsPerIteration": 24, "maxTries": 3, "maxTokens": 40,
                                        "judge": False})
    run_stage_cli("self-instruct", config, vllm_endpoint)
    respond = StageArtifacts(store, "resume", 1, "respond")
    instructions = rows(store, "resume", "self-instruct")
    shards = -(-len(instructions) // 2)
    assert shards >= 3, "the test needs several shards to stop the stage midway"

    # Start the stage as a Job would, and kill it hard once some (but not all) shards are written.
    proc = subprocess.Popen(stage_command("respond", config, vllm_endpoint), env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not respond.work_done() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    kept = {i: respond.read_work(i) for i in respond.work_done()}
    assert kept, "no shard was finished before the kill"
    assert len(kept) < shards, "the stage finished before it could be killed: use more items"
    assert not respond.done()

    manifest = run_stage_cli("respond", config, vllm_endpoint)
    assert respond.done()
    for index, shard in kept.items():  # finished shards were kept, not redone
        assert respond.read_work(index) == shard
    work = list(respond.iter_work())
    per_instruction = Counter(r["instructionId"] for r in work)
    assert set(per_instruction) == {r["id"] for r in instructions}
    assert all(n == 2 for n in per_instruction.values()), "every instruction sampled exactly twice"
    outputs = rows(store, "resume", "respond")
    ids = [r["id"] for r in outputs]
    assert len(ids) == len(set(ids)), "no duplicate items after resume"
    assert manifest["counts"]["requested"] == 2 * len(instructions)
    assert manifest["counts"]["accepted"] == len(outputs) == sum(1 for r in work if r["id"])


def test_metrics_move_with_the_pipeline(vllm_endpoint, tmp_path):
    """A local run in this process, on a fresh registry: every counter matches the manifests it came from."""
    from prometheus_client import CollectorRegistry

    from selflengthen.pipeline.config import load_config
    from selflengthen.pipeline.metrics import Metrics
    from selflengthen.pipeline.runner import run_local

    path = write_config(tmp_path / "run.yaml", "metrics", "http://unused",
                        storage={"uri": f"file://{tmp_path}/store", "shardSize": 4},
                        filters={"checkEnding": False, "checkMeta": False},
                        training={"maxSteps": 2, "cutoffTokens": 512}, evaluate={"enabled": False})
    config = load_config(path)
    config = config.model_copy(update={"models": config.models.model_copy(update={"endpoint": vllm_endpoint})})
    registry = CollectorRegistry()
    results = run_local(config, progress=False, metrics=Metrics(registry))[1]

    def value(name: str, **labels) -> float:
        got = registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    for stage in DATA_STAGES:
        manifest = results[stage]
        labels = {"run": "metrics", "iteration": "1", "stage": stage}
        counts = manifest["counts"]
        assert value("selflengthen_stage_items_total", **labels, outcome="requested") == counts["requested"]
        assert value("selflengthen_stage_items_total", **labels, outcome="accepted") == counts["accepted"]
        for reason, n in counts["rejected"].items():
            assert value("selflengthen_stage_rejections_total", **labels, reason=reason) == n
        assert value("selflengthen_stage_items_done", **labels) == value("selflengthen_stage_items_planned", **labels)
    respond, extend = results["respond"], results["extend"]
    assert value("selflengthen_response_words_count", run="metrics", iteration="1", kind="initial") == \
        respond["counts"]["accepted"]
    assert value("selflengthen_response_words_count", run="metrics", iteration="1", kind="extended") == \
        extend["counts"]["accepted"]
    assert respond["counts"]["droppedShort"] == value("selflengthen_stage_items_total", run="metrics", iteration="1",
                                                      stage="respond", outcome="dropped_short")
    run = {"run": "metrics", "namespace": "local"}
    assert value("selflengthen_run_phase", **run, phase="Succeeded") == 1
    assert value("selflengthen_run_phase", **run, phase="Generating") == 0
    assert value("selflengthen_iteration_average_words", **run, iteration="1", kind="extended") == \
        extend["averageWords"]
    assert value("selflengthen_generated_tokens_total", run="metrics", stage="respond") > 0
    assert value("selflengthen_inference_requests_total", run="metrics", stage="extend", result="ok") == \
        extend["counts"]["requests"]
    train = results["train-generator"]
    assert value("selflengthen_training_step", run="metrics", iteration="1", role="generator") == train["steps"]
    assert value("selflengthen_training_loss", run="metrics", iteration="1", role="generator") == \
        pytest.approx(train["finalLoss"])
    assert value("selflengthen_iteration_training_loss", **run, iteration="1", role="extender") == \
        pytest.approx(results["train-extender"]["finalLoss"])
