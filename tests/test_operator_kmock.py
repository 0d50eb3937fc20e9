"""The operator (kopf 1.45) against kmock: an in-process Kubernetes API made realistic enough (RealisticKubernetes
in kube_fixtures, itself tested first), with the children's status driven by the test as the cluster's
controllers and the stage pods would drive it. The store is an in-memory stand-in the "pods" write markers to."""

from __future__ import annotations

import asyncio

import pytest

from kube_fixtures import (
    MERGE,
    NS,
    PATHS,
    RUNS_PATH,
    Cluster,
    RealisticKubernetes,
    current_child,
    operator,
    prepared_cluster,
    spec,
)
from selflengthen.operator.handlers import FINALIZER

pytestmark = pytest.mark.kmock(cls=RealisticKubernetes)


@pytest.fixture
async def cluster(monkeypatch, kmock):
    async with prepared_cluster(kmock, monkeypatch) as cluster:
        yield cluster


async def first_attempt_failed(cluster: Cluster, message: str) -> dict:
    """A one-iteration run (two attempts per stage, no backoff) whose first Job fails with `message`; the status
    once the second attempt is under way."""
    await cluster.apply("demo", spec(iterations=1, retry={"maxAttempts": 2, "backoffSeconds": 0}))
    await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
    await cluster.play()
    await cluster.fail("demo-i01-self-instruct-a1", message)
    return await cluster.wait(lambda s: current_child(s) == "demo-i01-self-instruct-a2", "attempt 2")


# -- the realism fixture itself ---------------------------------------------------------------------------------------


async def test_realistic_api_server_stamps_metadata_and_honours_subresources(cluster):
    cm = await cluster.request("POST", PATHS["ConfigMap"], {"metadata": {"name": "a", "labels": {"x": "1"}}})
    meta = cm["metadata"]
    assert meta["namespace"] == NS and meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    rv = int(meta["resourceVersion"])
    cm = await cluster.patch("ConfigMap", "a", {"data": {"k": "v"}, "metadata": {"uid": "forged"}})
    assert int(cm["metadata"]["resourceVersion"]) > rv and cm["metadata"]["uid"] == meta["uid"]
    event = {"metadata": {"generateName": "demo."}, "reason": "R", "involvedObject": {"kind": "ConfigMap", "name": "a"}}
    ev = await cluster.request("POST", PATHS["Event"], event)
    ev2 = await cluster.request("POST", PATHS["Event"], event)
    assert ev["metadata"]["name"].startswith("demo.") and ev["metadata"]["name"] != ev2["metadata"]["name"]

    run = await cluster.apply("demo", spec())
    assert run["metadata"]["generation"] == 1 and "status" not in run
    run = await cluster.patch_run({"status": {"phase": "Serving"}, "spec": {"iterations": 3}}, "status")
    assert run["status"] == {"phase": "Serving"} and run["spec"]["iterations"] == 2 and \
        run["metadata"]["generation"] == 1
    run = await cluster.patch_run({"status": {"phase": "Training"}, "spec": {"iterations": 3}})
    assert run["status"] == {"phase": "Serving"} and run["spec"]["iterations"] == 3 and \
        run["metadata"]["generation"] == 2
    run = await cluster.patch_run({"metadata": {"annotations": {"a": "b"}}})
    assert run["metadata"]["generation"] == 2  # metadata changes do not bump the generation


async def test_strict_api_server_prunes_defaults_and_validates_runs_and_children(cluster):
    run = await cluster.apply("demo", {**spec(), "unknownField": 1, "retry": {"maxAttempts": 2, "typo": 3}})
    assert "unknownField" not in run["spec"] and "typo" not in run["spec"]["retry"]  # pruned, silently
    assert run["spec"]["retry"]["backoffSeconds"] == 30 and run["spec"]["inference"]["replicas"] == 1  # defaulted
    strict = await cluster.request("POST", RUNS_PATH + "?fieldValidation=Strict", {
        "apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun", "metadata": {"name": "other"},
        "spec": {**spec(), "unknownField": 1}}, ok=(400,))
    assert strict is None and await cluster.run("other") is None

    async def refused(method, path, body, headers=None):
        async with cluster.http.request(method, path, json=body, headers=headers) as rsp:
            return rsp.status, await rsp.json()

    code, body = await refused("PATCH", f"{RUNS_PATH}/demo", {"spec": {"seed": 7}}, MERGE)  # a transition rule
    assert code == 422 and body["reason"] == "Invalid" and body["details"]["causes"][0]["field"] == "spec.seed"
    assert "immutable" in body["message"]
    code, body = await refused("PATCH", f"{RUNS_PATH}/demo/status", {"status": {"phase": "Done",
                                                                             "history": "x"}}, MERGE)
    assert code == 422 and {c["field"] for c in body["details"]["causes"]} == {"status.phase", "status.history"}
    run = await cluster.patch_run({"status": {"phase": "Serving", "nextAttemptAt": "2026-01-01T00:00:00Z"}},
                                  "status")
    assert run["status"] == {"phase": "Serving"}  # an undeclared status field is pruned, silently
    code, body = await refused("POST", PATHS["ConfigMap"], {"metadata": {"name": "Bad_Name", "labels": {
        "a b": "c"}}, "data": {"k": "v"}})
    assert code == 422 and {c["field"] for c in body["details"]["causes"]} == {"metadata.name", "metadata.labels"}
    code, body = await refused("POST", PATHS["Job"], {"metadata": {"name": "j"}, "spec": {"template": {
        "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limits": {"cpu": "-1"}}}],
                 "restartPolicy": "Never"}}}})
    assert code == 422 and "resources.limits[cpu]" in body["message"]
    assert cluster.k8s.refused[-1][0] == "Job"


async def test_realistic_api_server_filters_by_label_selector(cluster):
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {})):
        await cluster.request("POST", PATHS["ConfigMap"], {"metadata": {"name": name, "labels": labels}})

    async def names(sel):
        doc = await cluster.request("GET", f"{PATHS['ConfigMap']}?labelSelector={sel}")
        return sorted(o["metadata"]["name"] for o in doc["items"])

    assert await names("app=x") == ["a"]
    assert await names("app in (x,y)") == ["a", "b"]
    assert await names("app,!tier") == ["b"]
    assert await names("app!=x") == ["b", "c"]


async def test_realistic_api_server_discovers_the_crd(cluster):
    doc = await cluster.request("GET", "/apis/selflengthen.io/v1alpha1")
    names = {r["name"]: r for r in doc["resources"]}
    assert names["selflengthenruns"]["kind"] == "SelfLengthenRun" and names["selflengthenruns"]["namespaced"]
    assert names["selflengthenruns"]["shortNames"] == ["slr"] and "selflengthenruns/status" in names


# -- the operator end to end ------------------------------------------------------------------------------------------


async def test_happy_path_two_iterations_from_apply_to_succeeded(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec())
        st = await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        assert st["progress"] == "1/2" and st["observedGeneration"] == 1
        assert await cluster.names("Deployment") == ["demo-m00-vllm-a1"]
        assert await cluster.names("Service") == ["demo-m00-vllm"]
        assert await cluster.names("ConfigMap") == ["demo-config"]
        assert await cluster.names("Job") == []
        run = await cluster.run()
        assert FINALIZER in run["metadata"]["finalizers"]
        steps = []
        while (await cluster.status()).get("phase") not in ("Succeeded", "Failed"):
            before = await cluster.status()
            jobs_before = set(await cluster.names("Job"))
            steps.append(await cluster.play())
            after = await cluster.status()
            new_jobs = set(await cluster.names("Job")) - jobs_before
            # only the current stage's Job appears, and only once the previous step is done; build-sft (CPU only)
            # appears as vLLM starts going down, before the GPUs are free
            if after.get("phase") in ("Generating", "Training") or after.get("stage") == "build-sft":
                assert new_jobs <= {current_child(after)}, (steps[-1], new_jobs)
                assert current_child(after) in jobs_before | new_jobs
                if after.get("phase") == "Generating":
                    assert new_jobs == {current_child(after)}, (steps[-1], new_jobs)
            else:
                assert new_jobs == set(), (steps[-1], new_jobs)
            assert after["currentIteration"] >= before["currentIteration"]
        st = await cluster.status()
        assert st["phase"] == "Succeeded", st
        assert steps == [
            "ready demo-m00-vllm-a1", "complete demo-i01-self-instruct-a1", "complete demo-i01-respond-a1",
            "complete demo-i01-extend-a1", "scaled down", "complete demo-i01-build-sft-a1",
            "complete demo-i01-train-generator-a1", "complete demo-i01-train-extender-a1",
            "ready demo-m01-vllm-a1", "complete demo-i02-self-instruct-a1", "complete demo-i02-respond-a1",
            "complete demo-i02-extend-a1", "scaled down", "complete demo-i02-build-sft-a1",
            "complete demo-i02-train-generator-a1", "complete demo-i02-train-extender-a1"]
        assert st["progress"] == "2/2" and st["averageWords"] == 2310
        conditions = {c["type"]: c["status"] for c in st["conditions"]}
        assert conditions == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
        assert await cluster.names("Deployment") == [] and await cluster.names("Service") == []
        assert len(await cluster.names("Job")) == 12
        assert len(cluster.created("jobs")) == 12  # no Job was ever created twice
        job = await cluster.get("Job", "demo-i02-self-instruct-a1")
        cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[cmd.index("--endpoint") + 1] == "http://demo-m01-vllm.ml.svc:8000/v1"
        assert job["metadata"]["ownerReferences"][0]["uid"] == (await cluster.run())["metadata"]["uid"]
        reasons = [e["reason"] for e in await cluster.events()]
        assert reasons.count("StageSucceeded") == 12 and "RunSucceeded" in reasons and "Accepted" in reasons
        assert all(e["involvedObject"]["name"] == "demo" for e in await cluster.events())


async def test_full_fine_tuning_two_iterations_serves_each_role_from_its_own_checkpoint(cluster):
    """Full fine-tuning, 2 iterations: iteration 2's data stages are served by iteration 1's models, each role's
    vLLM loading that role's own checkpoint from the store, the base model beside them for self-instruct; each
    Job is told where each model is. The API server validates every child as kube-apiserver would."""
    async with operator(cluster):
        await cluster.apply("demo", spec(training={"mode": "full"}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        served, commands, ports = {}, {}, {}
        while (st := await cluster.status()).get("phase") not in ("Succeeded", "Failed"):
            child = current_child(st)
            if st.get("phase") == "Serving" and child and child not in served:
                dep = await cluster.get("Deployment", child)
                if dep is not None:
                    pod = dep["spec"]["template"]["spec"]
                    served[child] = {
                        "vllm": {c["name"]: (c["command"][2], c["command"][c["command"].index("--served-model-name")
                                                                         + 1]) for c in pod["containers"]},
                        "fetch": [a for c in pod.get("initContainers", []) for a in c["command"] if "=/" in a]}
                    svc = await cluster.get("Service", child.rsplit("-a", 1)[0])
                    ports[child] = [(p["name"], p["port"]) for p in svc["spec"]["ports"]]
            if st.get("phase") == "Generating" and child and child not in commands:
                job = await cluster.get("Job", child)
                if job is not None:
                    commands[child] = job["spec"]["template"]["spec"]["containers"][0]["command"]
            await cluster.play()
        assert (await cluster.status())["phase"] == "Succeeded"
        assert served["demo-m00-vllm-a1"] == {"vllm": {"vllm": ("Qwen/Qwen2-7B-Instruct", "generator")},
                                              "fetch": []}
        assert served["demo-m01-vllm-a1"] == {
            "vllm": {"vllm": ("/adapters/generator", "generator"), "vllm-extender": ("/adapters/extender", "extender"),
                     "vllm-base": ("Qwen/Qwen2-7B-Instruct", "base")},
            "fetch": ["demo/iter-01/train-generator/model=/adapters/generator",
                      "demo/iter-01/train-extender/model=/adapters/extender"]}
        for stage in ("self-instruct", "respond", "extend"):
            cmd = commands[f"demo-i02-{stage}-a1"]
            routes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--model-endpoint"]
            assert cmd[cmd.index("--endpoint") + 1] == "http://demo-m01-vllm.ml.svc:8000/v1"
            assert routes == ["base=http://demo-m01-vllm.ml.svc:8002/v1",
                              "extender=http://demo-m01-vllm.ml.svc:8001/v1"]
            assert "--model-endpoint" not in commands[f"demo-i01-{stage}-a1"]  # the base model under every name
        assert ports == {"demo-m00-vllm-a1": [("http", 8000)],
                         "demo-m01-vllm-a1": [("http", 8000), ("http-extender", 8001), ("http-base", 8002)]}


async def test_operator_restart_in_the_middle_of_every_stage(cluster):
    """Stop the operator in every step of a run and start a new one: it continues from the status and the
    store markers, adopts what exists, and makes no child twice."""
    run_spec = spec(iterations=1, evaluate={"enabled": True})
    async with operator(cluster):
        await cluster.apply("demo", run_spec)
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
    restarts = 0
    while (await cluster.status()).get("phase") not in ("Succeeded", "Failed"):
        async with operator(cluster):
            restarts += 1
            await cluster.play()
    st = await cluster.status()
    assert st["phase"] == "Succeeded" and restarts == 10  # 7 Jobs, 2 servings, 1 scale-down
    jobs = cluster.created("jobs")
    assert len(jobs) == len(set(jobs)) == 7
    deployments = cluster.created("deployments")
    assert deployments == ["demo-m00-vllm-a1", "demo-m01-vllm-a1"]


async def test_operator_restart_with_a_lost_status_trusts_the_store(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        for _ in range(3):
            await cluster.play()  # serving ready, self-instruct and respond done
    # wipe the status (as if it had never been written), then restart
    await cluster.patch_run({"status": None}, "status")
    async with operator(cluster):
        st = await cluster.wait(lambda s: s.get("stage") == "extend", "extend")
        assert st["history"][0]["stages"]["self-instruct"]["state"] == "Succeeded"
    assert cluster.created("jobs") == ["demo-i01-self-instruct-a1", "demo-i01-respond-a1", "demo-i01-extend-a1"]


async def test_concurrent_training_with_a_lost_status_trusts_the_store_beyond_the_first_missing_stage(cluster):
    """training.concurrent: both training Jobs at once, on the strict API server; the Extender finishes first and
    its Job is gone, the status is lost: the restarted operator finds the Extender's marker behind the
    Generator's missing one and makes no Job twice."""
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, training={"concurrent": True, "processesPerNode": 4}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        while (await cluster.status()).get("stage") != "train-generator" or \
                (await cluster.status()).get("phase") != "Training":
            await cluster.play()
        await cluster.until(lambda: cluster.get("Job", "demo-i01-train-extender-a1"), "the Extender's Job")
        jobs = await cluster.names("Job")
        assert {"demo-i01-train-generator-a1", "demo-i01-train-extender-a1"} <= set(jobs)
        assert await cluster.complete("demo-i01-train-extender-a1")
    await cluster.request("DELETE", f"{PATHS['Job']}/demo-i01-train-extender-a1")
    await cluster.patch_run({"status": None}, "status")
    async with operator(cluster):
        st = await cluster.wait(lambda s: s.get("stage") == "train-generator", "train-generator")
        assert st["history"][0]["stages"]["train-extender"]["state"] == "Succeeded"
        assert await cluster.complete("demo-i01-train-generator-a1")
        await cluster.wait(lambda s: s.get("phase") == "Succeeded", "Succeeded")
    jobs = cluster.created("jobs")
    assert len(jobs) == len(set(jobs)) == 6


async def test_a_stage_failing_once_is_retried(cluster):
    async with operator(cluster):
        st = await first_attempt_failed(cluster, "error: the inference server stayed unreachable for 300s")
        rec = st["history"][0]["stages"]["self-instruct"]
        assert rec["attempts"] == 2 and rec["failures"][0]["attempt"] == 1
        assert "stayed unreachable" in rec["failures"][0]["message"]
        assert "demo-i01-self-instruct-a1" in await cluster.names("Job")  # kept for its logs
        await cluster.complete("demo-i01-self-instruct-a2")
        await cluster.wait(lambda s: s.get("stage") == "respond", "respond")
        warnings = [e for e in await cluster.events() if e["type"] == "Warning"]
        assert [e["reason"] for e in warnings] == ["StageFailed"]
        assert "attempt 1/2 failed" in warnings[0]["message"]


async def test_a_failed_attempt_waits_out_its_backoff_in_the_stored_status(cluster):
    """On a strict API server: the Retrying record and its nextAttemptAt are declared (not refused with 422, not
    pruned), so the backoff holds across reconciles and the failure is reported once."""
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, retry={"maxAttempts": 2, "backoffSeconds": 600}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        await cluster.fail(current_child(await cluster.status()), "error: boom")
        st = await cluster.wait(lambda s: (s.get("lastFailure") or {}).get("attempt") == 1, "the failure recorded")
        rec = st["history"][0]["stages"]["self-instruct"]
        assert rec["state"] == "Retrying" and rec["nextAttemptAt"] > st["lastFailure"]["time"]
        degraded = {c["type"]: c for c in st["conditions"]}["Degraded"]
        assert degraded["status"] == "True" and degraded["reason"] == "Retrying"
        await asyncio.sleep(1.0)  # several polls (0.3 s) later: still waiting, nothing reported twice
        assert (await cluster.status())["history"][0]["stages"]["self-instruct"]["nextAttemptAt"] == \
            rec["nextAttemptAt"]
        assert [e["reason"] for e in await cluster.events() if e["type"] == "Warning"] == ["StageFailed"]
        assert await cluster.names("Job") == ["demo-i01-self-instruct-a1"]


async def test_a_stage_failing_always_fails_the_run_with_reason_and_event(cluster):
    async with operator(cluster):
        await first_attempt_failed(cluster, "error: boom")
        await cluster.fail("demo-i01-self-instruct-a2",
                           "error: stage self-instruct: no instruction accepted after 40 tries")
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed")
        assert "no instruction accepted" in st["failureMessage"]  # declared: not pruned by the API server
        assert st["lastFailure"]["stage"] == "self-instruct" and st["lastFailure"]["attempt"] == 2
        assert st["lastFailure"]["reason"] == "BackoffLimitExceeded"
        assert "no instruction accepted after 40 tries" in st["lastFailure"]["message"]
        ready = {c["type"]: c for c in st["conditions"]}["Ready"]
        assert ready["status"] == "False" and "self-instruct failed after 2 attempt(s)" in ready["message"]
        events = [e for e in await cluster.events() if e["reason"] == "RunFailed"]
        assert events and events[0]["type"] == "Warning" and "no instruction accepted" in events[0]["message"]

        async def gpus_given_back():
            return not await cluster.names("Deployment")

        await cluster.until(gpus_given_back, "the GPUs given back")
        assert await cluster.names("Deployment") == []


async def test_vllm_never_healthy_fails_serving_after_the_startup_timeout(cluster):
    # the timeout leaves room for the crash-looping pod below to be made and seen first on a loaded machine (at 5 s
    # the operator sometimes timed out before it saw the pod, and the failure then had no container detail)
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, inference={"startupTimeoutSeconds": 12},
                                         retry={"maxAttempts": 1}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        dep = await cluster.get("Deployment", "demo-m00-vllm-a1")
        labels = dep["spec"]["template"]["metadata"]["labels"]
        await cluster.request("POST", PATHS["Pod"], {"metadata": {"name": "demo-m00-vllm-a1-x7k2p", "labels": labels},
                                                     "spec": {"containers": [{"name": "vllm", "image": "v"}]}})
        await cluster.patch("Pod", "demo-m00-vllm-a1-x7k2p", {"status": {"phase": "Running", "containerStatuses": [{
            "name": "vllm", "restartCount": 2, "ready": False,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
            "lastState": {"terminated": {"reason": "Error", "exitCode": 1,
                                         "message": "ValueError: Bfloat16 is only supported on GPUs"}}}]}},
            "status")
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed", timeout=40)
        failure = st["lastFailure"]
        assert failure["reason"] == "StartupTimeout" and failure["stage"] == "serving"
        assert "CrashLoopBackOff" in failure["message"] and "Bfloat16 is only supported" in failure["message"]
        assert await cluster.names("Job") == []


async def test_suspend_and_resume_under_kueue_go_through_the_workload(cluster):
    """With a Kueue queue, Job.spec.suspend is Kueue's: the operator deactivates the Job's Workload to suspend
    (Kueue evicts it and suspends the Job) and activates it again to resume (Kueue admits and unsuspends it)."""
    job = "demo-i01-self-instruct-a1"

    def workload_active(value):
        async def check():
            wls = [w for w in await cluster.items("Workload")
                   if w["metadata"]["ownerReferences"][0]["name"] == job]
            return len(wls) == 1 and wls[0]["spec"]["active"] is value
        return check

    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, scheduling={"queueName": "gpus"}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        assert (await cluster.get("Job", job))["spec"]["suspend"] is True  # created suspended: Kueue admits it
        uid = (await cluster.get("Job", job))["metadata"]["uid"]
        assert await cluster.kueue() == [f"workload job-{job}-{uid[:5]}", f"admitted {job}"]
        assert (await cluster.get("Job", job))["spec"]["suspend"] is False
        await cluster.patch_run({"spec": {"suspend": True}})
        await cluster.wait(lambda s: s.get("phase") == "Suspended", "Suspended")
        await cluster.until(workload_active(False), "the Workload deactivated")
        assert await cluster.kueue() == [f"evicted {job}"]  # Kueue's own stop: the Job suspended by Kueue
        await cluster.patch("Deployment", "demo-m00-vllm-a1", {"status": {"replicas": 0, "readyReplicas": 0}},
                            "status")
        await asyncio.sleep(0.5)
        assert await cluster.kueue() == []  # nothing fights: the Job stays suspended, the Workload inactive
        assert (await cluster.get("Job", job))["spec"]["suspend"] is True
        await cluster.patch_run({"spec": {"suspend": False}})
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving again")
        await cluster.ready("demo-m00-vllm-a1")
        await cluster.wait(lambda s: s.get("phase") == "Generating", "Generating")
        await cluster.until(workload_active(True), "the Workload activated")
        assert await cluster.kueue() == [f"admitted {job}"]
        assert (await cluster.get("Job", job))["spec"]["suspend"] is False
        # the operator never wrote the field Kueue owns
        assert not [w for w in cluster.k8s.log if w.who and w.plural == "jobs" and w.action == "UPDATE"
                    and "suspend" in ((w.body or {}).get("spec") or {})]
        assert [w.body["spec"] for w in cluster.k8s.log if w.who and w.plural == "workloads"] == [
            {"active": False}, {"active": True}]
        reasons = [e["reason"] for e in await cluster.events()]
        assert "Suspended" in reasons and "Resumed" in reasons


async def test_suspend_and_resume(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        await cluster.patch_run({"spec": {"suspend": True}})
        st = await cluster.wait(lambda s: s.get("phase") == "Suspended", "Suspended")
        assert st["observedGeneration"] == 2
        job = await cluster.get("Job", "demo-i01-self-instruct-a1")
        assert job["spec"]["suspend"] is True
        assert (await cluster.get("Deployment", "demo-m00-vllm-a1"))["spec"]["replicas"] == 0
        await cluster.patch("Deployment", "demo-m00-vllm-a1", {"status": {"replicas": 0, "readyReplicas": 0}},
                            "status")
        await asyncio.sleep(0.5)
        assert await cluster.names("Job") == ["demo-i01-self-instruct-a1"]  # nothing new while suspended
        await cluster.patch_run({"spec": {"suspend": False}})
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving again")
        assert (await cluster.get("Deployment", "demo-m00-vllm-a1"))["spec"]["replicas"] == 1
        await cluster.ready("demo-m00-vllm-a1")
        await cluster.wait(lambda s: s.get("phase") == "Generating", "Generating")

        async def job_resumed():
            return not (await cluster.get("Job", "demo-i01-self-instruct-a1"))["spec"]["suspend"]

        await cluster.until(job_resumed, "the Job resumed")
        assert (await cluster.get("Job", "demo-i01-self-instruct-a1"))["spec"]["suspend"] is False
        reasons = [e["reason"] for e in await cluster.events()]
        assert "Suspended" in reasons and "Resumed" in reasons


@pytest.mark.parametrize("artifacts", ["Retain", "Delete"])
async def test_deletion_runs_the_finalizer_and_removes_children(cluster, artifacts):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, retention={"artifacts": artifacts}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        await cluster.wait(lambda s: s.get("phase") == "Generating", "Generating")
        assert await cluster.names("Job") == ["demo-i01-self-instruct-a1"]
        cluster.probe.markers[(1, "self-instruct")] = {"stage": "self-instruct"}
        await cluster.request("DELETE", f"{RUNS_PATH}/demo")

        async def run_gone():
            return await cluster.run() is None

        await cluster.until(run_gone, "the run deleted")
        assert await cluster.run() is None
        for kind in ("Job", "Deployment", "Service", "ConfigMap"):
            assert await cluster.names(kind) == [], kind
        assert cluster.probe.deleted is (artifacts == "Delete")


async def test_invalid_spec_that_bypassed_admission_is_reported(cluster):
    async with operator(cluster):
        await cluster.apply("demo", {**spec(), "storage": {"uri": "file:///data"}}, admitted_by_older_crd=True)
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed")
        assert st["lastFailure"]["reason"] == "InvalidSpec" and "spec.storage.uri" in st["lastFailure"]["message"]
        assert await cluster.names("Job") == [] and await cluster.names("Deployment") == []
        assert [e["reason"] for e in await cluster.events()] == ["InvalidSpec"]


# -- children the API server refuses ----------------------------------------------------------------------------------


def deny(kind: str, code: int, message: str):
    return lambda k, obj: (code, message) if k == kind else None


async def test_a_child_the_api_server_refuses_fails_the_run_until_its_spec_changes(cluster):
    message = ("ValidatingAdmissionPolicy 'gpu-nodes' with binding 'gpu-nodes' denied request: inference pods must "
               "select a GPU node pool " + "x" * 2000)
    policy = deny("Deployment", 422, message)
    cluster.k8s.policies.append(policy)
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1))
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed")
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "ChildRejected"
        assert "Deployment demo-m00-vllm-a1 refused by the API server (422" in conds["Degraded"]["message"]
        assert "must select a GPU node pool" in conds["Degraded"]["message"]
        assert len(conds["Degraded"]["message"]) < 1100  # the API's message trimmed
        assert conds["Ready"]["reason"] == "ChildRejected" and st["lastFailure"]["reason"] == "ChildRejected"
        await asyncio.sleep(1.0)  # several polls: reported once
        assert [e["reason"] for e in await cluster.events() if e["type"] == "Warning"] == ["ChildRejected",
                                                                                           "RunFailed"]
        cluster.k8s.policies.remove(policy)  # the cluster's policy changed; and so did the spec:
        await cluster.patch_run({"spec": {"iterations": 2}})
        st = await cluster.wait(lambda s: s.get("phase") == "Serving" and "rejection" not in s, "resumed")
        assert {c["type"]: c for c in st["conditions"]}["Degraded"]["status"] == "False"
        assert "demo-m00-vllm-a1" in await cluster.names("Deployment")


async def test_a_child_refused_for_now_keeps_the_run_degraded_and_is_retried(cluster):
    quota = deny("Job", 403, 'jobs "demo-i01-self-instruct-a1" is forbidden: exceeded quota: jobs, requested: '
                 'count/jobs.batch=1, used: count/jobs.batch=10, limited: count/jobs.batch=10')
    cluster.k8s.policies.append(quota)
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, retry={"backoffSeconds": 0}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        st = await cluster.wait(lambda s: "rejection" in s, "the refusal reported")
        degraded = {c["type"]: c for c in st["conditions"]}["Degraded"]
        assert degraded["reason"] == "ChildRejected" and "exceeded quota" in degraded["message"]
        assert st["phase"] == "Generating"
        cluster.k8s.policies.remove(quota)
        st = await cluster.wait(lambda s: "rejection" not in s, "the Job created")
        assert "demo-i01-self-instruct-a1" in await cluster.names("Job")
        assert {c["type"]: c for c in st["conditions"]}["Degraded"]["status"] == "False"


# -- what the operator asks the API server for ----------------------------------------------------------------------


async def test_children_are_watched_and_listed_filtered_by_the_server_and_in_chunks(cluster):
    from selflengthen.operator.kube import CONFIGMAPS, Kube

    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
    requests = [*cluster.k8s.lists, *cluster.k8s.watches]
    children = [params for plural, params in requests if plural in ("pods", "jobs", "deployments")]
    assert children and all("app.kubernetes.io/managed-by=selflengthen-operator" in params.get("labelSelector", "")
                            for params in children), children
    assert all(params.get("limit") for plural, params in cluster.k8s.lists
               if plural in ("pods", "jobs", "deployments", "services", "configmaps")), cluster.k8s.lists
    for i in range(5):
        await cluster.request("POST", PATHS["ConfigMap"], {"metadata": {"name": f"c{i}", "labels": {"x": "1"}}})
    url = str(cluster.k8s.url)
    import kopf

    kube = Kube(lambda: kopf.ConnectionInfo(server=url))
    try:
        before = len(cluster.k8s.lists)
        items = await kube.list(CONFIGMAPS, NS, {"x": "1"}, chunk=2)
        assert sorted(o["metadata"]["name"] for o in items) == [f"c{i}" for i in range(5)]
        assert len(cluster.k8s.lists) - before == 3
    finally:
        await kube.close()


async def test_a_finished_run_is_not_polled_and_its_store_opened_once(cluster):
    opened = []

    async def probe(kube, run):
        opened.append(run.name)
        return cluster.probe

    async with operator(cluster, probe=probe) as replica:
        await cluster.apply("demo", {**spec(), "storage": {"uri": "file:///data"}}, admitted_by_older_crd=True)
        await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed")
        await cluster.apply("ok", spec(iterations=1))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving", name="ok")
        await asyncio.sleep(0.5)
        at_rest = replica.controller.reconciles
        await asyncio.sleep(1.5)  # five poll intervals (0.3 s) of a run that is Serving and one that is Failed
        polled = replica.controller.reconciles - at_rest
        assert 2 <= polled <= 8, polled  # the Serving run's polls (and its startup timer) only
        assert opened == ["ok"]  # one store client for all of ok's reconciles (demo's spec never parsed)
        await cluster.patch_run({"spec": {"iterations": 3}})  # a change of the finished run wakes it
        await cluster.wait(lambda s: s.get("observedGeneration") == 2, "the change seen")
