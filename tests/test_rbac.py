"""The operator's RBAC rules (operator/deploy.py PERMISSIONS, the chart's only source) are exactly what it uses.

The operator (kopf + our client) runs a whole SelfLengthenRun against kmock made into an API server that enforces
the rules of one install mode for the operator's token: every request outside them is refused with 403, as the
real API server would. Each mode's run must succeed without a single refusal, and every (group, resource, verb)
the rules grant must have been used: the rules cover every call the operator makes, and nothing more.

The scenario walks each code path that makes a distinct call: serving, every stage, suspend and resume (of Jobs,
and of a queued run's Kueue Workloads), a configuration change, children that already exist (a create answered
409, adopted through a get), scale-down, finished Jobs deleted, and the deletion of the run (finalizer, children,
artifacts).
"""

from __future__ import annotations

import attrs
import kmock as kmock_lib
import pytest
import yaml

from kube_fixtures import (
    CHILD_PLURALS,
    NS,
    PATHS,
    RUNS_PATH,
    MemoryProbe,
    RealisticKubernetes,
    current_child,
    operator,
    prepared_cluster,
    spec,
)
from selflengthen.operator import deploy
from selflengthen.operator.probe import store_probe

TOKEN = "operator-service-account-token"


@attrs.define(kw_only=True)
class EnforcingKubernetes(RealisticKubernetes):
    """RealisticKubernetes that authorizes the operator's requests (its bearer token) by RBAC rules.

    Like an API server with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift's default): a
    write that sets an owner reference with blockOwnerDeletion: true needs `update` on the owner's `finalizers`
    subresource, else it is refused with 403 naming it.

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

    @staticmethod
    def owner_permissions(request) -> set[tuple[str, str, str]]:
        """What OwnerReferencesPermissionEnforcement checks for a create/update/patch: `update` on
        <owner plural>/finalizers for each owner reference that blocks the owner's deletion."""
        data = request.data
        if str(getattr(request.method, "value", request.method)).upper() not in ("POST", "PUT", "PATCH") or \
                not isinstance(data, dict):
            return set()
        needed = set()
        for ref in (data.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("blockOwnerDeletion"):
                group = ref["apiVersion"].rpartition("/")[0]
                plural = {"SelfLengthenRun": "selflengthenruns"}.get(ref["kind"])
                assert plural, f"an owner of an unexpected kind: {ref['kind']}"
                needed.add((group, f"{plural}/finalizers", "update"))
        return needed

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
            for needed in self.owner_permissions(request):
                if not self.allowed(needed, request.namespace):
                    self.denied.add(needed)
                    raise kmock_lib.KubernetesError(
                        status=403, reason="Forbidden",
                        message=f"{triple[1]} \"{request.name or ''}\" is forbidden: cannot set blockOwnerDeletion "
                                f"if an ownerReference refers to a resource you can't set finalizers on: "
                                f"{needed[2]} {needed[1]}.{needed[0]}")
                self.used.add(needed)
            plural = triple[1]
            if triple[2] == "create" and plural in self.conflict_once:
                self.conflict_once.discard(plural)
                await super()._handle(request)  # it exists now...
                self.conflicts.append(plural)
                raise kmock_lib.KubernetesError(status=409, reason="AlreadyExists",
                                                message=f"{plural} already exists")  # ...but the answer says 409
        return await super()._handle(request)


pytestmark = pytest.mark.kmock(cls=EnforcingKubernetes)


def store_probe_once(probe: MemoryProbe):
    """The operator's probe factory: the real path once (the run's credentials Secret, read with the operator's
    token), then the in-memory store stand-in the "pods" write their markers to."""
    calls = {"store": 0}

    async def probe_factory(kube, run):
        if not calls["store"]:
            await store_probe(kube, run)
        calls["store"] += 1
        return probe

    return probe_factory


def kopf_posts_events(settings) -> None:
    settings.posting.enabled = True  # as installed: kopf's own events (its warnings) are the operator's calls too


async def whole_run(k8s, monkeypatch, scope: str) -> MemoryProbe:
    """Every code path of the operator that makes a distinct API call, in one run; returns the store stand-in."""
    k8s.scope, k8s.namespaces, k8s.conflict_once = scope, {NS}, set(CHILD_PLURALS)
    # the test's own client (an administrator, no operator token): applies runs, plays the controllers and pods
    async with prepared_cluster(k8s, monkeypatch) as admin:
        # what the chart installs: the peering object of the mode
        if scope == "cluster":
            await admin.request("POST", "/apis/kopf.dev/v1/clusterkopfpeerings",
                                {"metadata": {"name": deploy.PEERING}})
        else:
            await admin.request("POST", PATHS["KopfPeering"], {"metadata": {"name": deploy.PEERING}})
        await admin.request("POST", PATHS["Secret"], {"metadata": {"name": "s3-credentials"}, "type": "Opaque",
                                                      "data": {"AWS_ACCESS_KEY_ID": "QUtJQUZBS0U=",
                                                               "AWS_SECRET_ACCESS_KEY": "ZmFrZQ=="}})
        run_spec = spec(iterations=1, evaluate={"enabled": True}, retention={"artifacts": "Delete", "jobs": "Delete"})
        await admin.apply("demo", run_spec)
        async with operator(admin, TOKEN, peering=deploy.PEERING, priority=100, probe=store_probe_once(admin.probe),
                            configure=kopf_posts_events, clusterwide=scope == "cluster"):
            def phase(*names):
                return lambda s: s.get("phase") in names

            await admin.wait(phase("Serving"), "Serving")
            await admin.play()  # the server is ready: the first stage's Job starts
            await admin.wait(phase("Generating"), "Generating")
            job = current_child(await admin.status())

            # suspend: the running Job is suspended and vLLM scaled to 0; resume undoes both
            await admin.patch_run({"spec": {"suspend": True}})
            await admin.wait(phase("Suspended"), "Suspended")
            assert (await admin.get("Job", job))["spec"]["suspend"] is True
            await admin.patch_run({"spec": {"suspend": False}})
            await admin.wait(phase("Generating", "Serving"), "resumed")

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
            await admin.request("DELETE", f"{RUNS_PATH}/demo")

            async def run_gone():
                return await admin.run() is None

            await admin.until(run_gone, "the run deleted")
            assert admin.probe.deleted and await admin.names("ConfigMap") == []

            # a run in a Kueue queue: suspend and resume (de)activate its Job's Workload (Kueue plays its part)
            await admin.apply("queued", spec(iterations=1, scheduling={"queueName": "gpus"}))
            await admin.wait(phase("Serving"), "Serving", name="queued")
            await admin.play("queued")
            await admin.kueue()
            await admin.patch_run({"spec": {"suspend": True}}, name="queued")
            await admin.wait(phase("Suspended"), "Suspended", name="queued")

            def workload_active(value):
                async def check():
                    return [w["spec"]["active"] for w in await admin.items("Workload")] == [value]
                return check

            await admin.until(workload_active(False), "the Workload deactivated", name="queued")
            await admin.patch_run({"spec": {"suspend": False}}, name="queued")
            await admin.wait(phase("Serving", "Generating"), "resumed", name="queued")
            await admin.ready("queued-m00-vllm-a1")
            await admin.until(workload_active(True), "the Workload activated", name="queued")
    assert sorted(k8s.conflicts) == sorted(CHILD_PLURALS), "every kind of child met an existing one once"
    return admin.probe


@pytest.mark.parametrize("scope", deploy.SCOPES)
async def test_rules_are_exactly_what_the_operator_uses(monkeypatch, kmock, scope):
    await whole_run(kmock, monkeypatch, scope)
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
    # update only where owner-reference enforcement asks for it (finalizers of the runs, never written)
    assert {(r, v) for _, r, v in deploy.all_granted("cluster") if v in ("update", "deletecollection", "*")} == {
        ("selflengthenruns/finalizers", "update")}
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
