"""The operator's RBAC rules (operator/deploy.py PERMISSIONS, the chart's only source) are exactly what it uses.

The operator (kopf + our client) runs a whole SelfLengthenRun against kmock made into an API server that enforces
the rules of one install mode for the operator's token: every request outside them is refused with 403, as the
real API server would. Each mode's run must succeed without a single refusal, and every (group, resource, verb)
the rules grant must have been used: the rules cover every call the operator makes, and nothing more.

The scenario walks each code path that makes a distinct call: serving, every stage, suspend and resume, a
configuration change, children that already exist (a create answered 409, adopted through a get), scale-down,
finished Jobs deleted, and the deletion of the run (finalizer, children, artifacts).
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import attrs
import kmock as kmock_lib
import kopf
import pytest
import yaml

from kube_fixtures import MANIFESTS, RealisticKubernetes, current_child, parse_path, spec
from selflengthen.operator import deploy
from selflengthen.operator.crd import crd
from selflengthen.operator.handlers import OperatorOptions, build_registry
from selflengthen.operator.probe import store_probe

NS = "ml"
TOKEN = "operator-service-account-token"
RUNS = f"/apis/selflengthen.io/v1alpha1/namespaces/{NS}/selflengthenruns"
PATHS = {
    "Job": f"/apis/batch/v1/namespaces/{NS}/jobs",
    "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments",
    "Service": f"/api/v1/namespaces/{NS}/services",
    "ConfigMap": f"/api/v1/namespaces/{NS}/configmaps",
    "Secret": f"/api/v1/namespaces/{NS}/secrets",
}
MERGE = {"Content-Type": "application/merge-patch+json"}
CHILDREN = ("configmaps", "services", "deployments", "jobs")


@attrs.define(kw_only=True)
class EnforcingKubernetes(RealisticKubernetes):
    """RealisticKubernetes that authorizes the operator's requests (its bearer token) by RBAC rules.

    Rules of the cluster scope apply everywhere (a ClusterRole bound cluster-wide); of the namespaced scope only in
    `namespaces` (a Role per namespace), so cluster-scoped and all-namespace requests are refused there. Requests
    without the token are the test's own (an administrator's). The operator's first create of each kind in
    `conflict_once` is carried out but answered 409, as when an earlier attempt's answer was lost.
    """

    scope: str = attrs.field(default="cluster", init=False)
    namespaces: set = attrs.field(factory=set, init=False)
    conflict_once: set = attrs.field(factory=set, init=False)
    used: set = attrs.field(factory=set, init=False)
    denied: set = attrs.field(factory=set, init=False)
    conflicts: list = attrs.field(factory=list, init=False)

    @staticmethod
    def classify(request) -> tuple[str, str, str] | None:
        res = request.resource
        if res is None or res.plural is None:
            return None  # discovery (/api, /apis/GROUP/VERSION): open to every authenticated client
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        if method == "GET":
            verb = "watch" if str(request.params.get("watch", "")).lower() in ("1", "true") else (
                "get" if request.name else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update",
                    "DELETE": "delete" if request.name else "deletecollection"}.get(method, method.lower())
        resource = res.plural + (f"/{request.subresource}" if request.subresource else "")
        return (res.group or "", resource, verb)

    def allowed(self, triple: tuple[str, str, str], namespace: str | None) -> bool:
        if self.scope == "cluster":
            return triple in deploy.granted("cluster")
        if namespace is None:  # cluster-scoped, or across all namespaces: the ClusterRole of cluster-scoped reads
            return triple in deploy.granted("namespaced", cluster_scoped=True)
        return namespace in self.namespaces and triple in deploy.granted("namespaced", cluster_scoped=False)

    async def _handle(self, request):
        triple = self.classify(request)
        if triple is not None and request.headers.get("Authorization") == f"Bearer {TOKEN}":
            if not self.allowed(triple, request.namespace):
                self.denied.add(triple)
                raise kmock_lib.KubernetesError(
                    status=403, reason="Forbidden",
                    message=f"{triple[2]} {triple[1]}.{triple[0] or 'core'} in {request.namespace or 'the cluster'}"
                            " is not allowed")
            self.used.add(triple)
            plural = triple[1]
            if triple[2] == "create" and plural in self.conflict_once:
                self.conflict_once.discard(plural)
                await super()._handle(request)  # it exists now...
                self.conflicts.append(plural)
                raise kmock_lib.KubernetesError(status=409, reason="AlreadyExists",
                                                message=f"{plural} already exists")  # ...but the answer says 409
        return await super()._handle(request)


pytestmark = pytest.mark.kmock(cls=EnforcingKubernetes)


class MemoryProbe:
    def __init__(self):
        self.markers: dict[tuple[int, str], dict] = {}
        self.deleted = False

    def done(self, iteration, stage):
        return (iteration, stage) in self.markers

    def manifest(self, iteration, stage):
        return self.markers.get((iteration, stage))

    def delete_run(self):
        self.deleted = True
        count = len(self.markers)
        self.markers.clear()
        return count


class Admin:
    """The test's own client (no operator token): applies runs and plays the cluster's controllers and pods."""

    def __init__(self, session: aiohttp.ClientSession, probe: MemoryProbe):
        self.http, self.probe = session, probe

    async def request(self, method: str, path: str, body=None, headers=None, missing_ok: bool = False):
        async with self.http.request(method, path, json=body, headers=headers) as rsp:
            data = await rsp.json(content_type=None)
            if missing_ok and rsp.status == 404:
                return None
            assert rsp.status < 400, (method, path, rsp.status, data)
            return data

    async def run(self) -> dict | None:
        return await self.request("GET", f"{RUNS}/demo", missing_ok=True)

    async def status(self) -> dict:
        return ((await self.run()) or {}).get("status") or {}

    async def names(self, kind: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in (await self.request("GET", PATHS[kind]))["items"])

    async def get(self, kind: str, name: str) -> dict:
        return await self.request("GET", f"{PATHS[kind]}/{name}")

    async def patch(self, kind: str, name: str, body: dict, sub: str | None = None) -> dict:
        return await self.request("PATCH", f"{PATHS[kind]}/{name}" + (f"/{sub}" if sub else ""), body, MERGE)

    async def patch_run(self, body: dict) -> dict:
        return await self.request("PATCH", f"{RUNS}/demo", body, MERGE)

    async def until(self, predicate, what: str, timeout: float = 30.0):
        """Poll until predicate() (async) is true; the timeout only bounds a failing test."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (result := await predicate()):
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {await self.status()}")
            await asyncio.sleep(0.05)
        return result

    async def play(self) -> None:
        """The cluster's next part for the run's current step, then wait until the operator moved on."""
        st = await self.status()
        phase, child = st.get("phase"), current_child(st)
        if phase == "Serving":
            n = (await self.get("Deployment", child))["spec"]["replicas"]
            await self.patch("Deployment", child, {"status": {"replicas": n, "readyReplicas": n,
                                                              "availableReplicas": n}}, "status")
        elif phase == "ScalingDown":
            for dep in await self.names("Deployment"):
                await self.patch("Deployment", dep, {"status": {"replicas": 0, "readyReplicas": 0}}, "status")
        elif phase in ("Generating", "Training", "Evaluating"):
            labels = (await self.get("Job", child))["metadata"]["labels"]
            key = (int(labels["selflengthen.io/iteration"]), labels["selflengthen.io/stage"])
            self.probe.markers[key] = MANIFESTS.get(key[1]) or {"stage": key[1]}
            await self.patch("Job", child, {"status": {"succeeded": 1, "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}}, "status")
        else:
            raise AssertionError(f"nothing to play in phase {phase}: {st}")

        async def moved():
            s = await self.status()
            return (s.get("phase"), current_child(s)) != (phase, child)

        await self.until(moved, f"progress after {phase} {child}")


def fast_settings(settings: kopf.OperatorSettings) -> None:
    settings.watching.reconnect_backoff = 0.1
    settings.queueing.idle_timeout = 1.0
    settings.queueing.exit_timeout = 1.0


@pytest.fixture
def _paths(monkeypatch):
    from kmock._internal import parsing

    monkeypatch.setattr(parsing, "parse_path", parse_path)


@contextlib.asynccontextmanager
async def operator(k8s, probe: MemoryProbe, scope: str):
    calls = {"store": 0}

    async def probe_factory(kube, run):
        if not calls["store"]:  # the real path once: the run's credentials Secret, read with the operator's token
            await store_probe(kube, run)
        calls["store"] += 1
        return probe

    options = OperatorOptions(
        poll_seconds=0.3, probe=probe_factory, configure=fast_settings,
        login=lambda **_: kopf.ConnectionInfo(server=str(k8s.url), token=TOKEN))
    registry, controller = build_registry(options)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=registry, clusterwide=scope == "cluster", namespaces=[] if scope == "cluster" else [NS],
        peering_name=deploy.PEERING, priority=100, stop_flag=stop, ready_flag=ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield controller
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def whole_run(k8s, scope: str) -> MemoryProbe:
    """Every code path of the operator that makes a distinct API call, in one run; returns the store stand-in."""
    k8s.resources.load_bundled()
    k8s.register_crd(crd())
    for peering in deploy.peering_crds():
        k8s.register_crd(peering)
    k8s.scope, k8s.namespaces, k8s.conflict_once = scope, {NS}, set(CHILDREN)
    probe = MemoryProbe()
    connector = aiohttp.TCPConnector(force_close=True)  # kopf cancels the server's handlers of kept-alive ones
    async with aiohttp.ClientSession(base_url=str(k8s.url), connector=connector) as session:
        admin = Admin(session, probe)
        await admin.request("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        # what the chart installs: the peering object of the mode
        if scope == "cluster":
            await admin.request("POST", "/apis/kopf.dev/v1/clusterkopfpeerings",
                                {"metadata": {"name": deploy.PEERING}})
        else:
            await admin.request("POST", f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings",
                                {"metadata": {"name": deploy.PEERING}})
        await admin.request("POST", PATHS["Secret"], {"metadata": {"name": "s3-credentials"}, "type": "Opaque",
                                                      "data": {"AWS_ACCESS_KEY_ID": "QUtJQUZBS0U=",
                                                               "AWS_SECRET_ACCESS_KEY": "ZmFrZQ=="}})
        run_spec = spec(iterations=1, evaluate={"enabled": True}, retention={"artifacts": "Delete", "jobs": "Delete"})
        await admin.request("POST", RUNS, {"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun",
                                           "metadata": {"name": "demo"}, "spec": run_spec})
        async with operator(k8s, probe, scope):
            async def phase(*names):
                return (await admin.status()).get("phase") in names

            await admin.until(lambda: phase("Serving"), "Serving")
            await admin.play()  # the server is ready: the first stage's Job starts
            await admin.until(lambda: phase("Generating"), "Generating")
            job = current_child(await admin.status())

            # suspend: the running Job is suspended and vLLM scaled to 0; resume undoes both
            await admin.patch_run({"spec": {"suspend": True}})
            await admin.until(lambda: phase("Suspended"), "Suspended")
            assert (await admin.get("Job", job))["spec"]["suspend"] is True
            await admin.patch_run({"spec": {"suspend": False}})
            await admin.until(lambda: phase("Generating", "Serving"), "resumed")

            async def job_resumed():
                return (await admin.get("Job", job))["spec"]["suspend"] is False

            await admin.until(job_resumed, "the Job resumed")

            # a tunable setting changes: the run's ConfigMap is patched
            before = (await admin.get("ConfigMap", "demo-config"))["metadata"]["annotations"]
            await admin.patch_run({"spec": {"client": {"concurrency": 7}}})

            async def config_patched():
                cm = await admin.get("ConfigMap", "demo-config")
                return cm["metadata"]["annotations"] != before and "concurrency: 7" in cm["data"]["config.yaml"]

            await admin.until(config_patched, "the ConfigMap patched")

            while (await admin.status()).get("phase") not in ("Succeeded", "Failed"):
                await admin.play()
            assert (await admin.status())["phase"] == "Succeeded"

            async def jobs_gone():  # retention.jobs: Delete
                return not await admin.names("Job") and not await admin.names("Deployment")

            await admin.until(jobs_gone, "finished Jobs deleted")

            # deletion: children removed, artifacts deleted (retention.artifacts: Delete), finalizer released
            await admin.request("DELETE", f"{RUNS}/demo")

            async def run_gone():
                return await admin.run() is None

            await admin.until(run_gone, "the run deleted")
            assert probe.deleted and await admin.names("ConfigMap") == []
    assert sorted(k8s.conflicts) == sorted(CHILDREN), "every kind of child met an existing one once"
    return probe


@pytest.mark.parametrize("scope", deploy.SCOPES)
async def test_rules_are_exactly_what_the_operator_uses(_paths, kmock, scope):
    await whole_run(kmock, scope)
    assert kmock.denied == set(), f"the operator needed more than its rules: {kmock.denied}"
    assert kmock.used == deploy.all_granted(scope), (
        f"granted but never used: {deploy.all_granted(scope) - kmock.used}")


def test_every_permission_says_why_and_each_scope_is_complete():
    for group, resource, verbs, where, why in deploy.PERMISSIONS:
        assert verbs and len(set(verbs)) == len(verbs) and why, (group, resource)
        assert where in ("both", *deploy.SCOPES)
    # the two modes differ only in the kind of peering object and kopf's observation of the served namespaces
    only_cluster = deploy.all_granted("cluster") - deploy.all_granted("namespaced")
    only_namespaced = deploy.all_granted("namespaced") - deploy.all_granted("cluster")
    assert {r for _, r, _ in only_cluster} == {"clusterkopfpeerings"}
    assert {r for _, r, _ in only_namespaced} == {"kopfpeerings", "namespaces"}
    # a Role holds namespaced resources only; the namespaced mode's ClusterRole reads only
    assert not {r for _, r, _ in deploy.granted("namespaced", cluster_scoped=False)} & deploy.CLUSTER_SCOPED
    assert {v for _, _, v in deploy.granted("namespaced", cluster_scoped=True)} == {"list", "watch"}
    assert not any(v in ("update", "deletecollection", "*") for _, _, v in deploy.all_granted("cluster"))
    with pytest.raises(ValueError, match="scope"):
        deploy.rules("everywhere")


def test_the_charts_rule_files_are_generated_from_the_permissions():
    for path, text in deploy.chart_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path}: run `python -m selflengthen.operator crd --write`"
    rbac = deploy.CHART_DIR / "rbac"
    assert yaml.safe_load((rbac / "cluster-rules.yaml").read_text()) == deploy.rules("cluster")
    assert yaml.safe_load((rbac / "namespaced-rules.yaml").read_text()) == deploy.rules("namespaced")
    assert yaml.safe_load((rbac / "namespaced-cluster-rules.yaml").read_text()) == deploy.rules(
        "namespaced", cluster_scoped=True)


def test_install_manifests_grant_the_namespaced_rules_only_in_the_served_namespaces():
    docs = deploy.manifests(image="ghcr.io/example/selflengthen:0.1.0", watch_namespaces=["ml", "nlp"])
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "ClusterRole"}
    assert roles == {"selflengthen-operator": deploy.rules("namespaced"),
                     "selflengthen-operator-observer": deploy.rules("namespaced", cluster_scoped=True)}
    bindings = {(b["kind"], b["metadata"].get("namespace"), b["roleRef"]["name"])
                for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")}
    assert bindings == {("RoleBinding", "ml", "selflengthen-operator"), ("RoleBinding", "nlp", "selflengthen-operator"),
                        ("ClusterRoleBinding", None, "selflengthen-operator-observer")}
    docs = deploy.manifests(image="ghcr.io/example/selflengthen:0.1.0")
    assert [d["rules"] for d in docs if d["kind"] == "ClusterRole"] == [deploy.rules("cluster")]
    assert [d["kind"] for d in docs].count("ClusterRoleBinding") == 1
