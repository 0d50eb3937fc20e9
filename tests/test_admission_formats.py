"""Admission refuses what the API server or the kubelet would refuse later (issue 12, item 5): each bad value is
refused by the CRD (pattern or CEL, as the API server applies it: operator/validation.py), by the operator's spec
parsing (parse_spec) and by `selflengthen operator validate`, each naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from selflengthen.operator.spec import parse_spec
from selflengthen.operator.validation import validate
from selflengthen.pipeline.config import ConfigError

SPEC = {"image": "ghcr.io/example/selflengthen:0.1.0", "models": {"base": "Qwen/Qwen2-7B-Instruct"},
        "storage": {"uri": "s3://selflengthen-artifacts/runs"}}


def put(path: list, value) -> dict:
    out = copy.deepcopy(SPEC)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    return out


BAD = [
    ("nodeSelector key", ["scheduling", "nodeSelector"], {"gpu type": "h100"}, "scheduling.nodeSelector"),
    ("nodeSelector key prefix", ["scheduling", "nodeSelector"], {"Bad_Prefix/gpu": "h100"}, "scheduling.nodeSelector"),
    ("nodeSelector key name over 63", ["scheduling", "nodeSelector"], {"a" * 64: "x"}, "scheduling.nodeSelector"),
    ("nodeSelector value", ["scheduling", "nodeSelector"], {"gpu": "h100 80gb"}, "scheduling.nodeSelector"),
    ("Kueue queue name over 63 (a label value)", ["scheduling", "queueName"], "q" * 64, "scheduling.queueName"),
    ("quantity grammar", ["inference", "resources"], {"requests": {"memory": "1.2.3Gi"}},
     "inference.resources.requests"),
    ("negative quantity", ["training", "resources"], {"limits": {"cpu": "-2"}}, "training.resources.limits"),
    ("negative integer quantity", ["training", "resources"], {"limits": {"cpu": -2}}, "training.resources.limits"),
    ("quantity unit", ["inference", "shmSize"], "16GB", "inference.shmSize"),
    ("image reference", ["image"], "ghcr.io/Example/selflengthen:0.1.0", "image"),
    ("image with a space", ["inference", "image"], "vllm/vllm-openai: v0.32.0", "inference.image"),
    ("training image", ["training", "image"], "trainer:", "training.image"),
    ("toleration key", ["scheduling", "tolerations"], [{"key": "bad key", "operator": "Exists"}],
     "scheduling.tolerations"),
    ("toleration value", ["scheduling", "tolerations"], [{"key": "gpu", "value": "a b"}], "scheduling.tolerations"),
    ("tolerationSeconds without NoExecute", ["scheduling", "tolerations"],
     [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}],
     "scheduling.tolerations"),
    ("env var name", ["secretEnv"], [{"name": "1KEY", "secretKeyRef": {"name": "s", "key": "k"}}], "secretEnv"),
]


def cli_errors(tmp_path, spec: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun",
                                    "metadata": {"name": "demo"}, "spec": spec}))
    proc = subprocess.run([sys.executable, "-m", "selflengthen.operator", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("what,path,value,field", BAD, ids=[b[0] for b in BAD])
def test_admission_the_crd_and_the_operator_refuse_it_naming_the_field(what, path, value, field):
    spec = put(path, value)
    crd_errors = validate({"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun",
                           "metadata": {"name": "demo"}, "spec": spec})
    assert any(f"spec.{field}" in e for e in crd_errors), (what, crd_errors)
    with pytest.raises(ConfigError) as err:
        parse_spec("demo", spec)
    assert f"spec.{field}" in str(err.value), (what, str(err.value))


def test_operator_validate_names_the_fields(tmp_path):
    out = cli_errors(tmp_path, put(["scheduling"], {"nodeSelector": {"gpu type": "h100"}}))
    assert "spec.scheduling.nodeSelector" in out
    out = cli_errors(tmp_path, put(["scheduling"], {"queueName": "q" * 64, "tolerations": [{"key": "a b"}]}))
    assert "spec.scheduling.queueName" in out and "spec.scheduling.tolerations" in out


def test_good_values_pass():
    spec = put(["scheduling"], {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                                 "kubernetes.io/arch": "amd64"},
                                "queueName": "team-a", "tolerations": [
                                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                                     "tolerationSeconds": 300}]})
    spec["inference"] = {"image": "registry.example.com:5000/vllm/vllm-openai:v0.32.0@sha256:" + "a" * 64,
                         "resources": {"requests": {"cpu": "8", "memory": "64Gi", "rdma/ib": 1}}, "shmSize": "1e9"}
    manifest = {"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun", "metadata": {"name": "demo"},
                "spec": spec}
    assert validate(manifest) == []
    parse_spec("demo", spec)
