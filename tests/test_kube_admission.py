"""The test API's admission of built-in children (kube_admission.child_errors) and the Kubernetes value formats it
shares with the operator (operator/k8sformat.py): what the operator creates passes; what kube-apiserver refuses
is refused, each with the field."""

from __future__ import annotations

import copy

import pytest
from kube_admission import child_errors

from kube_fixtures import make_run, spec
from selflengthen.operator import k8sformat as fmt
from selflengthen.operator.resources import (
    config_map,
    serving_deployment,
    serving_service,
    stage_job,
    training_job,
    training_service,
)


def children():
    run = make_run(spec(training={"nodes": 2, "processesPerNode": 2}, scheduling={
        "nodeSelector": {"nvidia.com/gpu.product": "H100"}, "queueName": "team-a",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}))
    return {
        "ConfigMap": config_map(run),
        "Service": serving_service(run, 0),
        "Deployment": serving_deployment(run, 0, 1),
        # adapters fetched, the compile cache seeded and published by a native sidecar
        "CachedDeployment": serving_deployment(make_run(spec(inference={"modelCacheClaim": "hf-cache"})), 1, 1),
        "Job": stage_job(run, 1, "respond", 1, endpoint_url="http://demo-m00-vllm.ml.svc:8000/v1"),
        "TrainingJob": training_job(run, 1, "train-generator", 1),
        "TrainingService": training_service(run, 1, "train-generator", 1),
    }


def test_everything_the_operator_creates_is_accepted():
    for kind, obj in children().items():
        assert child_errors(obj) == [], kind


def _pod(obj):
    return obj["spec"]["template"]["spec"]


BAD = [
    ("unknown field (strict schema)", "Job", lambda o: o["spec"].update(backofLimit=3), "spec"),
    ("wrong type", "Deployment", lambda o: o["spec"].update(replicas="1"), "spec.replicas"),
    ("name too long for a Job", "Job", lambda o: o["metadata"].update(name="j" * 64), "metadata.name"),
    ("name over 253", "ConfigMap", lambda o: o["metadata"].update(name="c" * 254), "metadata.name"),
    ("Service name not a DNS-1035 label", "Service", lambda o: o["metadata"].update(name="1vllm"), "metadata.name"),
    ("label key", "Deployment", lambda o: o["metadata"]["labels"].update({"bad key": "x"}), "metadata.labels"),
    ("label value over 63", "Job", lambda o: o["metadata"]["labels"].update(
        {"kueue.x-k8s.io/queue-name": "q" * 64}), "metadata.labels"),
    ("label value characters", "Job", lambda o: o["spec"]["template"]["metadata"]["labels"].update(
        {"a": "-x"}), "spec.template.metadata.labels"),
    ("nodeSelector key", "Deployment", lambda o: _pod(o).update(nodeSelector={"gpu type": "h100"}),
     "spec.template.spec.nodeSelector"),
    ("nodeSelector value", "Job", lambda o: _pod(o).update(nodeSelector={"gpu": "h100 80gb"}),
     "spec.template.spec.nodeSelector"),
    ("quantity grammar", "Deployment", lambda o: _pod(o)["containers"][0]["resources"].setdefault(
        "requests", {}).update(memory="1.2.3Gi"), "spec.template.spec.containers[0].resources.requests[memory]"),
    ("negative quantity", "Job", lambda o: _pod(o)["containers"][0].setdefault("resources", {}).setdefault(
        "requests", {}).update(cpu="-1"), "spec.template.spec.containers[0].resources.requests[cpu]"),
    ("request above limit", "Job", lambda o: _pod(o)["containers"][0].update(
        resources={"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}),
     "spec.template.spec.containers[0].resources.requests[cpu]"),
    ("fractional GPU", "Deployment", lambda o: _pod(o)["containers"][0]["resources"].update(
        limits={"nvidia.com/gpu": "0.5"}, requests={"nvidia.com/gpu": "0.5"}),
     "spec.template.spec.containers[0].resources[nvidia.com/gpu]"),
    ("emptyDir size", "Deployment", lambda o: [v["emptyDir"].update(sizeLimit="lots") for v in _pod(o)["volumes"]
                                               if "sizeLimit" in v.get("emptyDir", {})],
     "spec.template.spec.volumes"),
    ("env var name", "Job", lambda o: _pod(o)["containers"][0]["env"].append({"name": "1X", "value": "v"}),
     "spec.template.spec.containers[0].env"),
    ("toleration", "Job", lambda o: _pod(o).update(tolerations=[{"operator": "Equal", "value": "x"}]),
     "spec.template.spec.tolerations[0].operator"),
    ("selector not matching the template", "Deployment", lambda o: o["spec"]["selector"]["matchLabels"].update(
        {"selflengthen.io/model": "9"}), "spec.template.metadata.labels"),
    ("mount of a missing volume", "Job", lambda o: _pod(o)["containers"][0]["volumeMounts"].append(
        {"name": "nowhere", "mountPath": "/x"}), "spec.template.spec.containers[0].volumeMounts"),
    ("config key", "ConfigMap", lambda o: o["data"].update({"a b": "c"}), "data[a b]"),
    ("init container restartPolicy other than Always", "CachedDeployment", lambda o: _pod(o)["initContainers"][-1]
     .update(restartPolicy="OnFailure"), "spec.template.spec.initContainers[2].restartPolicy"),
    ("restartPolicy on a regular container", "Deployment", lambda o: _pod(o)["containers"][0].update(
        restartPolicy="Always"), "spec.template.spec.containers[0].restartPolicy"),
    ("probe on an init container that is no sidecar", "CachedDeployment", lambda o: _pod(o)["initContainers"][0]
     .update(readinessProbe={"httpGet": {"path": "/", "port": 80}}), "spec.template.spec.initContainers[0]"),
    ("Service port name twice", "Service", lambda o: o["spec"]["ports"].append(
        {**o["spec"]["ports"][0], "port": 8001}), "spec.ports[1].name"),
    ("Service port number twice", "Service", lambda o: o["spec"]["ports"].append(
        {**o["spec"]["ports"][0], "name": "other"}), "spec.ports[1]"),
]


@pytest.mark.parametrize("what,kind,mutate,field", BAD, ids=[b[0] for b in BAD])
def test_what_the_api_server_refuses_is_refused_naming_the_field(what, kind, mutate, field):
    obj = copy.deepcopy(children()[kind])
    mutate(obj)
    errors = child_errors(obj)
    assert errors, f"{what}: accepted"
    assert any(f.startswith(field) for f, _ in errors), errors


@pytest.mark.parametrize("value,ok", [
    ("1", True), ("1.5Gi", True), (".5", True), ("1.", True), ("100m", True), ("1e3", True), ("1E", True),
    ("2Ei", True), (4, True), ("+1", True), ("1.2.3", False), (".", False), ("", False), ("1GB", False),
    ("1 Gi", False), ("-1", False), ("ten", False), (True, False),
])
def test_quantity_grammar(value, ok):
    assert (fmt.quantity(value) == []) is ok


@pytest.mark.parametrize("value,ok", [
    ("ghcr.io/example/selflengthen:0.1.0", True), ("vllm/vllm-openai:v0.32.0", True), ("busybox", True),
    ("localhost:5000/a/b@sha256:" + "a" * 64, True), ("registry.example.com:443/team/img:1.0-rc.1", True),
    ("team/Image", False), ("img:tag with space", False), (" img", False), ("img:", False), ("", False),
    ("img@sha256:short", False),
])
def test_image_references(value, ok):
    assert (fmt.image_reference(value) == []) is ok


@pytest.mark.parametrize("key,ok", [
    ("kubernetes.io/hostname", True), ("nvidia.com/gpu.product", True), ("gpu", True), ("a_b.c-d", True),
    ("bad key", False), ("/name", False), ("prefix/", False), ("Prefix.io/x", False), ("x" * 64, False),
    ("-x", False),
])
def test_label_keys(key, ok):
    assert (fmt.qualified_name(key) == []) is ok
