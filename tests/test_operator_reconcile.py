"""The per-run state machine, on its own: given status + observed children + store markers, the next actions."""

from __future__ import annotations

import datetime as dt

import pytest

from kube_fixtures import World, current_child, make_run, play_cluster, run_to_completion, spec
from selflengthen.operator.reconcile import invalid_spec


def play_until(world: World, stage: str, phase: str) -> None:
    """Play the cluster's part until the run's current step is `stage` in `phase` (that step not yet played)."""
    for _ in range(40):
        world.settle()
        if (world.status.get("stage"), world.status.get("phase")) == (stage, phase):
            return
        play_cluster(world)
    raise AssertionError(f"never reached {stage} ({phase})")


def stage_jobs(world: World) -> list[str]:
    return [c for c in world.created if c.startswith("Job/")]


def test_happy_path_two_iterations_exact_children_and_status():
    world = World(make_run(spec(evaluate={"enabled": True})))
    plan = world.step()
    assert [repr(a) for a in plan.actions] == [
        "create ConfigMap/demo-config", "create Service/demo-m00-vllm", "create Deployment/demo-m00-vllm-a1"]
    assert plan.status["phase"] == "Serving" and plan.status["progress"] == "1/2"
    assert [e.reason for e in plan.events] == ["Accepted", "ServingStarted"]
    phases = []

    def note(w):
        phases.append((w.status["phase"], w.status.get("currentIteration"), w.status.get("stage")))

    log = run_to_completion(world, before_each=note)
    assert log == [
        "ready demo-m00-vllm-a1",
        "complete demo-i01-self-instruct-a1", "complete demo-i01-respond-a1", "complete demo-i01-extend-a1",
        "scaled down",
        "complete demo-i01-build-sft-a1", "complete demo-i01-train-generator-a1",
        "complete demo-i01-train-extender-a1",
        "ready demo-m01-vllm-a1", "complete demo-i01-evaluate-a1",
        # model 1 keeps serving into iteration 2: no restart of vLLM between evaluate and self-instruct
        "complete demo-i02-self-instruct-a1", "complete demo-i02-respond-a1", "complete demo-i02-extend-a1",
        "scaled down",
        "complete demo-i02-build-sft-a1", "complete demo-i02-train-generator-a1",
        "complete demo-i02-train-extender-a1",
        "ready demo-m02-vllm-a1", "complete demo-i02-evaluate-a1",
    ]
    assert [p[0] for p in phases] == [
        "Serving", "Generating", "Generating", "Generating", "ScalingDown", "Training", "Training", "Training",
        "Serving", "Evaluating", "Generating", "Generating", "Generating", "ScalingDown", "Training", "Training",
        "Training", "Serving", "Evaluating"]
    assert world.created == [
        "ConfigMap/demo-config", "Service/demo-m00-vllm", "Deployment/demo-m00-vllm-a1",
        "Job/demo-i01-self-instruct-a1", "Job/demo-i01-respond-a1", "Job/demo-i01-extend-a1",
        "Job/demo-i01-build-sft-a1", "Job/demo-i01-train-generator-a1", "Job/demo-i01-train-extender-a1",
        "Service/demo-m01-vllm", "Deployment/demo-m01-vllm-a1", "Job/demo-i01-evaluate-a1",
        "Job/demo-i02-self-instruct-a1", "Job/demo-i02-respond-a1", "Job/demo-i02-extend-a1",
        "Job/demo-i02-build-sft-a1", "Job/demo-i02-train-generator-a1", "Job/demo-i02-train-extender-a1",
        "Service/demo-m02-vllm", "Deployment/demo-m02-vllm-a1", "Job/demo-i02-evaluate-a1"]
    st = world.status
    assert st["phase"] == "Succeeded" and st["progress"] == "2/2" and st["stage"] == ""
    assert st["averageWords"] == 2310
    assert world.names("Deployment") == [] and world.names("Service") == []  # GPUs free, nothing serving
    assert len(world.names("Job")) == 14  # kept (retention.jobs: Retain)
    ready = {c["type"]: c for c in st["conditions"]}
    assert ready["Ready"]["status"] == "True" and ready["Progressing"]["status"] == "False"
    assert ready["Degraded"]["status"] == "False"
    it1 = st["history"][0]
    assert it1["averageWords"] == 2310.4 and "finishedAt" in it1
    assert it1["stages"]["train-generator"]["finalLoss"] == 1.23
    assert it1["stages"]["train-generator"]["artifactUri"].endswith("/iter-01/train-generator/model")
    assert it1["stages"]["extend"]["artifactUri"] == "s3://selflengthen-artifacts/runs/demo/iter-01/extend"
    assert it1["stages"]["evaluate"]["scores"]["overall"] == 0.71
    assert it1["stages"]["self-instruct"]["counts"] == {"requested": 5000, "accepted": 4100}
    assert set(it1["stages"]) == {"serving", "self-instruct", "respond", "extend", "build-sft", "train-generator",
                                  "train-extender", "evaluate-serving", "evaluate"}
    assert st["history"][1]["stages"]["serving"]["child"] == "demo-m01-vllm-a1"  # reused
    reasons = [e.reason for e in world.events]
    assert reasons.count("StageSucceeded") == 14 and reasons[-1] == "RunSucceeded"
    assert world.settle().actions == []  # finished: nothing more to do


def test_data_jobs_point_at_the_service_build_sft_runs_while_vllm_goes_down_training_waits_for_gpus():
    world = World(make_run())
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    job = world.objects[("Job", "demo-i01-self-instruct-a1")]
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--endpoint") + 1] == "http://demo-m00-vllm.ml.svc:8000/v1"
    for stage in ("self-instruct", "respond", "extend"):
        world.complete(f"demo-i01-{stage}-a1")
        world.settle()
    assert world.status["phase"] == "ScalingDown" and world.status["stage"] == "build-sft"
    assert world.objects[("Deployment", "demo-m00-vllm-a1")]["spec"]["replicas"] == 0
    # build-sft (CPU only) is started in the same reconcile that scales vLLM down: off the GPUs' critical path
    assert world.created[-1] == "Job/demo-i01-build-sft-a1"
    build = world.objects[("Job", "demo-i01-build-sft-a1")]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(build["containers"][0].get("resources"))
    assert "--endpoint" not in build["containers"][0]["command"]
    world.objects[("Deployment", "demo-m00-vllm-a1")]["status"] = {"replicas": 1}  # a pod still terminating
    world.complete("demo-i01-build-sft-a1")
    for _ in range(3):
        world.step()
    assert world.status["phase"] == "ScalingDown" and world.status["stage"] == "train-generator"
    assert "Job/demo-i01-train-generator-a1" not in world.created  # its GPUs are still held
    world.scaled_to_zero("demo-m00-vllm-a1")
    world.settle()
    assert world.names("Deployment") == [] and world.status["phase"] == "Training"
    assert world.created[-1] == "Job/demo-i01-train-generator-a1"


def test_evaluation_of_model_k_runs_beside_iteration_k_plus_1s_data_stages_on_the_same_server():
    world = World(make_run(spec(evaluate={"enabled": True})))
    play_until(world, "evaluate-serving", "Serving")
    world.ready("demo-m01-vllm-a1")
    plan = world.settle()
    # one reconcile starts the evaluation and iteration 2's self-instruct, both pointed at model 1's Service
    assert stage_jobs(world)[-2:] == ["Job/demo-i01-evaluate-a1", "Job/demo-i02-self-instruct-a1"]
    for name in ("demo-i01-evaluate-a1", "demo-i02-self-instruct-a1"):
        cmd = world.objects[("Job", name)]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[cmd.index("--endpoint") + 1] == "http://demo-m01-vllm.ml.svc:8000/v1"
    assert plan.status["phase"] == "Evaluating" and plan.status["currentIteration"] == 1
    it2 = world.status["history"][1]["stages"]
    assert it2["serving"]["child"] == "demo-m01-vllm-a1" and it2["self-instruct"]["state"] == "Running"
    # the data stages go on in order while the evaluation runs; build-sft waits for it (the server must stay)
    for stage in ("self-instruct", "respond", "extend"):
        world.complete(f"demo-i02-{stage}-a1")
        world.settle()
    assert "Job/demo-i02-build-sft-a1" not in world.created
    assert world.objects[("Deployment", "demo-m01-vllm-a1")]["spec"]["replicas"] == 1
    assert world.status["stage"] == "evaluate" and world.status["phase"] == "Evaluating"
    world.complete("demo-i01-evaluate-a1", {"scores": {"overall": 0.7}})
    world.settle()
    assert world.status["phase"] == "ScalingDown" and world.status["stage"] == "build-sft"
    assert world.created[-1] == "Job/demo-i02-build-sft-a1"
    assert world.objects[("Deployment", "demo-m01-vllm-a1")]["spec"]["replicas"] == 0
    assert sum(c.startswith("Deployment/") for c in world.created) == 2  # one serving start per model


def test_concurrent_training_starts_both_roles_at_once_and_resumes_the_one_left():
    run_spec = spec(training={"concurrent": True, "processesPerNode": 4})
    world = World(make_run(run_spec))
    play_until(world, "train-generator", "Training")
    assert stage_jobs(world)[-2:] == ["Job/demo-i01-train-generator-a1", "Job/demo-i01-train-extender-a1"]
    for role in ("generator", "extender"):
        pod = world.objects[("Job", f"demo-i01-train-{role}-a1")]["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    # the Extender finishes first; then the operator restarts with no status at all
    world.complete("demo-i01-train-extender-a1")
    world.settle()
    assert world.status["stage"] == "train-generator"
    assert world.status["history"][0]["stages"]["train-extender"]["state"] == "Succeeded"
    world.status = {}
    before = list(world.created)
    world.settle()
    assert world.created == before  # the running Generator Job is adopted, the finished Extender not run again
    assert world.status["stage"] == "train-generator" and world.status["phase"] == "Training"
    world.complete("demo-i01-train-generator-a1")
    world.settle()
    assert world.status["currentIteration"] == 2 and world.status["stage"] == "serving"
    assert world.created[-1] == "Deployment/demo-m01-vllm-a1"
    # and the other order: the Generator first, the Extender still running
    play_until(world, "train-generator", "Training")
    assert world.created[-1] == "Job/demo-i02-train-extender-a1"
    world.complete("demo-i02-train-generator-a1")
    world.settle()
    assert world.status["stage"] == "train-extender" and world.status["phase"] == "Training"
    assert "Job/demo-i02-train-extender-a2" not in world.created
    world.complete("demo-i02-train-extender-a1")
    world.settle()
    assert world.status["phase"] == "Succeeded"


@pytest.mark.parametrize("failing,beside", [
    ("demo-i01-train-extender", "demo-i01-train-generator-a1"),  # the Extender first: the Generator still runs
    ("demo-i01-train-generator", "demo-i01-train-extender-a1"),
    ("demo-i01-evaluate", "demo-i02-self-instruct-a1"),
], ids=["extender-fails", "generator-fails", "evaluation-fails"])
def test_a_step_failing_for_good_stops_the_step_beside_it(failing, beside):
    """A run that fails holds no GPU and asks no server: the Job running beside the failed one is deleted, and no
    later step starts."""
    world = World(make_run(spec(retry={"maxAttempts": 1}, evaluate={"enabled": True},
                                training={"concurrent": True, "processesPerNode": 4})))
    stage = failing.split("-i01-")[1]
    play_until(world, "evaluate" if stage == "evaluate" else "train-generator",
               "Evaluating" if stage == "evaluate" else "Training")
    assert ("Job", beside) in world.objects
    world.fail(f"{failing}-a1")
    plan = world.step()
    assert world.status["phase"] == "Failed"
    assert f"delete Job/{beside}" in [repr(a) for a in plan.actions]
    assert ("Job", f"{failing}-a1") in world.objects  # kept for its logs
    created = list(world.created)
    world.settle()
    assert world.created == created and world.names("Deployment") == []
    assert world.step(advance=3600).actions == []


def test_sequential_training_by_default():
    world = World(make_run())
    play_until(world, "train-generator", "Training")
    assert "Job/demo-i01-train-extender-a1" not in world.created
    world.complete("demo-i01-train-generator-a1")
    world.settle()
    assert world.created[-1] == "Job/demo-i01-train-extender-a1"


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential-training", "concurrent-training"])
@pytest.mark.parametrize("keep_status", [True, False], ids=["status-kept", "status-lost"])
def test_restart_in_the_middle_of_every_stage_makes_no_duplicates(keep_status, concurrent):
    """An operator restart is a reconcile with no memory: from the status (or without it, from the children
    and the store's markers alone) it must adopt what exists and never run a finished stage again."""
    run_spec = spec(evaluate={"enabled": True}, training={"concurrent": concurrent})
    reference = World(make_run(run_spec))
    run_to_completion(reference)
    steps = len([c for c in reference.created if c.startswith(("Job/", "Deployment/"))]) + 2
    for restart_at in range(steps):
        world = World(make_run(run_spec))
        count = 0

        def restart(w):
            nonlocal count
            if count == restart_at:
                if not keep_status:
                    w.status = {}
                w.settle()
            count += 1

        run_to_completion(world, before_each=restart)
        assert world.status["phase"] == "Succeeded", restart_at
        assert len(world.created) == len(set(world.created)), world.created
        assert sorted(world.created) == sorted(reference.created), restart_at


def test_a_job_lost_between_create_and_status_write_is_adopted():
    world = World(make_run())
    world.settle()
    world.ready("demo-m00-vllm-a1")
    before = dict(world.status)
    world.step()  # creates self-instruct a1 ...
    world.status = before  # ... but the status write was lost
    plan = world.step()
    assert [repr(a) for a in plan.actions] == []  # the Job found is adopted, not made again
    assert current_child(world.status) == "demo-i01-self-instruct-a1"


def test_stage_failing_once_is_retried_after_backoff():
    world = World(make_run())
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    world.fail("demo-i01-self-instruct-a1", "error: the inference server stayed unreachable for 300s")
    plan = world.step()
    rec = world.status["history"][0]["stages"]["self-instruct"]
    assert rec["state"] == "Retrying" and rec["attempts"] == 1
    assert rec["failures"][0]["reason"] == "BackoffLimitExceeded"
    assert "stayed unreachable" in rec["failures"][0]["message"]
    assert [e.reason for e in plan.events] == ["StageFailed"] and plan.events[0].type == "Warning"
    assert plan.requeue_after == pytest.approx(30)
    degraded = {c["type"]: c for c in world.status["conditions"]}["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "Retrying"
    for _ in range(5):  # within the backoff: nothing
        assert world.step(advance=5).actions == []
    plan = world.step(advance=10)
    assert [repr(a) for a in plan.actions] == ["create Job/demo-i01-self-instruct-a2"]
    assert world.objects[("Job", "demo-i01-self-instruct-a1")]  # the failed attempt is kept for its logs
    degraded = {c["type"]: c for c in world.status["conditions"]}["Degraded"]
    assert degraded["status"] == "True" and "attempt 1 failed" in degraded["message"]  # until the retry succeeds
    world.complete("demo-i01-self-instruct-a2")
    world.settle()
    rec = world.status["history"][0]["stages"]["self-instruct"]
    assert rec["state"] == "Succeeded" and rec["attempts"] == 2 and len(rec["failures"]) == 1
    degraded = {c["type"]: c for c in world.status["conditions"]}["Degraded"]
    assert degraded["status"] == "False"
    assert world.status["lastFailure"]["stage"] == "self-instruct"


def test_stage_failing_always_fails_the_run_with_the_reason():
    world = World(make_run(spec(retry={"maxAttempts": 2, "backoffSeconds": 10})))
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    world.fail("demo-i01-self-instruct-a1")
    world.step()
    world.step(advance=11)
    world.fail("demo-i01-self-instruct-a2", "error: stage self-instruct: no instruction accepted in 40 tries")
    plan = world.step()
    st = world.status
    assert st["phase"] == "Failed"
    assert st["lastFailure"]["reason"] == "BackoffLimitExceeded" and st["lastFailure"]["attempt"] == 2
    assert "no instruction accepted" in st["lastFailure"]["message"]
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "BackoffLimitExceeded"
    assert "iteration 1: self-instruct failed after 2 attempt(s)" in ready["message"]
    assert "no instruction accepted" in ready["message"]
    failed = [e for e in plan.events if e.reason == "RunFailed"]
    assert failed and failed[0].type == "Warning" and "no instruction accepted" in failed[0].message
    assert "delete Deployment/demo-m00-vllm-a1" in [repr(a) for a in plan.actions]  # GPUs freed
    world.settle()
    assert world.names("Deployment") == []
    assert world.step(advance=3600).actions == []  # stays failed, nothing more started


def test_per_stage_attempt_limit():
    world = World(make_run(spec(retry={"maxAttempts": 3, "stages": {"self-instruct": 1}})))
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    world.fail("demo-i01-self-instruct-a1")
    world.step()
    assert world.status["phase"] == "Failed"


def test_vllm_never_healthy_times_out_with_the_pods_last_state():
    world = World(make_run(spec(inference={"startupTimeoutSeconds": 120}, retry={"maxAttempts": 2})))
    world.settle()
    world.pods.append({"metadata": {"name": "demo-m00-vllm-a1-7d9f", "labels": {
        "app.kubernetes.io/component": "inference", "selflengthen.io/model": "0", "selflengthen.io/attempt": "1"}},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "vllm", "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
            "lastState": {"terminated": {"reason": "Error", "exitCode": 1,
                                         "message": "torch.OutOfMemoryError: CUDA out of memory"}}}]}})
    plan = world.step(advance=60)
    assert plan.actions == [] and plan.requeue_after == pytest.approx(59)
    plan = world.step(advance=61)
    rec = world.status["history"][0]["stages"]["serving"]
    assert rec["state"] == "Retrying"
    message = rec["failures"][0]["message"]
    assert rec["failures"][0]["reason"] == "StartupTimeout"
    assert "vLLM not healthy after 120s (0/1 ready)" in message
    assert "CrashLoopBackOff" in message and "CUDA out of memory" in message and "3 restarts" in message
    assert "delete Deployment/demo-m00-vllm-a1" in [repr(a) for a in plan.actions]
    world.step(advance=31)
    assert "Deployment/demo-m00-vllm-a2" in world.created
    assert world.status["phase"] == "Serving"
    world.step(advance=121)
    st = world.status
    assert st["phase"] == "Failed" and st["lastFailure"]["reason"] == "StartupTimeout"
    assert "no pod was created" in st["lastFailure"]["message"]
    assert world.names("Deployment") == []


def test_suspend_and_resume():
    run = make_run()
    world = World(run)
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    world.run = make_run(spec(suspend=True))
    plan = world.step()
    assert sorted(repr(a) for a in plan.actions) == [
        "patch Deployment/demo-m00-vllm-a1", "patch Job/demo-i01-self-instruct-a1"]
    assert world.objects[("Job", "demo-i01-self-instruct-a1")]["spec"]["suspend"] is True
    assert world.objects[("Deployment", "demo-m00-vllm-a1")]["spec"]["replicas"] == 0
    assert world.status["phase"] == "Suspended" and [e.reason for e in plan.events] == ["Suspended"]
    world.scaled_to_zero("demo-m00-vllm-a1")
    assert world.step(advance=3600).actions == []  # no new work while suspended
    world.run = run
    plan = world.step()
    assert [repr(a) for a in plan.actions] == ["patch Deployment/demo-m00-vllm-a1"]
    assert world.status["phase"] == "Serving"
    world.ready("demo-m00-vllm-a1")
    plan = world.step()
    assert [repr(a) for a in plan.actions] == ["patch Job/demo-i01-self-instruct-a1"]
    assert world.objects[("Job", "demo-i01-self-instruct-a1")]["spec"]["suspend"] is False
    assert world.status["phase"] == "Generating"
    assert stage_jobs(world) == ["Job/demo-i01-self-instruct-a1"]


def test_kueue_jobs_start_suspended_and_are_left_to_kueue():
    world = World(make_run(spec(scheduling={"queueName": "gpus"})))
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    job = world.objects[("Job", "demo-i01-self-instruct-a1")]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert world.settle().actions == []


def test_kueue_suspend_and_resume_deactivate_and_activate_the_workload_never_the_job():
    world = World(make_run(spec(scheduling={"queueName": "gpus"})))
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    job = world.objects[("Job", "demo-i01-self-instruct-a1")]
    job["metadata"]["uid"] = "job-uid-1"
    job["spec"]["suspend"] = False  # Kueue admitted it
    world.run = make_run(spec(scheduling={"queueName": "gpus"}, suspend=True))
    plan = world.step()
    assert [repr(a) for a in plan.actions] == ["patch Deployment/demo-m00-vllm-a1"]  # no Workload yet: wait for it
    assert world.status["phase"] == "Suspended" and plan.requeue_after == pytest.approx(5)
    world.objects[("Workload", "job-demo-i01-self-instruct-a1-1a2b3")] = {  # Kueue made it
        "metadata": {"name": "job-demo-i01-self-instruct-a1-1a2b3", "labels": {"kueue.x-k8s.io/job-uid": "job-uid-1"},
                     "ownerReferences": [{"kind": "Job", "name": "demo-i01-self-instruct-a1", "uid": "job-uid-1"}]},
        "spec": {"queueName": "gpus", "active": True}}
    plan = world.step()
    assert [(repr(a), a.body) for a in plan.actions] == [
        ("patch Workload/job-demo-i01-self-instruct-a1-1a2b3", {"spec": {"active": False}})]
    assert world.settle().actions == [] and job["spec"]["suspend"] is False  # the Job is Kueue's to suspend
    world.scaled_to_zero("demo-m00-vllm-a1")
    world.run = make_run(spec(scheduling={"queueName": "gpus"}))
    world.settle()
    world.ready("demo-m00-vllm-a1")
    plan = world.step()
    assert [(repr(a), a.body) for a in plan.actions] == [
        ("patch Workload/job-demo-i01-self-instruct-a1-1a2b3", {"spec": {"active": True}})]
    assert world.status["phase"] == "Generating" and world.settle().actions == []
    assert all(not (a.kind == "Job" and a.verb == "patch") for a in plan.actions)


def test_more_iterations_after_success_continue_the_run():
    world = World(make_run(spec(iterations=1)))
    run_to_completion(world)
    assert world.status["phase"] == "Succeeded"
    world.run = make_run(spec(iterations=2))
    plan = world.step()
    assert world.status["phase"] == "Serving" and world.status["progress"] == "2/2"
    assert "Resumed" in [e.reason for e in plan.events]
    run_to_completion(world)
    assert world.status["phase"] == "Succeeded"
    assert "Job/demo-i02-train-extender-a1" in world.created


def test_retention_delete_removes_finished_jobs():
    world = World(make_run(spec(iterations=1, retention={"jobs": "Delete"})))
    run_to_completion(world)
    world.settle()
    assert world.names("Job") == [] and world.names("ConfigMap") == ["demo-config"]


def test_config_map_follows_mutable_configuration():
    world = World(make_run())
    world.settle()
    world.run = make_run(spec(client={"concurrency": 8}))
    plan = world.step()
    assert [repr(a) for a in plan.actions] == ["patch ConfigMap/demo-config"]
    assert "concurrency: 8" in world.objects[("ConfigMap", "demo-config")]["data"]["config.yaml"]


def test_invalid_spec_fails_with_the_reason_once():
    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    plan = invalid_spec({}, 3, "invalid SelfLengthenRun spec:\n  spec.storage.uri: must be s3://", now)
    assert plan.status["phase"] == "Failed" and plan.status["observedGeneration"] == 3
    assert plan.status["lastFailure"]["reason"] == "InvalidSpec"
    assert [e.reason for e in plan.events] == ["InvalidSpec"]
    again = invalid_spec(plan.status, 3, "invalid SelfLengthenRun spec:\n  spec.storage.uri: must be s3://", now)
    assert again.events == []


def test_no_secret_values_reach_status_or_events():
    world = World(make_run())
    run_to_completion(world)
    text = repr(world.status) + repr(world.events)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "secretKeyRef" not in text
    assert play_cluster is not None


@pytest.mark.parametrize("evaluate", [True, False], ids=["after-evaluate", "without-evaluate"])
def test_collect_runs_once_after_the_last_iteration_with_its_models(evaluate):
    world = World(make_run(spec(evaluate={"enabled": evaluate}, collect={"enabled": True, "items": 64})))
    log = run_to_completion(world)
    assert world.status["phase"] == "Succeeded"
    assert [c for c in world.created if "collect" in c] == ["Job/demo-i02-collect-a1"]  # once, at the end
    assert log[-1] == "complete demo-i02-collect-a1"
    job = world.objects[("Job", "demo-i02-collect-a1")]
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    # served from the models trained in the last iteration; after evaluate, by the same server (no restart)
    assert cmd[cmd.index("--endpoint") + 1] == "http://demo-m02-vllm.ml.svc:8000/v1"
    assert world.created.count("Deployment/demo-m02-vllm-a1") == 1
    assert log[-2] == ("complete demo-i02-evaluate-a1" if evaluate else "ready demo-m02-vllm-a1")
    rec = world.status["history"][1]["stages"]["collect"]
    assert rec["state"] == "Succeeded"
    assert rec["artifactUri"] == "s3://selflengthen-artifacts/runs/demo/collect"  # the run's, not iter-02's
    assert world.names("Deployment") == []


def test_without_collect_no_collect_job():
    world = World(make_run(spec(evaluate={"enabled": True})))
    run_to_completion(world)
    assert not [c for c in world.created if "collect" in c]


# -- stuck pods and deadlines ----------------------------------------------------------------------------------------


def _conditions(world: World) -> dict:
    return {c["type"]: c for c in world.status["conditions"]}


def _pod(job: str, *, waiting: str | None = None, unschedulable: bool = False) -> dict:
    status: dict = {"phase": "Pending", "conditions": []}
    if waiting:
        status["containerStatuses"] = [{"name": "stage", "ready": False, "state": {"waiting": {
            "reason": waiting, "message": f"{waiting}: ghcr.io/example/selflengthen:0.1.0 not found"}}}]
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."})
    return {"metadata": {"name": f"{job}-abcde", "labels": {"batch.kubernetes.io/job-name": job}}, "status": status}


def _at_first_job(overrides: dict | None = None) -> World:
    world = World(make_run(spec(**(overrides or {}))))
    world.settle()
    world.ready("demo-m00-vllm-a1")
    world.settle()
    return world


@pytest.mark.parametrize("waiting, unschedulable, reason", [
    ("ImagePullBackOff", False, "ImagePullBackOff"), ("ErrImagePull", False, "ErrImagePull"),
    ("CreateContainerConfigError", False, "CreateContainerConfigError"), (None, True, "Unschedulable")])
def test_a_stuck_pod_shows_as_degraded_at_once_and_fails_the_run_after_the_stuck_time(waiting, unschedulable,
                                                                                       reason):
    world = _at_first_job({"deadlines": {"stuckSeconds": 600}})
    job = "demo-i01-self-instruct-a1"
    world.pods.append(_pod(job, waiting=waiting, unschedulable=unschedulable))
    plan = world.step(advance=5)
    degraded = _conditions(world)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == reason
    assert f"pod {job}-abcde" in degraded["message"] and "self-instruct" in degraded["message"]
    assert [e.reason for e in plan.events] == ["PodStuck"] and plan.requeue_after <= 30
    assert world.status["phase"] == "Generating"
    for _ in range(19):  # 10 minutes less a step: still waiting, no second Event
        assert "PodStuck" not in [e.reason for e in world.step(advance=30).events]
    assert world.status["phase"] == "Generating"
    world.step(advance=30)
    assert world.status["phase"] == "Failed"
    assert world.status["lastFailure"]["reason"] == reason and world.status["lastFailure"]["stage"] == "self-instruct"
    ready = _conditions(world)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == reason
    assert ("Job", job) not in world.objects  # deleted: it would start unattended once the image appears


def test_a_stuck_pod_that_recovers_clears_degraded():
    world = _at_first_job()
    world.pods.append(_pod("demo-i01-self-instruct-a1", waiting="ImagePullBackOff"))
    world.step()
    assert _conditions(world)["Degraded"]["status"] == "True"
    world.pods[-1]["status"] = {"phase": "Running", "containerStatuses": [{"name": "stage", "ready": True,
                                                                          "state": {"running": {}}}]}
    world.step()
    assert _conditions(world)["Degraded"]["status"] == "False"
    assert "stuck" not in world.status["history"][0]["stages"]["self-instruct"]


def test_a_job_whose_pods_are_refused_shows_failed_create_within_a_minute():
    world = _at_first_job()
    world.step(advance=30)
    assert _conditions(world)["Degraded"]["status"] == "False"  # pods take a moment to appear
    world.step(advance=20)
    degraded = _conditions(world)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "FailedCreate"
    assert "no pod created" in degraded["message"] and "ResourceQuota" in degraded["message"]


def test_a_deployment_refused_by_a_quota_shows_its_reason():
    world = World(make_run())
    world.settle()
    dep = world.objects[("Deployment", "demo-m00-vllm-a1")]
    dep["status"] = {"conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                     "message": 'pods "demo-m00-vllm-a1-7d9f" is forbidden: exceeded quota: gpu, '
                                                "requested: requests.nvidia.com/gpu=1, limited: 0"}]}
    world.step()
    degraded = _conditions(world)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "FailedCreate"
    assert "exceeded quota" in degraded["message"]


def test_every_stage_job_has_a_deadline_sized_for_its_stage():
    from selflengthen.operator import resources as r
    from selflengthen.operator.spec import DEFAULT_STAGE_DEADLINES

    run = make_run(spec(deadlines={"stages": {"respond": 3600}}))
    assert r.stage_job(run, 1, "respond", 1, endpoint_url="http://x/v1")["spec"]["activeDeadlineSeconds"] == 3600
    assert r.stage_job(run, 1, "build-sft", 1)["spec"]["activeDeadlineSeconds"] == DEFAULT_STAGE_DEADLINES["build-sft"]
    assert r.training_job(run, 1, "train-generator", 1)["spec"]["activeDeadlineSeconds"] == \
        DEFAULT_STAGE_DEADLINES["train-generator"] >= 24 * 3600
    from selflengthen.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="deadlines.stages"):
        make_run(spec(deadlines={"stages": {"serving": 600}}))
def test_length_following_trains_as_a_gpu_job_then_is_served_and_evaluated():
    """After collect: train-length-following as a training Job, then its model (the length-following adapter as
    the Generator, beside the last Extender) served by its own vLLM, then the evaluation Job pointed at it."""
    world = World(make_run(spec(evaluate={"enabled": True}, collect={"enabled": True, "items": 64},
                                lengthFollowing={"enabled": True})))
    log = run_to_completion(world)
    assert world.status["phase"] == "Succeeded"
    # the GPUs are freed for the training (vLLM scaled down), then the new model is served
    assert log[-5:] == ["complete demo-i02-collect-a1", "scaled down", "complete demo-i02-train-lf-a1",
                        "ready demo-m101-vllm-a1", "complete demo-i02-evaluate-lf-a1"]
    train = world.objects[("Job", "demo-i02-train-lf-a1")]
    container = train["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "train" and "nvidia.com/gpu" in container["resources"]["limits"]
    assert container["command"][1:3] == ["stage", "train-length-following"]
    assert train["metadata"]["labels"]["selflengthen.io/stage"] == "train-length-following"
    assert "Deployment/demo-m101-vllm-a1" in world.created  # gone by now (the run is over): its body as made
    from selflengthen.operator.resources import serving_deployment
    from selflengthen.operator.spec import LF_MODEL

    serving = serving_deployment(world.run, LF_MODEL, 1)
    fetch = serving["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert "demo/train-length-following/model=/adapters/generator" in fetch
    assert "demo/iter-02/train-extender/model=/adapters/extender" in fetch
    job = world.objects[("Job", "demo-i02-evaluate-lf-a1")]
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--endpoint") + 1] == "http://demo-m101-vllm.ml.svc:8000/v1"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation"
    stages = world.status["history"][1]["stages"]
    assert stages["train-length-following"]["artifactUri"].endswith("runs/demo/train-length-following")  # the run's
    assert stages["evaluate-length-following"]["state"] == "Succeeded"
    assert train["spec"]["activeDeadlineSeconds"] == 72 * 3600 and job["spec"]["activeDeadlineSeconds"] == 12 * 3600
    assert "evaluate-length-following-serving" in stages
    assert world.names("Deployment") == []
