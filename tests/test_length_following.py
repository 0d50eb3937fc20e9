"""The length-following step after the last iteration: its place in the plan of stages, its configuration, and
its training on the tiny model (CPU): the last Generator continued on collect's rows (never its work shards) mixed
with a seeded share of the last Generator set, stored under <run>/train-length-following/, served by the local
runner under the Generator's name for its evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selflengthen.pipeline.config import ConfigError, parse_config
from selflengthen.pipeline.stages import (
    RUN_STAGES,
    StageContext,
    StageError,
    iteration_stages,
    run_stage,
    stage_module,
)
from selflengthen.pipeline.store import LocalStore

REPO = Path(__file__).resolve().parents[1]


def config(**overrides):
    return parse_config({"name": "lf", "iterations": 2, "storage": {"uri": "file:///unused"}, **overrides})


def test_the_final_stages_follow_the_last_iteration():
    cfg = config(collect={"enabled": True}, lengthFollowing={"enabled": True})
    body = ("self-instruct", "respond", "extend", "build-sft", "train-generator", "train-extender", "evaluate")
    assert iteration_stages(cfg, 1) == body
    assert iteration_stages(cfg, 2) == (*body, "collect", "train-length-following", "evaluate-length-following")
    no_eval = config(collect={"enabled": True}, lengthFollowing={"enabled": True}, evaluate={"enabled": False})
    assert iteration_stages(no_eval, 2)[-2:] == ("collect", "train-length-following")
    assert iteration_stages(config(collect={"enabled": True}), 2)[-1] == "collect"
    assert {"train-length-following", "evaluate-length-following"} <= set(RUN_STAGES)
    assert stage_module("train-length-following").REQUIRES == ("collect", "build-sft")
    assert stage_module("evaluate-length-following").REQUIRES == ("train-length-following",)


def test_length_following_needs_collect():
    with pytest.raises(ConfigError, match="lengthFollowing.enabled: trains on collect's data, so collect.enabled"):
        config(lengthFollowing={"enabled": True})
    with pytest.raises(ConfigError, match="lengthFollowing.generatorSetFraction"):
        config(collect={"enabled": True}, lengthFollowing={"enabled": True, "generatorSetFraction": 1.5})


def test_disabled_and_early_runs_do_nothing(tmp_path):
    ctx = StageContext(config=config(collect={"enabled": True}), iteration=2, store=LocalStore(tmp_path))
    assert stage_module("train-length-following").run(ctx)["enabled"] is False
    assert stage_module("evaluate-length-following").run(ctx)["enabled"] is False
    early = StageContext(config=config(collect={"enabled": True}, lengthFollowing={"enabled": True}), iteration=1,
                         store=LocalStore(tmp_path))
    with pytest.raises(StageError, match="runs after the last iteration: --iteration 2 wanted, not 1"):
        stage_module("train-length-following").run(early)


# -- training on the tiny model ----------------------------------------------------------------------------------------


def sft_rows(prefix: str, n: int, demand: bool) -> list[dict]:
    tail = " Write about 20 words." if demand else ""
    return [{"id": f"{prefix}{i}", "language": "en", "messages": [
        {"role": "user", "content": f"Describe place {i}.{tail}"},
        {"role": "assistant", "content": f"Place {i} lies by the river.\n\nIts streets are narrow and old, and "
                                         f"its people are kind."}]} for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("peft")
    os.environ.setdefault("SELFLENGTHEN_CACHE", str(REPO / ".cache"))
    from selflengthen.pipeline.stages.build_sft import sft_artifacts

    root = tmp_path_factory.mktemp("lf")
    patch = pytest.MonkeyPatch()
    patch.setenv("SELFLENGTHEN_WORKDIR", str(root / "work"))
    cfg = parse_config({
        "name": "lf", "iterations": 1, "seed": 2, "storage": {"uri": f"file://{root}/store"},
        "training": {"learningRate": 3e-3, "maxSteps": 3, "saveSteps": 100, "cutoffTokens": 128,
                     "lora": {"rank": 4, "alpha": 8}},
        "collect": {"enabled": True}, "lengthFollowing": {"enabled": True, "generatorSetFraction": 0.5},
    })
    ctx = StageContext(config=cfg, iteration=1, store=LocalStore(root / "store"))
    for role in ("generator", "extender"):
        sft_artifacts(ctx, role).write_outputs(sft_rows("g", 20, False), 64)
    ctx.artifacts("build-sft").finish({"counts": {}})
    generator = run_stage("train-generator", ctx)
    collect = ctx.artifacts("collect")
    collect.write_work(0, sft_rows("work", 50, True))  # work shards are not the outputs: never trained on
    collect.write_outputs(sft_rows("c", 6, True), 4)
    collect.finish({"enabled": True, "counts": {"accepted": 6}})
    manifest = run_stage("train-length-following", ctx)
    yield root, ctx, generator, manifest
    patch.undo()


def test_length_following_continues_the_last_generator_on_the_mixed_set(trained):
    from safetensors.torch import load_file

    from selflengthen.pipeline.training import LENGTH_FOLLOWING, fetch_trained_model, model_prefix
    from selflengthen.pipeline.treestore import tree_complete

    root, ctx, generator, manifest = trained
    assert ctx.artifacts("train-length-following").prefix == "lf/train-length-following"
    assert ctx.artifacts("train-length-following").done()
    assert model_prefix("lf", 1, LENGTH_FOLLOWING) == "lf/train-length-following/model"
    assert tree_complete(ctx.store, "lf/train-length-following/model")
    assert manifest["initFrom"] == f"{ctx.store.uri}/lf/iter-01/train-generator/model"
    by_source = manifest["examplesBySource"]
    assert by_source["lf/collect"] == 6  # the outputs, not the 50 work rows
    assert 4 <= by_source["lf/iter-01/build-sft/generator"] <= 16  # a seeded half of 20
    assert manifest["counts"]["accepted"] == sum(by_source.values()) and manifest["steps"] == 3
    # it continued the Generator's adapter, and moved it
    start = load_file(root / "store/lf/iter-01/train-generator/model/adapter_model.safetensors")
    end = load_file(fetch_trained_model(ctx.config, ctx.store, 1, LENGTH_FOLLOWING, root / "serve").path
                    / "adapter_model.safetensors")
    assert set(start) == set(end) and any(not (start[k] == end[k]).all() for k in start)


def test_the_runner_serves_the_length_following_model_as_the_generator(trained):
    from selflengthen.pipeline.runner import phase_of, server_specs

    root, ctx, _, _ = trained
    [spec] = server_specs(ctx.config, ctx.store, "evaluate-length-following", 1, root / "serve")
    assert spec.names == ("base",) and [name for name, _ in spec.lora] == ["generator"]
    assert Path(spec.lora[0][1]).parts[-1] == "length-following"
    assert phase_of("evaluate-length-following") == "Evaluating" and phase_of("train-length-following") == "Training"


def test_the_report_puts_the_generator_and_the_length_following_model_side_by_side(trained):
    from selflengthen.pipeline import report as rep
    from selflengthen.pipeline.stages import RunArtifacts

    root, ctx, _, _ = trained

    def evaluation(score, sl, ruler):
        return {"enabled": True, "model": "generator", "counts": {"requested": 4, "accepted": 4},
                "scores": {"overall": score, "byType": {"about": score, "below": 0.5},
                           "byLanguage": {"en": score, "zh": 0.25}}, "averageWords": 10.0 * score,
                "longbenchWrite": {"items": 2, "sl": {"overall": sl}, "points": [[100, int(sl), "en"]]},
                "ruler": {"items": 2, "maxLength": ruler}}

    ctx.artifacts("evaluate").finish(evaluation(0.125, 20.0, 300))
    RunArtifacts(ctx.store, "lf", 1, "evaluate-length-following").finish(evaluation(0.5, 45.0, 900))
    out = rep.write_report(ctx.store, ctx.config, 1)
    lf = out["lengthFollowing"]
    assert lf["before"]["longen"] == 0.125 and lf["after"]["longen"] == 0.5
    assert lf["after"]["byLanguage"] == {"en": 0.5, "zh": 0.25} and lf["after"]["maxOutputLength"] == 900
    assert lf["training"]["examplesBySource"]["lf/collect"] == 6
    md = out["markdown"]
    assert "## Length following" in md
    for line in ("| LonGen score | 0.125 | 0.500 |", "| LonGen about | 0.125 | 0.500 |",
                 "| LonGen below | 0.500 | 0.500 |", "| LonGen en | 0.125 | 0.500 |", "| LonGen zh | 0.250 | 0.250 |",
                 "| LongBench-Write S_l | 20.0 | 45.0 |", "| max output length (LongWriter's count) | 300 | 900 |"):
        assert line in md, line
    assert {"train-length-following", "evaluate-length-following"} <= set(out["stages"])
    assert set(rep.scatter_points(ctx.store, ctx.config, 1)) == {"iteration 1", "length-following"}


def test_the_length_following_evaluation_has_its_own_series():
    from prometheus_client import CollectorRegistry

    from selflengthen.pipeline.metrics import Metrics

    registry = CollectorRegistry()
    evaluation = {"scores": {"overall": 0.5, "byType": {"about": 0.25}}, "longbenchWrite": {"sl": {"overall": 61.5}},
                  "ruler": {"maxLength": 4200}}
    Metrics(registry).set_iteration("lf", "ns", 2, {"evaluate": {**evaluation, "scores": {"overall": 0.125}},
                                                    "evaluate-length-following": evaluation})

    def value(name, **labels):
        return registry.get_sample_value(name, {"run": "lf", "namespace": "ns", **labels})

    assert value("selflengthen_longen_score", iteration="2", type="overall") == 0.125
    assert value("selflengthen_longen_score", iteration="length-following", type="overall") == 0.5
    assert value("selflengthen_longen_score", iteration="length-following", type="about") == 0.25
    assert value("selflengthen_longbench_write_score", iteration="length-following", score="sl") == 61.5
    assert value("selflengthen_max_output_length", iteration="length-following") == 4200
