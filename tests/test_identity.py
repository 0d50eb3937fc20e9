"""A run's identity: the stored configuration is the contract of the data beside it. A rerun that changes a field
affecting stages that already have data is refused with the changed fields and what to do; `--restart-from`
deletes and redoes exactly the stages the change affects (and what was made from them, also in later
iterations); result-neutral fields may change; the stored configuration never disagrees with the data.

The stages here are stand-ins that write real artifacts (work shard, manifest, completion marker) through the
store, so that the real local runner decides from the store what to (re)do: what is tested is the orchestration,
which does not depend on what a stage computes."""

from __future__ import annotations

import importlib
import logging

import pytest
import yaml
from prometheus_client import CollectorRegistry

from selflengthen.cli import main
from selflengthen.pipeline import config as config_module
from selflengthen.pipeline import identity, runner
from selflengthen.pipeline.config import Model, parse_config
from selflengthen.pipeline.identity import ConfigChanged
from selflengthen.pipeline.metrics import Metrics
from selflengthen.pipeline.stages import STAGES
from selflengthen.pipeline.store import LocalStore

ITERATION = ("self-instruct", "respond", "extend", "build-sft", "train-generator", "train-extender", "evaluate")


def base(tmp_path, **overrides) -> dict:
    doc = {"name": "ident", "iterations": 2, "seed": 1, "models": {"endpoint": "http://127.0.0.1:9/v1"},
           "storage": {"uri": f"file://{tmp_path}/store"}, "respond": {"samplesPerInstruction": 2},
           "evaluate": {"items": 24}}
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc


@pytest.fixture
def stages(monkeypatch):
    """Stand-in stages: each records (stage, iteration, the config it ran under) and writes its artifacts."""
    ran: list[tuple[str, int, dict]] = []
    fail = {}

    def run_stage(name, ctx):
        art = ctx.artifacts(name)
        art.write_work(0, [{"id": f"{name}-{ctx.iteration}", "samples": ctx.config.respond.samples_per_instruction}])
        if fail.get((name, ctx.iteration)):
            raise RuntimeError(f"{name} stopped")  # a partly done stage: a work shard, no _SUCCESS
        ran.append((name, ctx.iteration, ctx.config.model_dump(mode="json", by_alias=True)))
        return art.finish({"counts": {"requested": 1, "accepted": 1}})

    monkeypatch.setattr(runner, "run_stage", run_stage)
    return ran, fail


def run(doc: dict, restart_from=()) -> dict:
    return runner.run_local(parse_config(doc), progress=False, metrics=Metrics(CollectorRegistry()),
                            restart_from=tuple(restart_from))


def stored(tmp_path) -> dict:
    return yaml.safe_load(LocalStore(tmp_path / "store").read("ident/config.yaml"))


def done(ran) -> list[tuple[str, int]]:
    return [(s, k) for s, k, _ in ran]


def everything(iterations=2) -> list[tuple[str, int]]:
    return [(s, k) for k in range(1, iterations + 1) for s in ITERATION]


def test_a_result_changing_field_is_refused_with_the_diff_and_restart_from_redoes_exactly_what_it_affects(
        tmp_path, stages, caplog):
    ran, _ = stages
    run(base(tmp_path))
    assert done(ran) == everything()
    ran.clear()

    changed = base(tmp_path, **{"respond.samplesPerInstruction": 3, "client.concurrency": 4})
    with pytest.raises(ConfigChanged) as refused:
        run(changed)
    message = str(refused.value)
    assert "respond.samplesPerInstruction: 2 -> 3" in message
    assert "client.concurrency" not in message  # result-neutral: not a reason to refuse
    assert "--restart-from respond" in message and "name: ident-2" in message
    assert "respond (iterations 1, 2)" in message and "self-instruct (iterations 1" not in message
    assert ran == [] and stored(tmp_path)["respond"]["samplesPerInstruction"] == 2  # nothing touched

    # The restart redoes respond and everything made from it: all but iteration 1's self-instruct (iteration 2's
    # self-instruct asks iteration 1's trained Generator), each under the new configuration.
    run(changed, restart_from=["respond"])
    # self-instruct asks the base model, so a changed respond redoes no self-instruct of a later iteration either
    assert done(ran) == [n for n in everything() if n[0] != "self-instruct"]
    assert all(cfg["respond"]["samplesPerInstruction"] == 3 for _, _, cfg in ran)
    assert stored(tmp_path)["respond"]["samplesPerInstruction"] == 3
    assert stored(tmp_path)["client"]["concurrency"] == 4
    store = LocalStore(tmp_path / "store")
    assert store.read("ident/iter-01/respond/work/part-00000.jsonl").count(b'"samples": 3') == 1

    ran.clear()
    with caplog.at_level(logging.INFO, logger="selflengthen.runner"):
        run(changed)  # the same configuration again: complete, and it says so
    assert ran == []
    assert "run ident is already complete (2 iterations, every stage done): nothing to do" in caplog.text


def test_an_evaluation_change_redoes_only_the_evaluations(tmp_path, stages):
    ran, _ = stages
    run(base(tmp_path, **{"collect.enabled": True}))
    assert done(ran) == everything() + [("collect", 2)]
    ran.clear()
    changed = base(tmp_path, **{"evaluate.items": 12, "collect.enabled": True})
    with pytest.raises(ConfigChanged, match=r"(?s)evaluate\.items: 24 -> 12.*data of evaluate \(iterations 1, 2\)"
                                            r".*--restart-from evaluate:"):
        run(changed)
    # Two stages neither of which is made from the other: both named.
    with pytest.raises(ConfigChanged, match="--restart-from evaluate --restart-from collect"):
        run(base(tmp_path, **{"evaluate.items": 12, "collect.enabled": True, "collect.items": 7}))
    run(changed, restart_from=["evaluate"])
    assert done(ran) == [("evaluate", 1), ("evaluate", 2)]


def test_the_length_following_step_is_redone_by_what_it_is_made_from(tmp_path, stages):
    ran, _ = stages
    doc = {"collect.enabled": True, "lengthFollowing.enabled": True}
    run(base(tmp_path, **doc))
    final = [("collect", 2), ("train-length-following", 2), ("evaluate-length-following", 2)]
    assert done(ran) == everything() + final
    ran.clear()
    changed = base(tmp_path, **doc, **{"lengthFollowing.generatorSetFraction": 0.5})
    with pytest.raises(ConfigChanged, match=r"(?s)lengthFollowing\.generatorSetFraction: 1\.0 -> 0\.5.*"
                                            r"--restart-from train-length-following"):
        run(changed)
    run(changed, restart_from=["train-length-following"])
    assert done(ran) == final[1:]
    ran.clear()
    # an evaluation setting: every evaluation, the length-following model's too
    fewer = base(tmp_path, **doc, **{"lengthFollowing.generatorSetFraction": 0.5, "evaluate.ruler.items": 6})
    with pytest.raises(ConfigChanged, match="--restart-from evaluate --restart-from evaluate-length-following"):
        run(fewer, restart_from=["evaluate"])
    run(fewer, restart_from=["evaluate", "evaluate-length-following"])
    assert done(ran) == [("evaluate", 1), ("evaluate", 2), ("evaluate-length-following", 2)]


def test_a_restart_that_does_not_cover_the_change_is_refused(tmp_path, stages):
    ran, _ = stages
    run(base(tmp_path))
    ran.clear()
    changed = base(tmp_path, **{"training.learningRate": 0.01})
    with pytest.raises(ConfigChanged, match="--restart-from evaluate --restart-from train-generator") as refused:
        run(changed, restart_from=["evaluate"])
    assert "training.learningRate: 0.0001 -> 0.01" in str(refused.value)
    assert ran == [] and stored(tmp_path)["training"]["learningRate"] == 1e-4
    run(changed, restart_from=["train-generator", "train-extender"])
    assert done(ran) == [n for n in everything() if n not in  # self-instruct asks the base model: kept
                         {("self-instruct", 1), ("respond", 1), ("extend", 1), ("build-sft", 1), ("self-instruct", 2)}]


def test_changes_to_stages_without_data_and_neutral_fields_are_allowed(tmp_path, stages):
    ran, fail = stages
    fail[("train-generator", 1)] = True
    with pytest.raises(RuntimeError):
        run(base(tmp_path))
    assert done(ran) == everything()[:4]
    ran.clear()
    # train-generator of iteration 1 left a work shard: data made under the old learning rate.
    with pytest.raises(ConfigChanged, match="train-generator \\(iteration 1\\)"):
        run(base(tmp_path, **{"training.learningRate": 0.01}))
    # Evaluation and the extender's training have no data yet: their settings may change; so may neutral ones.
    fail.clear()
    run(base(tmp_path, **{"evaluate.items": 6, "training.saveSteps": 5, "local.port": 8123}))
    assert done(ran) == everything()[4:]
    assert stored(tmp_path)["evaluate"]["items"] == 6 and stored(tmp_path)["training"]["saveSteps"] == 5


def test_a_stage_switched_off_keeps_its_data_bound_to_the_stored_configuration(tmp_path, stages):
    ran, _ = stages
    run(base(tmp_path))
    ran.clear()
    run(base(tmp_path, **{"evaluate.enabled": False}))  # switching it off changes no data: allowed
    assert ran == []
    # Its settings still bind the evaluations already made: changed while it is off, they are refused too.
    with pytest.raises(ConfigChanged, match="evaluate.items: 24 -> 5"):
        run(base(tmp_path, **{"evaluate.enabled": False, "evaluate.items": 5}))


def test_more_iterations_continue_the_run(tmp_path, stages):
    ran, _ = stages
    run(base(tmp_path))
    ran.clear()
    run(base(tmp_path, iterations=3))
    assert done(ran) == [(s, 3) for s in ITERATION]
    # With collect done on the last iteration's models, more iterations would leave it stale.
    run(base(tmp_path, iterations=3, **{"collect.enabled": True}))
    with pytest.raises(ConfigChanged, match="(?s)iterations: 3 -> 4.*--restart-from collect"):
        run(base(tmp_path, iterations=4, **{"collect.enabled": True}))


def test_the_cli_refuses_with_exit_2_and_restarts_with_the_flag(tmp_path, stages, capsys):
    ran, _ = stages
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path, iterations=1)))
    assert main(["run", str(path), "--no-progress"]) == 0
    ran.clear()
    path.write_text(yaml.safe_dump(base(tmp_path, iterations=1, seed=2)))
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: run ident already has data made with another configuration" in err
    assert "seed: 1 -> 2" in err and "--restart-from self-instruct" in err
    assert main(["run", str(path), "--no-progress", "--restart-from", "self-instruct"]) == 0
    assert done(ran) == everything(1)


def test_every_config_section_declares_what_its_fields_affect():
    sections = [c for c in vars(config_module).values()
                if isinstance(c, type) and issubclass(c, Model) and c is not Model]
    assert len(sections) >= 15
    for section in sections:
        assert "affects" in section.__dict__, f"{section.__name__} declares no `affects`"
        assert set(section.affects_fields) <= set(section.model_fields), section.__name__
        for stages_ in [section.affects, *section.affects_fields.values()]:
            assert set(stages_) <= set(STAGES), section.__name__


def test_the_dependency_graph_covers_every_stage_requirement():
    for stage, module in STAGES.items():
        requires = getattr(importlib.import_module(f"selflengthen.pipeline.stages.{module}"), "REQUIRES", ())
        assert set(requires) <= set(identity.READS_SAME_ITERATION[stage]), stage
