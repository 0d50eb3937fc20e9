"""The Helm chart (charts/selflengthen), linted and rendered offline with the Helm v4 SDK (helm-python-sdk), in every
documented mode: RBAC scope namespaced/cluster x monitoring on/off x NetworkPolicy on/off, plus the defaults.

Every rendered manifest and every CRD of the chart passes kubernetes-validate in strict mode; the custom resources
it has no schema for (kopf's peering objects, the Prometheus Operator's) are checked against their CRD's schema or
structurally. What the chart says about the operator's children (pod labels, ports) is checked against the
manifests operator/resources.py really makes. Bad values fail at install by values.schema.json, naming the field.
Every example run manifest passes the CRD's schema and CEL rules.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kube_fixtures import make_run, spec
from selflengthen.operator import crd_files, deploy
from selflengthen.operator.cli import build_parser
from selflengthen.operator.resources import METRICS_PORT, serving_deployment, stage_job, training_job
from selflengthen.operator.spec import Inference, parse_spec
from selflengthen.operator.validation import validate

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "selflengthen"
K8S = "1.37.0"
RELEASE, NAMESPACE = "sl", "selflengthen-system"
FULLNAME = f"{RELEASE}-selflengthen"
S3_CIDR = "52.216.0.0/15"
NO_SCHEMA = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}


def combo_values(scope: str, monitoring: bool, netpol: bool) -> dict:
    values: dict = {"rbac": {"scope": scope, "namespaces": ["ml", "nlp"] if scope == "namespaced" else []}}
    if monitoring:
        values["monitoring"] = {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                                "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                "grafanaDashboard": {"enabled": True, "namespace": "grafana"}}
    if netpol:
        values["networkPolicy"] = {"enabled": True, "s3": {"cidrs": [S3_CIDR], "ports": [443]}}
    return values


COMBOS = {f"{scope}-monitoring_{'on' if m else 'off'}-netpol_{'on' if n else 'off'}": combo_values(scope, m, n)
          for scope, m, n in itertools.product(("namespaced", "cluster"), (True, False), (True, False))}
CASES = {"defaults": {}, **COMBOS}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    """Every case rendered once: its manifests as dicts (NOTES.txt under the key 'NOTES')."""
    out = {}
    for case, values in CASES.items():
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        docs = []
        for path, text in files.items():
            if path.endswith("NOTES.txt"):
                continue
            docs.extend(d for d in yaml.safe_load_all(text) if d)
        out[case] = docs
        out[f"{case}:NOTES"] = next(t for p, t in files.items() if p.endswith("NOTES.txt"))
    return out


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = of_kind(docs, kind)
    return doc


def operator_args(docs: list[dict]):
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["selflengthen", "operator", "run"]
    return build_parser().parse_args(["run", *container["args"]])


def label_match(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for expr in selector.get("matchExpressions") or []:
        value = labels.get(expr["key"])
        ok &= {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
               "Exists": value is not None, "DoesNotExist": value is None}[expr["operator"]]
    return ok


# -- the chart itself -------------------------------------------------------------------------------------------------


def test_chart_versions_follow_the_project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "selflengthen"
    assert meta["version"] == project and meta["appVersion"] == project


@pytest.mark.parametrize("case", list(CASES))
def test_chart_lints_clean(case):
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE, kube_version=f"v{K8S}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, (report["errors"], problems)


@pytest.mark.parametrize("case", list(CASES))
def test_every_rendered_manifest_is_valid(rendered, case):
    docs = rendered[case]
    assert docs
    peering_schemas = {c["spec"]["names"]["kind"]: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
                       for c in deploy.peering_crds()}
    for doc in docs:
        if doc["kind"] in peering_schemas:
            jsonschema.validate(doc, peering_schemas[doc["kind"]])
            assert doc["apiVersion"] == "kopf.dev/v1"
        elif doc["kind"] in NO_SCHEMA:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"] and doc["spec"]
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, doc["kind"]
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects of the same kind and name"


def test_chart_crds_are_the_generated_ones_and_valid(chart):
    # one source: the chart's CRD is the checked-in one byte for byte (tests/test_crd.py ties that to the models)
    assert crd_files.CHART_CRD_PATH.read_text() == crd_files.CRD_PATH.read_text()
    assert (CHART / "crds" / "kopfpeerings.yaml").read_text() == deploy.chart_files()[CHART / "crds" /
                                                                                      "kopfpeerings.yaml"]
    crds = [d for c in chart.crds for d in yaml.safe_load_all(c["data"]) if d]
    assert sorted(d["metadata"]["name"] for d in crds) == [
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", "selflengthenruns.selflengthen.io"]
    for doc in crds:
        kubernetes_validate.validate(doc, K8S, strict=True)


# -- the operator Deployment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_operator_deployment_is_locked_down_and_probed(rendered, case):
    pod = one(rendered[case], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == deploy.UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    args = operator_args(rendered[case])
    health = next(p for p in container["ports"] if p["name"] == "health")["containerPort"]
    assert args.liveness == f"http://0.0.0.0:{health}/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["serviceAccountName"] == FULLNAME
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_operator_scope_follows_the_rbac_scope(rendered):
    cluster = operator_args(rendered["cluster-monitoring_off-netpol_off"])
    assert cluster.all_namespaces and not cluster.namespace
    namespaced = operator_args(rendered["namespaced-monitoring_off-netpol_off"])
    assert namespaced.namespace == ["ml", "nlp"] and not namespaced.all_namespaces
    defaults = operator_args(rendered["defaults"])
    assert defaults.all_namespaces and defaults.peering == FULLNAME and defaults.metrics_port == 9090


def test_peering_objects_match_the_operator_and_the_scope(rendered):
    docs = rendered["cluster-monitoring_off-netpol_off"]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == operator_args(docs).peering
    assert not of_kind(docs, "KopfPeering")
    docs = rendered["namespaced-monitoring_off-netpol_off"]
    peerings = of_kind(docs, "KopfPeering")
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("ml", FULLNAME), ("nlp", FULLNAME)}
    assert not of_kind(docs, "ClusterKopfPeering")


def test_values_that_the_templates_refuse(chart):
    with pytest.raises(helm.HelmRenderError, match="operator.peering"):
        chart.render({"replicaCount": 2, "operator": {"peering": False}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match="metrics.enabled"):
        chart.render({"metrics": {"enabled": False}, "monitoring": {"serviceMonitor": {"enabled": True}}},
                     name=RELEASE, namespace=NAMESPACE)
    files = chart.render({"replicaCount": 1, "operator": {"peering": False}}, name=RELEASE, namespace=NAMESPACE)
    docs = [d for p, t in files.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    assert operator_args(docs).standalone and not of_kind(docs, "ClusterKopfPeering")


# -- RBAC: exactly operator/deploy.py rules() ------------------------------------------------------------------------


def test_cluster_rbac_is_the_operators_rules(rendered):
    docs = rendered["cluster-monitoring_off-netpol_off"]
    role = one(docs, "ClusterRole")
    assert role["rules"] == deploy.rules("cluster")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")


def test_namespaced_rbac_is_the_operators_rules_in_each_served_namespace(rendered):
    docs = rendered["namespaced-monitoring_off-netpol_off"]
    roles = of_kind(docs, "Role")
    assert {r["metadata"]["namespace"] for r in roles} == {"ml", "nlp"}
    assert all(r["rules"] == deploy.rules("namespaced") for r in roles)
    bindings = of_kind(docs, "RoleBinding")
    assert {(b["metadata"]["namespace"], b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings} == {
        ("ml", "Role", FULLNAME), ("nlp", "Role", FULLNAME)}
    observer = one(docs, "ClusterRole")
    assert observer["rules"] == deploy.rules("namespaced", cluster_scoped=True)
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == observer["metadata"]["name"]
    # the default namespace list is the release's own
    assert {r["metadata"]["namespace"] for r in of_kind(
        helm_docs({"rbac": {"scope": "namespaced"}}), "Role")} == {NAMESPACE}


def helm_docs(values: dict) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [d for p, t in files.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]


# -- monitoring -------------------------------------------------------------------------------------------------------


def test_monitoring_objects_only_when_asked(rendered):
    kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not kinds & {d["kind"] for d in rendered["defaults"]}
    assert not any(d["kind"] == "ConfigMap" for d in rendered["defaults"])
    assert kinds <= {d["kind"] for d in rendered["cluster-monitoring_on-netpol_off"]}


def test_service_monitor_scrapes_the_metrics_service(rendered):
    docs = rendered["cluster-monitoring_on-netpol_off"]
    service, monitor = one(docs, "Service"), one(docs, "ServiceMonitor")
    assert label_match(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    pod = one(docs, "Deployment")["spec"]["template"]
    assert label_match({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    metrics_port = next(p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics")
    assert metrics_port["containerPort"] == operator_args(docs).metrics_port == service["spec"]["ports"][0]["port"]


def test_pod_monitor_selects_the_runs_vllm_pods(rendered):
    run = make_run()
    vllm_pod = serving_deployment(run, 0, 1)["spec"]["template"]
    data_pod = stage_job(run, 1, "respond", 1, endpoint_url="http://x:8000/v1")["spec"]["template"]
    for case, namespaces in (("cluster-monitoring_on-netpol_off", None),
                             ("namespaced-monitoring_on-netpol_off", ["ml", "nlp"])):
        (monitor,) = [m for m in of_kind(rendered[case], "PodMonitor") if m["metadata"]["name"].endswith("-vllm")]
        assert "vllm" in monitor["metadata"]["name"]  # the SelfLengthenInferenceDown alert matches job=~".*vllm.*"
        assert label_match(monitor["spec"]["selector"], vllm_pod["metadata"]["labels"])
        assert not label_match(monitor["spec"]["selector"], data_pod["metadata"]["labels"])
        ports = {p["name"] for p in vllm_pod["spec"]["containers"][0]["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
        selector = monitor["spec"]["namespaceSelector"]
        assert selector == ({"any": True} if namespaces is None else {"matchNames": namespaces})


def test_pod_monitor_scrapes_the_runs_job_pods_on_their_metrics_port(rendered):
    run = make_run(spec(training={"nodes": 2, "processesPerNode": 8}))
    jobs = [stage_job(run, 1, "respond", 1, endpoint_url="http://x:8000/v1"), stage_job(run, 1, "build-sft", 1),
            stage_job(run, 1, "evaluate", 1, endpoint_url="http://x:8000/v1"),
            training_job(run, 1, "train-generator", 1)]
    vllm_pod = serving_deployment(run, 0, 1)["spec"]["template"]
    (monitor,) = [m for m in of_kind(rendered["cluster-monitoring_on-netpol_off"], "PodMonitor")
                  if m["metadata"]["name"].endswith("-jobs")]
    assert not label_match(monitor["spec"]["selector"], vllm_pod["metadata"]["labels"])
    for job in jobs:
        pod = job["spec"]["template"]
        assert label_match(monitor["spec"]["selector"], pod["metadata"]["labels"])
        container = pod["spec"]["containers"][0]
        port = next(p for p in container["ports"] if p["name"] == "metrics")
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
        assert port["containerPort"] == METRICS_PORT
        cmd = container["command"]
        assert cmd[cmd.index("--metrics-port") + 1] == str(METRICS_PORT)


def test_prometheus_rule_and_dashboard_are_the_generated_files(rendered):
    docs = rendered["cluster-monitoring_on-netpol_off"]
    rule_file = yaml.safe_load((CHART / "rules" / "selflengthen.rules.yaml").read_text())
    assert one(docs, "PrometheusRule")["spec"] == rule_file
    dashboard = one(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "grafana"
    assert json.loads(dashboard["data"]["selflengthen.json"]) == json.loads(
        (CHART / "dashboards" / "selflengthen.json").read_text())


# -- NetworkPolicy ----------------------------------------------------------------------------------------------------


def test_network_policy_confines_the_data_jobs(rendered):
    assert not of_kind(rendered["cluster-monitoring_off-netpol_off"], "NetworkPolicy")
    run = make_run(spec(evaluate={"enabled": True}))
    pods = {
        "data": stage_job(run, 1, "respond", 1, endpoint_url="http://x:8000/v1")["spec"]["template"],
        "build-sft": stage_job(run, 1, "build-sft", 1)["spec"]["template"],
        "evaluation": stage_job(run, 1, "evaluate", 1, endpoint_url="http://x:8000/v1")["spec"]["template"],
        "training": training_job(run, 1, "train-generator", 1)["spec"]["template"],
        "vllm": serving_deployment(run, 0, 1)["spec"]["template"],
    }
    for case, namespaces in (("cluster-monitoring_off-netpol_on", {NAMESPACE}),
                             ("namespaced-monitoring_off-netpol_on", {"ml", "nlp"})):
        policies = of_kind(rendered[case], "NetworkPolicy")
        assert {p["metadata"]["namespace"] for p in policies} == namespaces
        policy = policies[0]["spec"]
        selected = {name for name, pod in pods.items() if label_match(policy["podSelector"], pod["metadata"]["labels"])}
        assert selected == {"data", "build-sft", "evaluation"}
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        # nothing comes in but the metrics scrape, on the Jobs' metrics port only
        assert policy["ingress"] == [{"from": [{"namespaceSelector": {}}],
                                      "ports": [{"protocol": "TCP", "port": METRICS_PORT}]}]
        inference, dns, s3 = policy["egress"]
        (peer,) = inference["to"]
        assert set(peer) == {"podSelector"} and label_match(peer["podSelector"], pods["vllm"]["metadata"]["labels"])
        assert not label_match(peer["podSelector"], pods["training"]["metadata"]["labels"])
        vllm_port = pods["vllm"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        assert inference["ports"] == [{"protocol": "TCP", "port": vllm_port}] and vllm_port == Inference().port
        assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"} and {p["port"] for p in dns["ports"]} == {53}
        assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
        assert s3 == {"to": [{"ipBlock": {"cidr": S3_CIDR}}], "ports": [{"protocol": "TCP", "port": 443}]}


def test_network_policy_can_let_nothing_in():
    docs = helm_docs({"networkPolicy": {"enabled": True, "s3": {"cidrs": [S3_CIDR]}, "metricsFrom": []}})
    (policy,) = of_kind(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"] == []


def test_network_policy_extra_egress_and_namespaces():
    docs = helm_docs({"networkPolicy": {"enabled": True, "namespaces": ["a", "b"], "s3": {"cidrs": [S3_CIDR]},
                                        "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]}]}})
    policies = of_kind(docs, "NetworkPolicy")
    assert {p["metadata"]["namespace"] for p in policies} == {"a", "b"}
    assert policies[0]["spec"]["egress"][-1] == {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]}
    for policy in policies:
        kubernetes_validate.validate(policy, K8S, strict=True)


# -- values.schema.json: bad values fail at install, naming the field -----------------------------------------------

BAD_VALUES = [
    ({"rbac": {"scope": "everywhere"}}, "/rbac/scope"),
    ({"rbac": {"namespaces": ["Not_A_Namespace"]}}, "/rbac/namespaces/0"),
    ({"replicaCount": 0}, "/replicaCount"),
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"image": {"tag": "latest"}}, "/image/tag"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"imagePullSecrets": ["regcred"]}, "/imagePullSecrets/0"),
    ({"operator": {"logFormat": "xml"}}, "/operator/logFormat"),
    ({"operator": {"pollSeconds": 0}}, "/operator/pollSeconds"),
    ({"operator": {"healthPort": 80}}, "/operator/healthPort"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"monitoring": {"serviceMonitor": {"interval": "soon"}}}, "/monitoring/serviceMonitor/interval"),
    ({"monitoring": {"grafanaDashboard": {"enabeld": True}}}, "/monitoring/grafanaDashboard"),
    ({"networkPolicy": {"enabled": True}}, "/networkPolicy/s3/cidrs"),
    ({"networkPolicy": {"s3": {"cidrs": ["s3.amazonaws.com"]}}}, "/networkPolicy/s3/cidrs/0"),
    ({"networkPolicy": {"s3": {"ports": []}}}, "/networkPolicy/s3/ports"),
    ({"tolerations": [{"operator": "Maybe"}]}, "/tolerations/0/operator"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"serviceAccount": {"create": "yes"}}, "/serviceAccount/create"),
    ({"replicas": 2}, "replicas"),  # a typo of replicaCount: unknown keys are refused
]


@pytest.mark.parametrize(("values", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_bad_values_are_refused_naming_the_field(chart, values, field):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert field in str(err.value), str(err.value)
    with pytest.raises(helm.HelmValuesError):  # and install/render refuses them the same way
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("case", list(CASES))
def test_documented_values_pass_the_schema(chart, case):
    chart.validate_schema(CASES[case])


def test_values_yaml_passes_its_own_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_notes_tell_how_to_apply_a_first_run(rendered):
    notes = rendered["defaults:NOTES"]
    assert "kubectl -n selflengthen-system apply -f examples/" in notes and "s3-credentials" in notes
    assert "kubectl apply --server-side -f charts/selflengthen/crds/" in notes
    assert "-n ml apply" in rendered["namespaced-monitoring_off-netpol_off:NOTES"]
    mentioned = set(re.findall(r"examples/[\w.-]+\.yaml", notes))
    assert mentioned and all((ROOT / m).exists() for m in mentioned), mentioned


# -- examples ---------------------------------------------------------------------------------------------------------

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_manifest_is_valid(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kube_docs = [d for d in docs if "apiVersion" in d and "kind" in d]
    if not kube_docs:
        pytest.skip(f"{path.name} is a local runner configuration, not a Kubernetes manifest")
    for doc in kube_docs:
        if doc["kind"] == "SelfLengthenRun":
            assert validate(doc) == [], f"{path.name}: refused by the CRD's schema or CEL rules"
            parse_spec(doc["metadata"]["name"], doc["spec"])  # and by the operator's own checks
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)


def test_the_new_examples_exist_and_say_what_they_are():
    names = {p.name for p in EXAMPLES}
    assert {"qwen2-7b-lora-8xh100.yaml", "full-finetune-multinode.yaml", "tiny-cpu-kind.yaml",
            "s3-credentials-secret.yaml", "run.yaml"} <= names
    paper = yaml.safe_load((ROOT / "examples" / "qwen2-7b-lora-8xh100.yaml").read_text())["spec"]
    t = paper["training"]
    assert paper["models"]["base"] == "Qwen/Qwen2-7B-Instruct" and t["mode"] == "lora"
    assert (t["learningRate"], t["epochs"], t["scheduler"], t["warmupRatio"], t["batchSize"], t["cutoffTokens"]) == (
        1e-4, 4, "cosine", 0.1, 1, 16384)
    assert t["processesPerNode"] == 8 and paper["inference"]["tensorParallelSize"] * paper["inference"][
        "replicas"] == 8
    assert paper["selfInstruct"]["instructionsPerIteration"] == 5000 and paper["respond"][
        "samplesPerInstruction"] == 2
    multi = yaml.safe_load((ROOT / "examples" / "full-finetune-multinode.yaml").read_text())["spec"]
    assert multi["training"]["mode"] == "full" and multi["training"]["nodes"] > 1 and multi["iterations"] == 2
    # three servers a replica (Generator, Extender, base), each with tensorParallelSize GPUs, fit the two nodes
    assert 3 * multi["inference"]["replicas"] * multi["inference"]["tensorParallelSize"] <= 16
    tiny = yaml.safe_load((ROOT / "examples" / "tiny-cpu-kind.yaml").read_text())["spec"]
    assert tiny["inference"]["gpuResource"] == "cpu" and tiny["training"]["gpuResource"] == "cpu"
    secret = yaml.safe_load((ROOT / "examples" / "s3-credentials-secret.yaml").read_text())
    assert all("NOT-A-REAL" in v for v in secret["stringData"].values())
    # the example's keys are the ones the operator reads
    run = make_run(spec())
    assert set(secret["stringData"]) == {run.cluster.storage.access_key_id_key,
                                         run.cluster.storage.secret_access_key_key}
