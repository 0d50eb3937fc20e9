"""The store layout (pipeline/layout.py) is the one place that spells a key: its keys are those of
docs/architecture.md, the artifacts, the trainer, the reports and the operator build theirs from it, and the
operator reads the layout without importing the trainer."""

from __future__ import annotations

import pytest

from selflengthen.pipeline import layout
from selflengthen.pipeline.artifacts import RunArtifacts, StageArtifacts, artifacts_of
from selflengthen.pipeline.store import LocalStore

from conftest import imported_by


def test_keys_of_an_iteration_and_of_the_run():
    assert layout.stage_prefix("r", 1, "respond") == "r/iter-01/respond"
    assert layout.stage_prefix("r", 3, "build-sft/generator") == layout.sft_set_prefix("r", 3, "generator") == \
        "r/iter-03/build-sft/generator"
    assert layout.stage_prefix("r", 2, "collect") == layout.collect_prefix("r") == "r/collect"
    assert layout.model_prefix("r", 2, "extender") == "r/iter-02/train-extender/model"
    assert layout.model_prefix("r", 2, layout.LENGTH_FOLLOWING) == "r/train-length-following/model"
    assert layout.checkpoint_prefix("r", 1, "generator", 40) == "r/iter-01/train-generator/checkpoints/checkpoint-40"
    assert layout.CHECKPOINT.search("/" + layout.checkpoint_prefix("r", 1, "generator", 40) + "/_COMPLETE")[1] == "40"
    assert layout.train_log_key("r", 1, "generator") == "r/iter-01/train-generator/train-log.jsonl"
    assert layout.config_key("r") == "r/config.yaml"
    assert layout.report_key("r", layout.iteration_report_name(2, "md")) == "r/report/iter-02.md"
    with pytest.raises(ValueError, match="role 'judge'"):
        layout.training_stage("judge")
    with pytest.raises(ValueError, match="reserved for iteration prefixes"):
        layout.stage_prefix("iter-01", 1, "respond")


def test_artifacts_live_where_the_layout_says(tmp_path):
    store = LocalStore(tmp_path)
    respond, collect = artifacts_of(store, "r", 2, "respond"), artifacts_of(store, "r", 2, "collect")
    assert type(respond) is StageArtifacts and respond.prefix == layout.stage_prefix("r", 2, "respond")
    assert type(collect) is RunArtifacts and collect.prefix == "r/collect"
    respond.finish({"counts": {}})
    assert store.exists(f"r/iter-02/respond/{layout.SUCCESS}") and store.exists(f"r/iter-02/respond/{layout.MANIFEST}")


def test_the_operator_does_not_import_the_trainer():
    loaded = imported_by(["selflengthen.operator.reconcile", "selflengthen.operator.resources",
                          "selflengthen.operator.probe"])
    assert "selflengthen.operator.reconcile" in loaded and "selflengthen.pipeline.training" not in loaded
