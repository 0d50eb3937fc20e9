"""The operator survives what clusters do to it (issue 8), proven against kmock made realistic (kube_fixtures):

- killed in the middle of creating a run's children, and right after each stage boundary it recorded, and with
  the API server's replies to its creates lost: after the restart no child exists twice, no attempt is repeated,
  and the run completes;
- a node vanishes under a multi-node (Indexed) training Job: the attempt fails, the failed Job and its headless
  Service are deleted (the GPUs of the surviving pods are released) and a new attempt starts; beyond the stage's
  limit the run is Failed with the Job's reason;
- two replicas at once, peered through a KopfPeering object as `selflengthen operator run --peering` does: only
  the higher-priority one acts; when it dies, the other takes over and finishes the run without repeating work.

A crash is a replica whose requests the API server refuses from that instant (nothing it still has in flight
lands) and whose task is then cancelled; every replica logs in with its own token, so the API server's log of
writes says who did what.
"""

from __future__ import annotations

import asyncio

import aiohttp
import kmock as kmock_lib
import pytest

from kube_fixtures import (
    CHILD_PLURALS,
    NS,
    PATHS,
    Cluster,
    RealisticKubernetes,
    Replica,
    current_child,
    operator,
    prepare_api,
    spec,
)

pytestmark = pytest.mark.kmock(cls=RealisticKubernetes)

ALL_STAGES = ("self-instruct", "respond", "extend", "build-sft", "train-generator", "train-extender", "evaluate")
PEERING = "selflengthen"


@pytest.fixture
async def cluster(_paths, kmock):
    await prepare_api(kmock)
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        yield Cluster(kmock, session)


def unavailable() -> kmock_lib.KubernetesError:
    return kmock_lib.KubernetesError(status=503, reason="ServiceUnavailable", message="connection lost")


async def drive(cluster: Cluster, replica: Replica, restart, timeout: float = 30.0) -> Replica:
    """Play the cluster's part until the run is finished; a crashed replica is replaced by `restart()`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (await cluster.status()).get("phase") not in ("Succeeded", "Failed"):
        assert asyncio.get_running_loop().time() < deadline, await cluster.status()
        if replica.crashed:
            await replica.wait_gone()
            if (await cluster.status()).get("phase") in ("Succeeded", "Failed"):
                break  # its last write (landed before it died) finished the run: no successor needed
            replica = await restart()
            continue
        await cluster.play_once()
        await asyncio.sleep(0.05)
    return replica


def assert_ran_once(cluster: Cluster, st: dict) -> None:
    """Every child of the 1-iteration run below made exactly once, every stage done in its first attempt."""
    assert st["phase"] == "Succeeded", st
    assert cluster.created("configmaps") == ["demo-config"]
    assert cluster.created("deployments") == ["demo-m00-vllm-a1", "demo-m01-vllm-a1"]
    assert cluster.created("services") == ["demo-m00-vllm", "demo-i01-train-generator-a1",
                                           "demo-i01-train-extender-a1", "demo-m01-vllm"]
    assert cluster.created("jobs") == [f"demo-i01-{stage}-a1" for stage in ALL_STAGES]
    stages = st["history"][0]["stages"]
    assert {s: (r["state"], r["attempts"]) for s, r in stages.items()} == {
        s: ("Succeeded", 1) for s in (*ALL_STAGES, "serving", "evaluate-serving")}
    assert not any(r.get("failures") for r in stages.values()) and "lastFailure" not in st


RUN_SPEC = spec(iterations=1, evaluate={"enabled": True}, training={"nodes": 2},
                retry={"maxAttempts": 2, "backoffSeconds": 0})


@pytest.mark.parametrize("fault", ["after-each-child-create", "after-each-stage-boundary", "create-reply-lost"])
async def test_operator_killed_while_creating_children_and_at_stage_boundaries(cluster, fault):
    """`after-each-child-create`: a replica dies right after each child it creates has landed (after the
    ConfigMap before the Service, after the Service before the Deployment, after the headless Service before the
    Indexed Job, after each Job before its status is written). `after-each-stage-boundary`: it dies right after
    each status write that moved the run to another phase or stage. `create-reply-lost`: no crash, but every
    create's reply is a 503 although the object was made."""
    replicas = [0]
    current: list[Replica] = []
    kills: list[str] = []
    lost: list[str] = []

    def inject(write):
        replica = current[-1] if current else None
        if replica is None or write.who != replica.token or replica.crashed:
            return
        if fault == "create-reply-lost":
            if write.action == "CREATE" and write.plural in CHILD_PLURALS:
                lost.append(write.name)
                raise unavailable()
            return
        if fault == "after-each-child-create":
            hit = write.action == "CREATE" and write.plural in CHILD_PLURALS
        else:
            patch = write.body.get("status") or {} if isinstance(write.body, dict) else {}
            hit = write.plural == "selflengthenruns" and write.subresource == "status" and (
                "phase" in patch or "stage" in patch)
        if hit:
            kills.append(f"{write.plural}/{write.name}")
            replica.crash_now()
            raise unavailable()  # the dying replica never sees the reply

    async def restart() -> Replica:
        replicas[0] += 1
        replica = await Replica(cluster, f"replica-{replicas[0]}").start()
        current.append(replica)
        return replica

    cluster.k8s.after_write = inject
    await cluster.apply("demo", RUN_SPEC)
    last = await drive(cluster, await restart(), restart)
    st = await cluster.wait(lambda s: s.get("phase") == "Succeeded", "Succeeded")
    await last.stop()

    assert_ran_once(cluster, st)
    children = len(cluster.created("configmaps") + cluster.created("deployments") + cluster.created("services")
                   + cluster.created("jobs"))
    if fault == "after-each-child-create":
        assert len(kills) == children == 14 and replicas[0] == 15
    elif fault == "after-each-stage-boundary":
        # Serving, Generating (3 stages), ScalingDown, Training (3 stages), Serving, Evaluating, Succeeded; the
        # replica that wrote Succeeded needs no successor
        assert len(kills) == 11 and replicas[0] == len(kills)
    else:
        assert len(lost) == children and replicas[0] == 1
    # events are posted before the status that records them: a crash loses none
    events = await cluster.events()
    succeeded = {e["message"].split(": ", 1)[1].removesuffix(" succeeded") for e in events
                 if e["reason"] == "StageSucceeded"}
    assert succeeded == set(ALL_STAGES)
    assert any(e["reason"] == "RunSucceeded" for e in events)


# -- a node disappears under a multi-node training Job -------------------------------------------------------------


async def start_pods(cluster: Cluster, job_name: str, nodes: int) -> list[str]:
    """What the Job controller and the scheduler do for an Indexed Job: one running pod per completion index."""
    job = await cluster.get("Job", job_name)
    names = []
    for index in range(nodes):
        name = f"{job_name}-{index}-x{index}k9p"
        labels = dict(job["spec"]["template"]["metadata"]["labels"], **{
            "batch.kubernetes.io/job-name": job_name, "batch.kubernetes.io/job-completion-index": str(index)})
        await cluster.request("POST", PATHS["Pod"], {"metadata": {
            "name": name, "labels": labels,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"nodeName": f"gpu-node-{index}", "containers": [{"name": "train", "image": "x"}]}})
        await cluster.patch("Pod", name, {"status": {"phase": "Running", "containerStatuses": [
            {"name": "train", "ready": True, "state": {"running": {"startedAt": "2026-11-25T12:00:00Z"}}}]}},
            "status")
        names.append(name)
    await cluster.patch("Job", job_name, {"status": {"active": nodes, "ready": nodes}}, "status")
    return names


async def lose_node(cluster: Cluster, job_name: str, pod: str, reason: str, message: str) -> None:
    """The node of `pod` is gone: its pods are deleted (pod garbage collection of a lost node), and the Job
    controller fails the Job (backoffLimit 0) while the surviving rank is still terminating (active 1)."""
    await cluster.request("DELETE", f"{PATHS['Pod']}/{pod}")
    await cluster.patch("Job", job_name, {"status": {"active": 1, "ready": 0, "failed": 1, "terminating": 1,
                                                     "conditions": [{"type": "FailureTarget", "status": "True",
                                                                     "reason": reason, "message": message}]}},
                        "status")


async def test_node_lost_under_a_multi_node_training_job_is_retried_then_fails_the_run(cluster):
    async with operator(cluster):
        await cluster.apply("demo", spec(iterations=1, training={"nodes": 2, "processesPerNode": 4},
                                         retry={"maxAttempts": 2, "backoffSeconds": 0}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        while (await cluster.status()).get("stage") != "train-generator":
            await cluster.play()
        a1, a2 = "demo-i01-train-generator-a1", "demo-i01-train-generator-a2"
        job = await cluster.get("Job", a1)
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
        assert job["spec"]["template"]["spec"]["subdomain"] == a1
        assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert (await cluster.get("Service", a1))["spec"]["clusterIP"] == "None"

        # attempt 1: gpu-node-1 vanishes; the Job fails as the controller fails it without a pod failure policy
        pods = await start_pods(cluster, a1, 2)
        await lose_node(cluster, a1, pods[1], "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        st = await cluster.wait(lambda s: current_child(s) == a2 and s.get("phase") == "Training", "attempt 2")
        rec = st["history"][0]["stages"]["train-generator"]
        assert rec["attempts"] == 2 and rec["state"] == "Running"
        failure = rec["failures"][0]
        assert failure["attempt"] == 1 and failure["reason"] == "BackoffLimitExceeded"
        assert "backoff limit" in failure["message"] and f"pod {pods[0]}: phase Running" in failure["message"]
        # the failed attempt is gone with its surviving pod (its GPUs are released); the new one has its own
        # rendezvous Service
        assert await cluster.get("Job", a1) is None and await cluster.get("Service", a1) is None
        assert await cluster.get("Job", a2) is not None
        assert (await cluster.get("Service", a2))["spec"]["clusterIP"] == "None"
        events = [e for e in await cluster.events() if e["reason"] == "StageFailed"]
        assert len(events) == 1 and "train-generator attempt 1/2 failed: BackoffLimitExceeded" in events[0]["message"]

        # attempt 2 loses a node too, now under a pod failure policy's FailJob rule: beyond the limit
        pods = await start_pods(cluster, a2, 2)
        await lose_node(cluster, a2, pods[0], "PodFailurePolicy",
                        f"Pod {NS}/{pods[0]} has condition DisruptionTarget matching FailJob rule at index 0")
        st = await cluster.wait(lambda s: s.get("phase") == "Failed", "Failed")
        last = st["lastFailure"]
        assert (last["stage"], last["attempt"], last["reason"]) == ("train-generator", 2, "PodFailurePolicy")
        assert "DisruptionTarget" in last["message"]
        ready = {c["type"]: c for c in st["conditions"]}["Ready"]
        assert ready["status"] == "False" and ready["reason"] == "PodFailurePolicy"
        assert "train-generator failed after 2 attempt(s): PodFailurePolicy" in ready["message"]
        assert st["history"][0]["stages"]["train-generator"]["state"] == "Failed"
        assert any(e["reason"] == "RunFailed" and "PodFailurePolicy" in e["message"] for e in await cluster.events())
        for _ in range(40):  # nothing of the run holds a GPU any more
            if not await cluster.names("Job") or (await cluster.get("Job", a2)) is None:
                break
            await asyncio.sleep(0.05)
        assert await cluster.get("Job", a2) is None and await cluster.get("Service", a2) is None
        assert await cluster.names("Deployment") == []
        assert [n for n in cluster.created("jobs") if "train-generator" in n] == [a1, a2]  # no third attempt


# -- two replicas at once --------------------------------------------------------------------------------------------


def short_peering(settings) -> None:
    settings.peering.lifetime = 3  # seconds a replica counts as alive after its last keep-alive


async def peers(cluster: Cluster) -> dict:
    obj = await cluster.get("KopfPeering", PEERING)
    return (obj or {}).get("status") or {}


async def wait_peers(cluster: Cluster, *tokens: str) -> None:
    for _ in range(200):
        if set(tokens) <= set(await peers(cluster)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"peers {tokens} never showed up: {await peers(cluster)}")


def acted(cluster: Cluster, who: str) -> list:
    """What a replica wrote besides its own keep-alives in the peering object."""
    return [w for w in cluster.k8s.log if w.who == who and w.plural != "kopfpeerings"]


async def test_two_replicas_only_the_higher_priority_one_acts_and_the_other_takes_over(cluster):
    await cluster.request("POST", PATHS["KopfPeering"], {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                                         "metadata": {"name": PEERING}})
    high = await Replica(cluster, "replica-high", peering=PEERING, priority=100, configure=short_peering).start()
    await wait_peers(cluster, "replica-high")
    low = await Replica(cluster, "replica-low", peering=PEERING, priority=10, configure=short_peering).start()
    await wait_peers(cluster, "replica-high", "replica-low")
    try:
        await cluster.apply("demo", spec(iterations=1, retry={"backoffSeconds": 0}))
        await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
        for _ in range(3):  # serving ready, self-instruct and respond done: only the high one acts
            await cluster.play()
        await cluster.wait(lambda s: s.get("stage") == "extend", "extend")
        assert {w.plural for w in acted(cluster, "replica-high")} >= {"selflengthenruns", "deployments", "jobs"}
        assert acted(cluster, "replica-low") == []
        assert any(w.who == "replica-low" for w in cluster.k8s.log)  # alive all along (its keep-alives)

        # the high one crashes: it cannot say goodbye, the low one waits out its lifetime and takes over
        await high.kill()
        crashed_at = len(cluster.k8s.log)
        last = await drive(cluster, low, restart=None)
        st = await cluster.status()
        assert st["phase"] == "Succeeded"
        taken_over = acted(cluster, "replica-low")
        assert taken_over and all(cluster.k8s.log.index(w) >= crashed_at for w in taken_over)
        assert {w.plural for w in taken_over} >= {"selflengthenruns", "jobs"}
        assert all(w.who != "replica-high" for w in cluster.k8s.log[crashed_at:])
        # nothing was done twice across the hand-over
        for plural in CHILD_PLURALS:
            assert len(cluster.created(plural)) == len(set(cluster.created(plural))), plural
        assert cluster.created("jobs") == [f"demo-i01-{s}-a1" for s in ALL_STAGES if s != "evaluate"]
        stages = st["history"][0]["stages"]
        assert all(r["attempts"] == 1 and not r.get("failures") for r in stages.values()), stages
        await last.stop()
    finally:
        if not high.crashed:
            await high.stop()
        if low.running:
            await low.stop()


def test_a_replica_started_later_gets_the_lower_peering_priority():
    """`selflengthen operator run` without --priority: a newer replica (a rolling update's, a second one) never
    preempts the acting one, which kopf would let it do while the old one still finishes its reconcile."""
    from selflengthen.operator.handlers import default_priority

    older, newer = default_priority(1_764_000_000.000), default_priority(1_764_000_000.002)
    assert older > newer
    assert len({default_priority(1_764_000_000.0) for _ in range(20)}) > 1  # same millisecond: still apart
