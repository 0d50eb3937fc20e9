"""The status the state machine emits, against the CRD's status schema as the API server applies it.

`World.check` (kube_fixtures) runs on every reconcile of every state-machine test: each emitted status must be
stored as written (nothing pruned as undeclared, nothing refused with 422). The test below drives one run through
every path the state machine has, and checks on top that an operator restarted on the stored status acts exactly
as the one that wrote it (nothing it needs later was lost on the way through the API server)."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from pydantic import ValidationError

from kube_fixtures import World, current_child, make_run, play_cluster, run_to_completion, spec
from selflengthen.operator.reconcile import child_rejected, cleanup_actions, invalid_spec, reconcile
from selflengthen.operator.status import build_status, status_schema
from selflengthen.operator.validation import prune, status_problems

T1 = dt.datetime(2026, 11, 25, 13, 0, 0, tzinfo=dt.UTC)


def stored(status: dict) -> dict:
    """The status as the API server keeps it after a write (undeclared fields pruned)."""
    return prune(status_schema(), copy.deepcopy(status), root=False)


def same_plan_after_restart(world: World) -> None:
    """A fresh operator reading the stored status plans exactly what the one that wrote it plans."""
    now = world.now + dt.timedelta(seconds=1)
    mine = reconcile(world.run, 1, world.status, world.observed(), now)
    fresh = reconcile(world.run, 1, stored(world.status), world.observed(), now)
    assert (repr(fresh.actions), fresh.status, fresh.requeue_after) == (
        repr(mine.actions), mine.status, mine.requeue_after)


def test_every_path_of_the_state_machine_emits_statuses_the_api_server_stores_as_written():
    seen_phases, seen_states = set(), set()

    def note(world: World) -> None:
        for st in world.statuses:
            seen_phases.add(st.get("phase"))
            for rec in st.get("history", []):
                seen_states.update(r.get("state") for r in rec["stages"].values())
        same_plan_after_restart(world)

    # success, two iterations, evaluation on (serving for the new model, then evaluate), restart at every step
    world = World(make_run(spec(evaluate={"enabled": True})))
    run_to_completion(world, before_each=same_plan_after_restart)
    assert world.status["phase"] == "Succeeded"
    note(world)

    # retry: the first attempt fails, the backoff passes, the second attempt succeeds
    world = World(make_run(spec(iterations=1)))
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    world.fail("demo-i01-self-instruct-a1", "error: boom")
    world.step()
    rec = world.status["history"][0]["stages"]["self-instruct"]
    assert rec["state"] == "Retrying" and rec["nextAttemptAt"]
    note(world)
    world.step(advance=31)
    world.complete("demo-i01-self-instruct-a2")
    world.settle()
    note(world)

    # permanent failure: every attempt fails
    world.fail(current_child(world.status), "error: respond failed")
    world.step(advance=31)
    world.step(advance=31)
    world.fail(current_child(world.status), "error: respond failed again")
    world.settle()
    assert world.status["phase"] == "Failed" and "respond failed again" in world.status["failureMessage"]
    note(world)

    # suspend and resume in the middle of a stage
    world = World(make_run(spec(iterations=1)))
    world.settle()
    play_cluster(world)
    world.settle()
    world.run = make_run(spec(iterations=1, suspend=True))
    world.settle()
    assert world.status["phase"] == "Suspended"
    note(world)
    world.run = make_run(spec(iterations=1))
    run_to_completion(world)
    note(world)

    # serving timeout: vLLM never healthy
    world = World(make_run(spec(iterations=1, retry={"maxAttempts": 1})))
    world.settle()
    world.step(advance=601)
    world.settle()
    assert world.status["phase"] == "Failed" and world.status["lastFailure"]["reason"] == "StartupTimeout"
    note(world)

    # deletion: the finalizer removes every child the run made
    world = World(make_run(spec(iterations=1)))
    world.settle()
    assert {(a.kind, a.name) for a in cleanup_actions(world.observed())} == set(world.objects)

    # operator restart with a lost status: it trusts the store and the Jobs, and emits valid statuses again
    world = World(make_run(spec(iterations=1)))
    world.settle()
    play_cluster(world)
    world.settle()
    play_cluster(world)
    world.status = {}
    run_to_completion(world)
    assert world.status["phase"] == "Succeeded"
    note(world)

    # a child the API server refuses: for now (403, Degraded), then for good (422, Failed until the spec changes)
    world = World(make_run(spec(iterations=1)))
    plan = world.step()
    create = next(a for a in plan.actions if a.verb == "create" and a.kind == "Deployment")
    del world.objects[("Deployment", create.name)]  # it was refused, so it is not there
    for code in (403, 422):
        plan = child_rejected(plan, world.run, 1, create, code, "Invalid", "denied: " + "x" * 5000, world.now)
        assert status_problems(plan.status) == [] and plan.status["rejection"]["code"] == code
        world.status = plan.status
        assert stored(plan.status) == plan.status
    assert plan.status["phase"] == "Failed" and plan.status["lastFailure"]["reason"] == "ChildRejected"
    world.step()
    assert world.status["phase"] == "Failed"  # the same spec would be refused again
    note(world)

    # an invalid spec (admission bypassed)
    plan = invalid_spec(world.status, 2, "invalid SelfLengthenRun spec:\n  spec.storage.uri: must be s3://", T1)
    assert status_problems(plan.status) == [] and plan.status["phase"] == "Failed"

    assert seen_phases >= {"Serving", "Generating", "ScalingDown", "Training", "Evaluating", "Suspended",
                           "Succeeded", "Failed"}
    assert seen_states >= {"Running", "Retrying", "Succeeded", "Failed"}


def test_the_status_model_refuses_what_the_crd_would_prune_or_refuse():
    with pytest.raises(ValidationError, match="nextAttempt"):
        build_status({"phase": "Pending", "nextAttempt": "2026-11-25T12:00:00Z"})  # a typo: pruned by the server
    with pytest.raises(ValidationError, match="state"):
        build_status({"history": [{"iteration": 1, "stages": {"respond": {"state": "Waiting"}}}]})
    assert status_problems({"phase": "Pending", "nextAttempt": "x"}) == [
        "status.nextAttempt: would be pruned (not in the CRD's status schema)"]
    assert status_problems({"history": [{"stages": {"respond": {"state": "Waiting"}}}]})


def test_status_records_keep_the_manifests_results_so_the_metrics_read_the_same_keys():
    """A cluster run's metrics come from its status records, a local run's from its manifests: the records keep
    the manifests' results under the same keys, so the gauges agree (the final training loss is the manifest's
    finalLoss, the last logged step's, in both; the extend manifest's averageWordsInitial in both)."""
    from prometheus_client import CollectorRegistry

    from selflengthen.operator.status import stage_results
    from selflengthen.pipeline.metrics import Metrics

    manifests = {  # the shapes the stages write (pipeline/stages/, pipeline/training.py)
        "respond": {"counts": {"requested": 10, "accepted": 8}, "averageWords": 120.5},
        "extend": {"counts": {"requested": 8, "accepted": 5}, "averageWords": 180.0, "averageWordsInitial": 118.0,
                   "growth": 1.5},
        "train-generator": {"finalLoss": 1.25, "trainLoss": 1.9, "firstLoss": 3.0, "epochLosses": [2.5, 1.4],
                            "counts": {"requested": 5, "accepted": 5}},
        "evaluate": {"scores": {"overall": 0.6, "byType": {"about": 0.5, "range": None}, "byLanguage": {"en": 0.6}},
                     "longbenchWrite": {"sl": {"overall": 55.0, "byBucket": {"0-500": 60.0}}, "sq": {"overall": 70.0}},
                     "ruler": {"maxLength": 900, "byRequired": {"1000": 900}}, "averageWords": 700},
    }
    records = {stage: build_status({"history": [{"iteration": 1, "stages": {stage: stage_results(m)}}]})
               ["history"][0]["stages"][stage] for stage, m in manifests.items()}
    assert records["train-generator"]["finalLoss"] == 1.25 and "trainLoss" not in records["train-generator"]
    assert records["evaluate"]["scores"] == {"overall": 0.6, "byType": {"about": 0.5}}  # an unscored type left out
    assert status_problems({"history": [{"iteration": 1, "stages": records}]}) == []  # stored as written

    def gauges(results: dict) -> dict:
        m = Metrics(CollectorRegistry())
        m.set_iteration("r", "ns", 1, results)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for metric in m.registry.collect()
                for s in metric.samples if not s.name.endswith("_created")}

    local, cluster = gauges(manifests), gauges(records)
    assert local == cluster
    loss = {k: v for k, v in local.items() if k[0] == "selflengthen_iteration_training_loss"}
    assert list(loss.values()) == [1.25]
    initial = [v for k, v in local.items() if k[0] == "selflengthen_iteration_average_words" and ("kind", "initial")
               in k[1]]
    assert initial == [118.0]
    assert ("selflengthen_longbench_write_score", (("iteration", "1"), ("namespace", "ns"), ("run", "r"),
                                                   ("score", "sq"))) in cluster


def test_a_manifest_value_of_the_wrong_type_is_left_out_of_the_record():
    from selflengthen.operator.status import stage_results

    assert stage_results({"finalLoss": float("nan"), "averageWords": "many", "scores": {"overall": "x"},
                          "ruler": {"maxLength": 512}}) == {"ruler": {"maxLength": 512}}
