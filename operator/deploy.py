"""Everything to install the operator: the CRDs, RBAC, and its Deployment (`selflengthen operator manifests`).

The Helm chart takes its generated parts from here too (written by `selflengthen operator crd --write`, checked by
`--check` and the tests): kopf's peering CRDs in charts/selflengthen/crds/, and the RBAC rules of both install
modes in charts/selflengthen/rbac/, which the chart's Role/ClusterRole templates include verbatim.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .crd import GROUP, PLURAL, crd
from .crd_files import CHART_DIR

PEERING = "selflengthen"
UID = 10001  # the non-root user of the images (images/Dockerfile.*)
METRICS_PORT = 9090  # the operator's /metrics (the chart's metrics.port default)
LABELS = {"app.kubernetes.io/name": "selflengthen-operator", "app.kubernetes.io/part-of": "selflengthen"}


def peering_crds() -> list[dict]:
    """kopf's peering resources: replicas of the operator see each other there and only one acts."""
    out = []
    for kind, plural, scope in (("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
                                ("KopfPeering", "kopfpeerings", "Namespaced")):
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {
                "group": "kopf.dev",
                "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [{
                    "name": "v1", "served": True, "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                        "x-kubernetes-preserve-unknown-fields": True}},
                }],
            },
        })
    return out


# Every Kubernetes API call the operator makes, and nothing more: (API group, resource, verbs, mode, why).
# mode "both": granted in both install modes; "cluster": only to the cluster-wide operator (-A); "namespaced": only
# to one that serves some namespaces (-n NS ...). tests/test_rbac.py runs the operator against an API server that
# enforces exactly these rules, in both modes, and checks that each entry is used.
PERMISSIONS: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    # kopf watches the runs and patches their finalizer and progress annotations; the daemon reads each run
    (GROUP, PLURAL, ("get", "list", "watch", "patch"), "both", "runs: kopf's watch and finalizer, our reconcile"),
    (GROUP, f"{PLURAL}/status", ("patch",), "both", "the status the operator writes"),
    # never called: owner-reference enforcement (OpenShift; the OwnerReferencesPermissionEnforcement plugin) lets
    # only a client that may update the owner's finalizers set blockOwnerDeletion on the children it creates
    (GROUP, f"{PLURAL}/finalizers", ("update",), "both", "children owned with blockOwnerDeletion (OpenShift)"),
    ("batch", "jobs", ("get", "list", "watch", "create", "patch", "delete"), "both",
     "stage Jobs: watched (wake-ups), made, suspended/resumed, adopted after a conflict, deleted"),
    # with a Kueue queue, suspend and resume (de)activate the Kueue Workloads of the run's Jobs
    ("kueue.x-k8s.io", "workloads", ("list", "patch"), "both", "Kueue Workloads of queued Jobs: found, (de)activated"),
    ("apps", "deployments", ("get", "list", "watch", "create", "patch", "delete"), "both",
     "vLLM Deployments: watched, made, scaled, adopted, deleted"),
    ("", "services", ("get", "list", "create", "delete"), "both", "inference and rendezvous Services"),
    ("", "configmaps", ("get", "list", "create", "patch", "delete"), "both", "the run configuration"),
    ("", "pods", ("list", "watch"), "both", "why a stage failed (termination messages); wake-ups"),
    # the S3 credentials of a run, to read its completion markers and manifests (never logged or copied)
    ("", "secrets", ("get",), "both", "a run's S3 credentials Secret"),
    ("", "events", ("create",), "both", "Events of the runs (ours and kopf's)"),
    ("kopf.dev", "clusterkopfpeerings", ("list", "watch", "patch"), "cluster", "peering: one active replica"),
    ("kopf.dev", "kopfpeerings", ("list", "watch", "patch"), "namespaced", "peering: one active replica"),
    # kopf observes CRDs (new versions of ours) and, when it serves some namespaces only, the namespaces (they may
    # come and go). Forbidden, kopf retries for about a minute before it falls back, so a namespaced install gets
    # these cluster-scoped reads too (installing the CRD needs cluster rights anyway).
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"), "both", "kopf's CRD observation"),
    ("", "namespaces", ("list", "watch"), "namespaced", "kopf's observation of the served namespaces"),
)
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}
SCOPES = ("cluster", "namespaced")


def rules(scope: str = "cluster", *, cluster_scoped: bool | None = None) -> list[dict]:
    """RBAC rules of an install mode: scope "cluster", the ClusterRole of the cluster-wide operator; "namespaced",
    the Role in each namespace a namespaced operator serves (cluster_scoped=False, the default for it) and its
    ClusterRole of cluster-scoped reads (cluster_scoped=True)."""
    if scope not in SCOPES:
        raise ValueError(f"scope: one of {', '.join(SCOPES)} wanted, not {scope!r}")
    if cluster_scoped is None:
        cluster_scoped = False if scope == "namespaced" else None
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
            for group, resource, verbs, where, _ in PERMISSIONS if where in ("both", scope)
            and (cluster_scoped is None or (resource in CLUSTER_SCOPED) == cluster_scoped)]


def _triples(rule_list: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rule_list for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def granted(scope: str = "cluster", *, cluster_scoped: bool | None = None) -> set[tuple[str, str, str]]:
    """The (group, resource, verb) triples that rules(scope, cluster_scoped=...) allow."""
    return _triples(rules(scope, cluster_scoped=cluster_scoped))


def all_granted(scope: str) -> set[tuple[str, str, str]]:
    """Everything an install mode grants (both roles of the namespaced mode)."""
    if scope == "cluster":
        return granted("cluster")
    return granted("namespaced", cluster_scoped=False) | granted("namespaced", cluster_scoped=True)


def manifests(*, image: str, namespace: str = "selflengthen-system", watch_namespaces: list[str] | None = None,
              replicas: int = 2) -> list[dict]:
    meta = {"namespace": namespace, "labels": LABELS}
    scope = [a for ns in (watch_namespaces or []) for a in ("--namespace", ns)] or ["--all-namespaces"]
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "selflengthen-operator"}
    subjects = [{"kind": "ServiceAccount", "name": "selflengthen-operator", "namespace": namespace}]
    docs: list[dict] = [
        crd(),
        *peering_crds(),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": LABELS}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "selflengthen-operator", **meta}},
        # A namespaced operator: the namespaced rules, granted by a RoleBinding in each namespace it serves only,
        # and its cluster-scoped reads.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "selflengthen-operator", "labels": LABELS},
         "rules": rules("namespaced" if watch_namespaces else "cluster")},
        *([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "selflengthen-operator", "labels": LABELS}, "roleRef": role_ref, "subjects": subjects}]
          if not watch_namespaces else
          [*({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {"name": "selflengthen-operator", "namespace": ns, "labels": LABELS}, "roleRef": role_ref,
              "subjects": subjects} for ns in watch_namespaces),
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "selflengthen-operator-observer", "labels": LABELS},
            "rules": rules("namespaced", cluster_scoped=True)},
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "selflengthen-operator-observer", "labels": LABELS},
            "roleRef": {**role_ref, "name": "selflengthen-operator-observer"}, "subjects": subjects}]),
        *([{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}]
          if not watch_namespaces else  # a namespaced operator peers in the namespaces it serves
          [{"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING, "namespace": ns}}
           for ns in watch_namespaces]),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "selflengthen-operator", **meta},
         "spec": {
             "replicas": replicas,
             "selector": {"matchLabels": LABELS},
             # no Prometheus Operator assumed here: the common scrape annotations (the chart has a ServiceMonitor)
             "template": {"metadata": {"labels": LABELS, "annotations": {
                 "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                 "prometheus.io/path": "/metrics"}}, "spec": {
                 "serviceAccountName": "selflengthen-operator",
                 "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                     "seccompProfile": {"type": "RuntimeDefault"}},
                 "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                 "containers": [{
                     "name": "operator",
                     "image": image,
                     "command": ["python", "-m", "selflengthen.operator", "run", *scope, "--peering", PEERING,
                                 "--liveness", "http://0.0.0.0:8080/healthz", "--log-format", "json",
                                 "--metrics-port", str(METRICS_PORT), "--metrics-addr", "0.0.0.0"],  # noqa: S104
                     # kopf's identity in the peering: the pod's name
                     "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                     "ports": [{"name": "health", "containerPort": 8080},
                               {"name": "metrics", "containerPort": METRICS_PORT}],
                     "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"},
                                       "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3},
                     "readinessProbe": {"httpGet": {"path": "/healthz", "port": "health"},
                                        "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
                     # the root filesystem is read-only: a small writable /tmp (a mount, not a temp file)
                     "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
                     "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                     "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}},
                 }],
             }},
         }},
    ]
    return docs


GENERATED = ("# Generated from selflengthen/operator/deploy.py by\n"
             "#   python -m selflengthen.operator crd --write\n"
             "# Do not edit by hand: `selflengthen operator crd --check` and the tests fail when it differs.\n")


def chart_files(chart_dir: Path = CHART_DIR) -> dict[Path, str]:
    """The chart's generated files: kopf's peering CRDs and the RBAC rules of each scope."""
    dump = {"sort_keys": False, "width": 120}
    files = {chart_dir / "crds" / "kopfpeerings.yaml": GENERATED + yaml.safe_dump_all(peering_crds(), **dump)}
    for name, rule_list in (("cluster", rules("cluster")), ("namespaced", rules("namespaced")),
                            ("namespaced-cluster", rules("namespaced", cluster_scoped=True))):
        files[chart_dir / "rbac" / f"{name}-rules.yaml"] = GENERATED + yaml.safe_dump(rule_list, **dump)
    return files


def write_chart_files(chart_dir: Path = CHART_DIR) -> list[Path]:
    out = []
    for path, text in chart_files(chart_dir).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out


def stale_chart_files(chart_dir: Path = CHART_DIR) -> list[Path]:
    return [p for p, text in chart_files(chart_dir).items()
            if not p.exists() or p.read_text(encoding="utf-8") != text]
