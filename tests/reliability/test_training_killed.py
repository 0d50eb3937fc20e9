"""The training process is killed (SIGKILL, mid-epoch) and its pod's disk is lost: the re-run of the same
`selflengthen stage train-extender` command resumes from the last checkpoint in the store, not from step 0, and
ends with one log line per step and a complete model in the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("peft")

from selflengthen.pipeline.artifacts import StageArtifacts  # noqa: E402
from selflengthen.pipeline.config import parse_config  # noqa: E402
from selflengthen.pipeline.stages import StageContext  # noqa: E402
from selflengthen.pipeline.stages.build_sft import sft_artifacts  # noqa: E402
from selflengthen.pipeline.store import LocalStore, read_jsonl  # noqa: E402
from selflengthen.pipeline.training import model_prefix, stored_checkpoints  # noqa: E402
from selflengthen.pipeline.treestore import tree_complete  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 60
SAVE = 4


def sft_rows(n: int) -> list[dict]:
    return [{"id": f"x{i}", "language": "en", "messages": [
        {"role": "user", "content": f"Write about topic {i}."},
        {"role": "assistant", "content": f"Topic {i} is a fine topic.\n\nIt has parts {i}, {i + 1} and {i + 2}."},
    ]} for i in range(n)]


def stage(config_path: Path, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "SELFLENGTHEN_WORKDIR": str(workdir), "PYTHONSAFEPATH": "1",
           "SELFLENGTHEN_CACHE": os.environ.get("SELFLENGTHEN_CACHE", str(REPO / ".cache"))}
    return subprocess.Popen(
        [sys.executable, "-m", "selflengthen", "stage", "train-extender", "--config", str(config_path),
         "--iteration", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_training_resumes_from_the_stored_checkpoint(tmp_path):
    data = {"name": "killed-train", "iterations": 1, "seed": 4, "storage": {"uri": f"file://{tmp_path}/store"},
            "training": {"maxSteps": STEPS, "saveSteps": SAVE, "keepCheckpoints": 2, "cutoffTokens": 128,
                         "learningRate": 1e-3, "lora": {"rank": 4, "alpha": 8}}}
    config = parse_config(data)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(data))
    store = LocalStore(tmp_path / "store")
    ctx = StageContext(config=config, iteration=1, store=store)
    for role in ("generator", "extender"):
        sft_artifacts(ctx, role).write_outputs(sft_rows(8), 64)
    ctx.artifacts("build-sft").finish({"counts": {}})

    proc = stage(config_path, tmp_path / "work")
    try:
        deadline = time.monotonic() + 600
        while not stored_checkpoints(store, config.name, 1, "extender"):
            assert proc.poll() is None, f"training ended before its first checkpoint: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint reached the store in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-epoch: no handler runs, nothing is flushed
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = stored_checkpoints(store, config.name, 1, "extender")
    assert saved and max(saved) < STEPS
    assert not tree_complete(store, model_prefix(config.name, 1, "extender"))
    assert not StageArtifacts(store, config.name, 1, "train-extender").done()
    shutil.rmtree(tmp_path / "work")  # a new pod: only the store remains

    rerun = stage(config_path, tmp_path / "work")
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-3000:]
    manifest = json.loads(out)
    assert manifest["resumedFromStep"] == max(saved)  # not step 0
    assert manifest["steps"] == STEPS
    history = [e["step"] for e in read_jsonl(store, f"{config.name}/iter-01/train-extender/train-log.jsonl")]
    assert history == sorted(set(history)) and history[-1] == STEPS  # one line a step, none repeated
    assert tree_complete(store, model_prefix(config.name, 1, "extender"))
    assert StageArtifacts(store, config.name, 1, "train-extender").done()
