"""The local vLLM server is killed in the middle of `respond` and then of `extend` (a real vLLM CPU process).

Each time the client fails fast with a clear error (not after its deadline), and running the same command again
starts a new server and finishes the stage from its last completed shard: every input item is processed
exactly once, finished shards are kept as they were, no duplicates, no partial files.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest

from selflengthen.pipeline.artifacts import StageArtifacts
from selflengthen.pipeline.config import parse_config
from selflengthen.pipeline.runner import Endpoints, run_local
from selflengthen.pipeline.stages import StageError
from selflengthen.pipeline.store import open_store

pytestmark = pytest.mark.vllm


def config_for(tmp_path):
    return parse_config({
        "name": "killed", "iterations": 1, "seed": 11,
        "sampling": {"maxTokens": 48},
        "selfInstruct": {"instructionsPerIteration": 16, "maxTries": 3, "maxTokens": 40, "judge": False},
        "respond": {"maxRetries": 2},
        "extend": {"attempts": 1, "passes": 2, "maxRetries": 2, "maxTokens": 96},
        "filters": {"checkEnding": False, "checkMeta": False},
        # A long deadline: the failure must come from noticing the dead server ("gone"), not from the deadline.
        "client": {"concurrency": 2, "deadlineSeconds": 600},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 2},
        "evaluate": {"enabled": False},
        "training": {"maxSteps": 1},
        "local": {"startupTimeoutSeconds": 600},
    })


def kill_server_when(endpoints: Endpoints, artifacts: StageArtifacts, stop: threading.Event) -> None:
    """Kill the server's process group once the stage has written its first work shard."""
    while not stop.is_set():
        server = endpoints.server
        if server is not None and server.process is not None and artifacts.work_done():
            os.killpg(server.process.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def run_and_kill(config, tmp_path, stage: str) -> dict[int, list[dict]]:
    store = open_store(config.storage.uri)
    artifacts = StageArtifacts(store, config.name, 1, stage)
    endpoints = Endpoints(config, store, tmp_path / "work")
    stop = threading.Event()
    killer = threading.Thread(target=kill_server_when, args=(endpoints, artifacts, stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(StageError) as failure:
            run_local(config, progress=False, endpoints=endpoints, workdir=tmp_path / "work")
    finally:
        stop.set()
        killer.join(5)
    message = str(failure.value)
    assert f"stage {stage}" in message and "gone" in message and "127.0.0.1" in message, message
    assert not artifacts.done()
    kept = {i: artifacts.read_work(i) for i in artifacts.work_done()}
    assert kept
    return kept


def test_killed_server_fails_fast_and_the_rerun_resumes(tmp_path):
    config = config_for(tmp_path)
    store = open_store(config.storage.uri)
    kept_respond = run_and_kill(config, tmp_path, "respond")
    kept_extend = run_and_kill(config, tmp_path, "extend")  # the rerun resumes respond, then dies in extend

    results = run_local(config, progress=False, workdir=tmp_path / "work")[1]
    for stage, kept in (("respond", kept_respond), ("extend", kept_extend)):
        artifacts = StageArtifacts(store, config.name, 1, stage)
        assert artifacts.done()
        for index, rows in kept.items():
            assert artifacts.read_work(index) == rows, f"{stage} shard {index} was redone"
        outputs = list(artifacts.read_outputs())
        ids = [r["id"] for r in outputs]
        assert len(ids) == len(set(ids)) == results[stage]["counts"]["accepted"]
    instructions = {r["id"] for r in StageArtifacts(store, config.name, 1, "self-instruct").read_outputs()}
    per_instruction = Counter(r["instructionId"] for r in StageArtifacts(store, config.name, 1, "respond").iter_work())
    assert set(per_instruction) == instructions and set(per_instruction.values()) == {2}
    responses = {r["id"] for r in StageArtifacts(store, config.name, 1, "respond").read_outputs()}
    extended = Counter(r["responseId"] for r in StageArtifacts(store, config.name, 1, "extend").iter_work())
    assert set(extended) == responses and set(extended.values()) == {1}
    # No partial or temporary files anywhere in the store.
    assert not [k for k in store.list(config.name) if ".tmp" in k or k.rsplit("/", 1)[-1].startswith(".")]
