"""Everything to install the operator: the CRDs, RBAC, and its Deployment (`selflengthen operator manifests`)."""

from __future__ import annotations

from .crd import GROUP, PLURAL, crd

PEERING = "selflengthen"
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


def rules() -> list[dict]:
    return [
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "update"]},
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]},
        {"apiGroups": ["batch"], "resources": ["jobs"],
         "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
        {"apiGroups": ["apps"], "resources": ["deployments"],
         "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
        {"apiGroups": [""], "resources": ["services", "configmaps"],
         "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        # the S3 credentials of a run, to read its completion markers and manifests (never logged or copied)
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
         "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    ]


def manifests(*, image: str, namespace: str = "selflengthen-system", watch_namespaces: list[str] | None = None,
              replicas: int = 2) -> list[dict]:
    meta = {"namespace": namespace, "labels": LABELS}
    scope = [a for ns in (watch_namespaces or []) for a in ("--namespace", ns)] or ["--all-namespaces"]
    docs: list[dict] = [
        crd(),
        *peering_crds(),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": LABELS}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "selflengthen-operator", **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "selflengthen-operator", "labels": LABELS}, "rules": rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "selflengthen-operator", "labels": LABELS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "selflengthen-operator"},
         "subjects": [{"kind": "ServiceAccount", "name": "selflengthen-operator", "namespace": namespace}]},
        *([{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}]
          if not watch_namespaces else  # a namespaced operator peers in the namespaces it serves
          [{"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING, "namespace": ns}}
           for ns in watch_namespaces]),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "selflengthen-operator", **meta},
         "spec": {
             "replicas": replicas,
             "selector": {"matchLabels": LABELS},
             "template": {"metadata": {"labels": LABELS}, "spec": {
                 "serviceAccountName": "selflengthen-operator",
                 "containers": [{
                     "name": "operator",
                     "image": image,
                     "command": ["python", "-m", "selflengthen.operator", "run", *scope, "--peering", PEERING,
                                 "--liveness", "http://0.0.0.0:8080/healthz", "--log-format", "json"],
                     "ports": [{"name": "health", "containerPort": 8080}],
                     "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"},
                                       "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3},
                     "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                     "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                 }],
             }},
         }},
    ]
    return docs
