"""The operator (kopf 1.45) against kmock: an in-process Kubernetes API made realistic enough (RealisticKubernetes
in kube_fixtures, itself tested first), with the children's status driven by the test as the cluster's
controllers and the stage pods would drive it. The store is an in-memory stand-in the "pods" write markers to."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import kopf
import kmock as kmock_lib
import pytest

from kube_fixtures import MANIFESTS, RealisticKubernetes, current_child, parse_path, spec
from selflengthen.operator.crd import crd
from selflengthen.operator.handlers import FINALIZER, OperatorOptions, build_registry

pytestmark = pytest.mark.kmock(cls=RealisticKubernetes)

NS = "ml"
RUNS = f"/apis/selflengthen.io/v1alpha1/namespaces/{NS}/selflengthenruns"
PATHS = {
    "Job": f"/apis/batch/v1/namespaces/{NS}/jobs",
    "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments",
    "Service": f"/api/v1/namespaces/{NS}/services",
    "ConfigMap": f"/api/v1/namespaces/{NS}/configmaps",
    "Pod": f"/api/v1/namespaces/{NS}/pods",
    "Event": f"/api/v1/namespaces/{NS}/events",
}
MERGE = {"Content-Type": "application/merge-patch+json"}


class MemoryProbe:
    """The artifact store as the operator reads it: completion markers and manifests, per (iteration, stage)."""

    def __init__(self):
        self.markers: dict[tuple[int, str], dict] = {}
        self.deleted = False

    def done(self, iteration, stage):
        return (iteration, stage) in self.markers

    def manifest(self, iteration, stage):
        return self.markers.get((iteration, stage))

    def delete_run(self):
        count = len(self.markers)
        self.markers.clear()
        self.deleted = True
        return count


class Cluster:
    """The test's hands on the API server: apply runs, read them, and play the cluster's part."""

    def __init__(self, k8s, session: aiohttp.ClientSession, probe: MemoryProbe):
        self.k8s, self.http, self.probe = k8s, session, probe

    async def request(self, method: str, path: str, body=None, headers=None):
        async with self.http.request(method, path, json=body, headers=headers) as rsp:
            data = await rsp.json(content_type=None)
            assert rsp.status < 400, (method, path, rsp.status, data)
            return data

    async def apply(self, name: str, run_spec: dict) -> dict:
        return await self.request("POST", RUNS, {"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun",
                                                 "metadata": {"name": name}, "spec": run_spec})

    async def run(self, name: str = "demo") -> dict | None:
        async with self.http.get(f"{RUNS}/{name}") as rsp:
            return await rsp.json() if rsp.status == 200 else None

    async def status(self, name: str = "demo") -> dict:
        return ((await self.run(name)) or {}).get("status") or {}

    async def names(self, kind: str) -> list[str]:
        doc = await self.request("GET", PATHS[kind])
        return sorted(o["metadata"]["name"] for o in doc["items"])

    async def get(self, kind: str, name: str) -> dict:
        return await self.request("GET", f"{PATHS[kind]}/{name}")

    async def patch(self, kind: str, name: str, body: dict, sub: str | None = None) -> dict:
        return await self.request("PATCH", f"{PATHS[kind]}/{name}" + (f"/{sub}" if sub else ""), body, MERGE)

    async def events(self) -> list[dict]:
        return (await self.request("GET", PATHS["Event"]))["items"]

    async def wait(self, predicate, what: str, timeout: float = 15.0, name: str = "demo") -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            st = await self.status(name)
            if predicate(st):
                return st
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {st}")
            await asyncio.sleep(0.05)

    # -- the cluster's part

    async def ready(self, name: str) -> None:
        dep = await self.get("Deployment", name)
        n = dep["spec"]["replicas"]
        await self.patch("Deployment", name, {"status": {"replicas": n, "readyReplicas": n, "availableReplicas": n}},
                         "status")

    async def complete(self, name: str, manifest: dict | None = None) -> None:
        job = await self.get("Job", name)
        labels = job["metadata"]["labels"]
        key = (int(labels["selflengthen.io/iteration"]), labels["selflengthen.io/stage"])
        self.probe.markers[key] = manifest or {"stage": key[1]}  # the pod wrote manifest.json and _SUCCESS
        await self.patch("Job", name, {"status": {"succeeded": 1, "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}}, "status")

    async def fail(self, name: str, message: str) -> None:
        job = await self.get("Job", name)
        labels = dict(job["spec"]["template"]["metadata"]["labels"], **{"batch.kubernetes.io/job-name": name})
        await self.request("POST", PATHS["Pod"], {"metadata": {"name": f"{name}-abcde", "labels": labels},
                                                  "spec": {"containers": [{"name": "stage", "image": "x"}]}})
        await self.patch("Pod", f"{name}-abcde", {"status": {"phase": "Failed", "containerStatuses": [{
            "name": "stage", "state": {"terminated": {"reason": "Error", "exitCode": 1, "message": message}}}]}},
            "status")
        await self.patch("Job", name, {"status": {"failed": 1, "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"}]}}, "status")

    async def play(self, name: str = "demo") -> str:
        """Do the cluster's next part for the run's current step and wait until the operator moved on."""
        st = await self.status(name)
        phase, child = st.get("phase"), current_child(st)
        if phase == "Serving":
            await self.ready(child)
            done = f"ready {child}"
        elif phase == "ScalingDown":
            for dep in await self.names("Deployment"):
                await self.patch("Deployment", dep, {"status": {"replicas": 0, "readyReplicas": 0}}, "status")
            done = "scaled down"
        elif phase in ("Generating", "Training", "Evaluating"):
            await self.complete(child, MANIFESTS.get(st["stage"]))
            done = f"complete {child}"
        else:
            raise AssertionError(f"nothing to play in phase {phase}: {st}")
        await self.wait(lambda s: (s.get("phase"), current_child(s)) != (phase, child), f"progress after {done}",
                        name=name)
        return done


def fast_settings(settings: kopf.OperatorSettings) -> None:
    settings.watching.reconnect_backoff = 0.1
    settings.queueing.idle_timeout = 1.0
    settings.queueing.exit_timeout = 1.0
    settings.posting.enabled = False  # kopf's own events; ours are posted by the operator itself


@pytest.fixture
def _paths(monkeypatch):
    from kmock._internal import parsing

    monkeypatch.setattr(parsing, "parse_path", parse_path)


@pytest.fixture
async def k8s(_paths, kmock):
    kmock.resources.load_bundled()
    kmock.register_crd(crd())
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        async with session.post("/api/v1/namespaces", json={"metadata": {"name": NS}}) as rsp:
            assert rsp.status < 400
    return kmock


@pytest.fixture
async def cluster(k8s):
    probe = MemoryProbe()
    # One connection per request: kopf cancels every task started while it ran when it stops, which includes
    # the server's handlers of kept-alive connections (a restarted operator would find the test's one dead).
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base_url=str(k8s.url), connector=connector) as session:
        yield Cluster(k8s, session, probe)


@contextlib.asynccontextmanager
async def operator(cluster: Cluster, poll: float = 0.3):
    async def probe(kube, run):
        return cluster.probe

    options = OperatorOptions(poll_seconds=poll, login=lambda **_: kopf.ConnectionInfo(server=str(cluster.k8s.url)),
                              probe=probe, configure=fast_settings)
    registry, controller = build_registry(options)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, namespaces=[NS], standalone=True,
                                             stop_flag=stop, ready_flag=ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield controller
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def creates(k8s, kind: str) -> list[str]:
    """Names created of a kind, in order (duplicates would show a second create of the same child)."""
    plural = PATHS[kind].rsplit("/", 1)[1]
    return [name for action, res, name, _ in k8s.writes if action == "CREATE" and res == plural]


# -- the realism fixture itself ---------------------------------------------------------------------------------------


async def test_realistic_api_server_stamps_metadata_and_honours_subresources(cluster):
    cm = await cluster.request("POST", PATHS["ConfigMap"], {"metadata": {"name": "a", "labels": {"x": "1"}}})
    meta = cm["metadata"]
    assert meta["namespace"] == NS and meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    rv = int(meta["resourceVersion"])
    cm = await cluster.patch("ConfigMap", "a", {"data": {"k": "v"}, "metadata": {"uid": "forged"}})
    assert int(cm["metadata"]["resourceVersion"]) > rv and cm["metadata"]["uid"] == meta["uid"]
    ev = await cluster.request("POST", PATHS["Event"], {"metadata": {"generateName": "demo."}, "reason": "R"})
    ev2 = await cluster.request("POST", PATHS["Event"], {"metadata": {"generateName": "demo."}, "reason": "R"})
    assert ev["metadata"]["name"].startswith("demo.") and ev["metadata"]["name"] != ev2["metadata"]["name"]

    run = await cluster.apply("demo", spec())
    assert run["metadata"]["generation"] == 1 and "status" not in run
    run = await cluster.request("PATCH", f"{RUNS}/demo/status", {"status": {"phase": "X"}, "spec": {"seed": 5}},
                                MERGE)
    assert run["status"] == {"phase": "X"} and "seed" not in run["spec"] and run["metadata"]["generation"] == 1
    run = await cluster.request("PATCH", f"{RUNS}/demo", {"status": {"phase": "Y"}, "spec": {"seed": 5}}, MERGE)
    assert run["status"] == {"phase": "X"} and run["spec"]["seed"] == 5 and run["metadata"]["generation"] == 2
    run = await cluster.request("PATCH", f"{RUNS}/demo", {"metadata": {"annotations": {"a": "b"}}}, MERGE)
    assert run["metadata"]["generation"] == 2  # metadata changes do not bump the generation


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
            # exactly the current stage's Job appears, and only once the previous step is done
            if after.get("phase") in ("Generating", "Training"):
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
        assert len(creates(cluster.k8s, "Job")) == 12  # no Job was ever created twice
        job = await cluster.get("Job", "demo-i02-self-instruct-a1")
        cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[cmd.index("--endpoint") + 1] == "http://demo-m01-vllm.ml.svc:8000/v1"
        assert job["metadata"]["ownerReferences"][0]["uid"] == (await cluster.run())["metadata"]["uid"]
        reasons = [e["reason"] for e in await cluster.events()]
        assert reasons.count("StageSucceeded") == 12 and "RunSucceeded" in reasons and "Accepted" in reasons
        assert all(e["involvedObject"]["name"] == "demo" for e in await cluster.events())


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
    jobs = creates(cluster.k8s, "Job")
    assert len(jobs) == len(set(jobs)) == 7
    deployments = creates(cluster.k8s, "Deployment")
    assert deployments == ["demo-m00-vllm-a1", "demo-m01-vllm-a1"]


async def test_operator_restart_with_a_lost_status_trusts_the_store(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        for _ in range(3):
            await cluster.play()  # serving ready, self-instruct and respond done
    # wipe the status (as if it had never been written), then restart
    await cluster.request("PATCH", f"{RUNS}/demo/status", {"status": None}, MERGE)
    async with operator(cluster):
        st = await cluster.wait(lambda s: s.get("stage") == "extend", "extend")
        assert st["history"][0]["stages"]["self-instruct"]["state"] == "Succeeded"
    assert creates(cluster.k8s, "Job") == ["demo-i01-self-instruct-a1", "demo-i01-respond-a1",
                                           "demo-i01-extend-a1"]


async def test_a_stage_failing_once_is_retried(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, retry={"maxAttempts": 2, "backoffSeconds": 0}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        await cluster.fail("demo-i01-self-instruct-a1", "error: the inference server stayed unreachable for 300s")
        st = await cluster.wait(lambda s: current_child(s) == "demo-i01-self-instruct-a2", "attempt 2")
        rec = st["history"][0]["stages"]["self-instruct"]
        assert rec["attempts"] == 2 and rec["failures"][0]["attempt"] == 1
        assert "stayed unreachable" in rec["failures"][0]["message"]
        assert "demo-i01-self-instruct-a1" in await cluster.names("Job")  # kept for its logs
        await cluster.complete("demo-i01-self-instruct-a2")
        await cluster.wait(lambda s: s.get("stage") == "respond", "respond")
        warnings = [e for e in await cluster.events() if e["type"] == "Warning"]
        assert [e["reason"] for e in warnings] == ["StageFailed"]
        assert "attempt 1/2 failed" in warnings[0]["message"]


async def test_a_stage_failing_always_fails_the_run_with_reason_and_event(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, retry={"maxAttempts": 2, "backoffSeconds": 0}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        await cluster.fail("demo-i01-self-instruct-a1", "error: boom")
        await cluster.wait(lambda s: current_child(s) == "demo-i01-self-instruct-a2", "attempt 2")
        await cluster.fail("demo-i01-self-instruct-a2",
                           "error: stage self-instruct: no instruction accepted after 40 tries")
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed")
        assert st["lastFailure"]["stage"] == "self-instruct" and st["lastFailure"]["attempt"] == 2
        assert st["lastFailure"]["reason"] == "BackoffLimitExceeded"
        assert "no instruction accepted after 40 tries" in st["lastFailure"]["message"]
        ready = {c["type"]: c for c in st["conditions"]}["Ready"]
        assert ready["status"] == "False" and "self-instruct failed after 2 attempt(s)" in ready["message"]
        events = [e for e in await cluster.events() if e["reason"] == "RunFailed"]
        assert events and events[0]["type"] == "Warning" and "no instruction accepted" in events[0]["message"]
        for _ in range(40):  # the GPUs are given back
            if not await cluster.names("Deployment"):
                break
            await asyncio.sleep(0.05)
        assert await cluster.names("Deployment") == []


async def test_vllm_never_healthy_fails_serving_after_the_startup_timeout(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, inference={"startupTimeoutSeconds": 1},
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
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed", timeout=10)
        failure = st["lastFailure"]
        assert failure["reason"] == "StartupTimeout" and failure["stage"] == "serving"
        assert "CrashLoopBackOff" in failure["message"] and "Bfloat16 is only supported" in failure["message"]
        assert await cluster.names("Job") == []


async def test_suspend_and_resume(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        await cluster.play()
        await cluster.request("PATCH", f"{RUNS}/demo", {"spec": {"suspend": True}}, MERGE)
        st = await cluster.wait(lambda s: s.get("phase") == "Suspended", "Suspended")
        assert st["observedGeneration"] == 2
        job = await cluster.get("Job", "demo-i01-self-instruct-a1")
        assert job["spec"]["suspend"] is True
        assert (await cluster.get("Deployment", "demo-m00-vllm-a1"))["spec"]["replicas"] == 0
        await cluster.patch("Deployment", "demo-m00-vllm-a1", {"status": {"replicas": 0, "readyReplicas": 0}},
                            "status")
        await asyncio.sleep(0.5)
        assert await cluster.names("Job") == ["demo-i01-self-instruct-a1"]  # nothing new while suspended
        await cluster.request("PATCH", f"{RUNS}/demo", {"spec": {"suspend": False}}, MERGE)
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving again")
        assert (await cluster.get("Deployment", "demo-m00-vllm-a1"))["spec"]["replicas"] == 1
        await cluster.ready("demo-m00-vllm-a1")
        await cluster.wait(lambda s: s.get("phase") == "Generating", "Generating")
        for _ in range(40):
            if not (await cluster.get("Job", "demo-i01-self-instruct-a1"))["spec"]["suspend"]:
                break
            await asyncio.sleep(0.05)
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
        await cluster.request("DELETE", f"{RUNS}/demo")
        for _ in range(100):
            if await cluster.run() is None:
                break
            await asyncio.sleep(0.05)
        assert await cluster.run() is None
        for kind in ("Job", "Deployment", "Service", "ConfigMap"):
            assert await cluster.names(kind) == [], kind
        assert cluster.probe.deleted is (artifacts == "Delete")


async def test_invalid_spec_that_bypassed_admission_is_reported(cluster):
    async with operator(cluster):
        await cluster.apply("demo", {**spec(), "storage": {"uri": "file:///data"}})
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed")
        assert st["lastFailure"]["reason"] == "InvalidSpec" and "spec.storage.uri" in st["lastFailure"]["message"]
        assert await cluster.names("Job") == [] and await cluster.names("Deployment") == []
        assert [e["reason"] for e in await cluster.events()] == ["InvalidSpec"]
