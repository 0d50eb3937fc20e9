"""The SelfLengthenRun CRD: generated from the models, structural, accepted by the official schemas, and refusing
every bad manifest with a clear message (OpenAPI schema via jsonschema, CEL rules via cel-python)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from selflengthen.operator import crd as crd_mod
from selflengthen.operator import crd_files, openapi
from selflengthen.operator.deploy import manifests
from selflengthen.operator.spec import EXCLUDED_CONFIG_FIELDS, MAX_RUN_NAME, parse_spec, split_spec
from selflengthen.operator.validation import admit, root_schema, validate
from selflengthen.pipeline.config import ConfigError, RunConfig

K8S = "1.37.0"
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "run.yaml"


def manifest(spec: dict | None = None, name: str = "demo") -> dict:
    return {
        "apiVersion": "selflengthen.io/v1alpha1",
        "kind": "SelfLengthenRun",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": spec if spec is not None else minimal_spec(),
    }


def minimal_spec() -> dict:
    return {"image": "ghcr.io/example/selflengthen:0.1.0", "models": {"base": "Qwen/Qwen2-7B-Instruct"},
            "storage": {"uri": "s3://selflengthen-artifacts/runs"}}


def with_path(spec: dict, path: list, value) -> dict:
    out = copy.deepcopy(spec)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


# -- generation -------------------------------------------------------------------------------------------------


def test_checked_in_crd_is_the_generated_one():
    assert crd_files.CRD_PATH.read_text(encoding="utf-8") == crd_files.render(), (
        "crds/selflengthenrun.yaml differs from the models: run `python -m selflengthen.operator crd --write`")


def test_crd_identity_and_printer_columns():
    doc = yaml.safe_load(crd_files.CRD_PATH.read_text())
    assert doc["metadata"]["name"] == "selflengthenruns.selflengthen.io"
    spec = doc["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "SelfLengthenRun" and spec["names"]["shortNames"] == ["slr"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Iteration"] == ".status.progress"
    assert columns["Stage"] == ".status.stage"
    assert columns["Avg Words"] == ".status.averageWords"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_every_run_configuration_field_is_in_the_spec():
    props = root_schema()["properties"]["spec"]["properties"]
    excluded = {f.split(".")[0] for f in EXCLUDED_CONFIG_FIELDS if "." not in f}
    for name, field in RunConfig.model_fields.items():
        if name not in excluded:
            assert (field.alias or name) in props


def test_kubernetes_validate_accepts_the_crd_and_install_manifests():
    assert kubernetes_validate.validate(crd_mod.crd(), K8S, strict=True)
    for doc in manifests(image="ghcr.io/example/selflengthen:0.1.0"):
        if doc["kind"] in ("ClusterKopfPeering", "KopfPeering"):
            continue  # custom resources: no official schema
        kubernetes_validate.validate(doc, K8S, strict=True)


def _walk(node: dict, path: str):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """The API server refuses non-structural schemas: every node typed (or int-or-string / preserve-unknown),
    no properties beside additionalProperties, no types inside anyOf, no $ref, defaults that fit."""
    import jsonschema

    for path, node in _walk(root_schema(), "<root>"):
        typed = "type" in node or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields")
        assert typed, f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "$ref" not in node and "allOf" not in node and "oneOf" not in node, path
        for variant in node.get("anyOf", []):
            assert set(variant) <= {"type"} and node.get("x-kubernetes-int-or-string"), path
        assert set(node) <= {
            "type", "description", "properties", "items", "additionalProperties", "required", "default", "enum",
            "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
            "minItems", "maxItems", "minProperties", "maxProperties", "format", "nullable", "anyOf",
            "x-kubernetes-int-or-string",
            "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations", "x-kubernetes-list-type",
            "x-kubernetes-list-map-keys"}, f"{path}: {sorted(node)}"
        if "default" in node and node.get("type") != "object":
            errors = list(jsonschema.Draft4Validator(
                {k: v for k, v in node.items() if not k.startswith("x-") and k != "default"}
            ).iter_errors(node["default"]))
            assert not errors, f"{path}: default {node['default']!r} does not fit: {errors[0].message}"


def test_cluster_defaults_equal_the_pipeline_defaults():
    """What the API server fills in is what the pipeline would have used: one source of defaults."""
    obj, errors = admit(manifest())
    assert errors == []
    config_part, _ = split_spec(obj["spec"])
    expected = RunConfig.model_validate({**config_part, "name": "demo"}).model_dump(mode="json", by_alias=True)

    def check(actual: dict, wanted: dict, path: str) -> None:
        for key, value in actual.items():
            if isinstance(value, dict) and isinstance(wanted.get(key), dict):
                check(value, wanted[key], f"{path}.{key}")
            elif isinstance(value, list) and value == [wanted.get(key)]:
                continue  # a name or a list of names: on the cluster one name is a one-item list (targetModules)
            else:
                assert wanted.get(key) == value, f"{path}.{key}: CRD default {value!r}, pipeline {wanted.get(key)!r}"

    check(config_part, expected, "spec")
    for section in ("sampling", "selfInstruct", "respond", "extend", "filters", "client", "training", "evaluate"):
        assert section in obj["spec"], f"spec.{section} not defaulted"
    assert obj["spec"]["inference"]["startupTimeoutSeconds"] == 1800
    assert obj["spec"]["retry"]["maxAttempts"] == 3


def test_example_manifest_is_admitted_and_parses():
    doc = yaml.safe_load(EXAMPLE.read_text())
    obj, errors = admit(doc)
    assert errors == []
    config, cluster = parse_spec(doc["metadata"]["name"], obj["spec"])
    assert config.models.base == "Qwen/Qwen2-7B-Instruct"
    assert config.name == "qwen2-7b"
    assert cluster.inference.tensor_parallel_size == 2


# -- bad manifests: every constraint of the schema ------------------------------------------------------------------


def _bad_string(pattern: str) -> str:
    for candidate in ("!!", "UPPER CASE", "-x-", "a b", "://"):
        if not re.search(pattern, candidate):
            return candidate
    raise AssertionError(f"no counterexample for {pattern}")


def _violations():
    """(id, spec path, bad value, what the message says) for each bound, enum, pattern, length of the spec."""
    spec_schema = root_schema()["properties"]["spec"]

    def leaf_cases(node: dict):
        t = node.get("type")
        if "minimum" in node:
            m = node["minimum"]
            yield "minimum", (m if node.get("exclusiveMinimum") else (m - 1 if t == "integer" else m - 0.5))
        if "maximum" in node:
            m = node["maximum"]
            yield "maximum", (m if node.get("exclusiveMaximum") else (m + 1 if t == "integer" else m + 0.5))
        if "enum" in node:
            yield "enum", "not-a-choice" if t == "string" else 987654
        if "pattern" in node:
            yield "pattern", _bad_string(node["pattern"])
        if node.get("minLength"):
            yield "minLength", ""
        if "maxLength" in node and node["maxLength"] <= 4096:
            yield "maxLength", "a" * (node["maxLength"] + 1)
        if t == "array" and isinstance(node.get("items"), dict) and node["items"].get("type") != "object":
            item = node["items"].get("enum", ["a"])[0]
            if node.get("minItems"):
                yield "minItems", []
            if "maxItems" in node:
                yield "maxItems", [f"{item}{i}" if "enum" not in node["items"] else item
                                   for i in range(node["maxItems"] + 1)]

    def walk(node: dict, path: list):
        for kind, value in leaf_cases(node):
            yield kind, path, value
        for name, sub in (node.get("properties") or {}).items():
            yield from walk(sub, [*path, name])
        if node.get("type") == "array" and isinstance(node.get("items"), dict) and node["items"].get(
                "type") != "object":
            for kind, value in leaf_cases(node["items"]):
                if kind not in ("minItems", "maxItems"):
                    yield kind, [*path, "[0]"], value
        if isinstance(node.get("additionalProperties"), dict):
            for kind, value in leaf_cases(node["additionalProperties"]):
                yield kind, [*path, "{k}"], value

    for kind, path, value in walk(spec_schema, []):
        yield pytest.param(path, value, kind, id=f"{'.'.join(path)}-{kind}")


def _set(spec: dict, path: list, value) -> dict:
    out = copy.deepcopy(spec)
    node = out
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if key == "[0]":
            raise AssertionError("handled by the parent")
        nxt = path[i + 1] if not last else None
        if last:
            node[key] = value
        elif nxt == "[0]":
            node[key] = [value]
            return out
        elif nxt == "{k}":
            node[key] = {"k": value}
            return out
        else:
            node = node.setdefault(key, {})
    return out


# CRD-only limits the pipeline's own model does not have (the cluster is stricter, never looser).
CRD_ONLY = {("storage", "uri", "maxLength")}


@pytest.mark.parametrize("path,value,kind", list(_violations()))
def test_schema_constraint_refuses_bad_value(path, value, kind):
    spec = _set(minimal_spec(), path, value)
    errors = validate(manifest(spec))
    field = "spec." + ".".join(p for p in path if p not in ("[0]", "{k}"))
    assert errors, f"{field} = {value!r} was admitted"
    assert any(e.startswith(field) for e in errors), errors
    if (*[p for p in path if p not in ("[0]", "{k}")], kind) not in CRD_ONLY:
        with pytest.raises(ConfigError):  # the operator's own check agrees with the CRD
            parse_spec("demo", spec)


@pytest.mark.parametrize("missing,field", [
    (["image"], "spec.image"), (["storage"], "spec.storage"), (["models"], "spec.models"),
    (["models", "base"], "spec.models.base"), (["storage", "uri"], "spec.storage.uri"),
])
def test_required_fields(missing, field):
    spec = minimal_spec()
    node = spec
    for key in missing[:-1]:
        node = node[key]
    del node[missing[-1]]
    assert f"{field}: Required value" in validate(manifest(spec))


def test_unknown_fields_are_refused_like_strict_field_validation():
    errors = validate(manifest({**minimal_spec(), "iteratons": 3, "inference": {"replica": 2}}))
    assert "spec.iteratons: unknown field" in errors
    assert "spec.inference.replica: unknown field" in errors
    for key in ("name", "local"):
        assert f"spec.{key}: unknown field" in validate(manifest({**minimal_spec(), key: {}}))
    assert "spec.models.endpoint: unknown field" in validate(
        manifest(with_path(minimal_spec(), ["models", "endpoint"], "http://x:8000/v1")))


def test_type_errors_and_set_lists():
    assert any("spec.iterations: Invalid value" in e for e in validate(manifest({**minimal_spec(), "iterations": "3"})))
    assert any(e.startswith("spec.languages: Invalid value") and "non-unique" in e
               for e in validate(manifest({**minimal_spec(), "languages": ["en", "en"]})))


# -- bad manifests: every CEL rule -----------------------------------------------------------------------------------

S = minimal_spec


CEL_CASES = [
    # (case id, spec, old spec or None, metadata.name, expected error)
    ("storage-file", with_path(S(), ["storage", "uri"], "file:///data/runs"), None, "demo",
     "spec.storage.uri: Invalid value: must be s3://BUCKET[/PREFIX]: pods share no disk"),
    ("storage-bucket", with_path(S(), ["storage", "uri"], "s3://A_b/runs"), None, "demo",
     "spec.storage.uri: Invalid value: must be s3://BUCKET[/PREFIX] with a valid bucket name"),
    ("storage-dotdot", with_path(S(), ["storage", "uri"], "s3://bucket/a/../b"), None, "demo",
     "spec.storage.uri: Invalid value: must not contain '..' segments"),
    ("tiny-model", with_path(S(), ["models", "base"], "tiny://qwen2"), None, "demo",
     "spec.models.base: Invalid value: tiny://, smollm2:// and gguf:// models exist on a laptop only"),
    ("packaged-model", with_path(S(), ["models", "base"], "smollm2://135m-instruct"), None, "demo",
     "spec.models.base: Invalid value: tiny://, smollm2:// and gguf:// models exist on a laptop only"),
    ("gguf-model", with_path(S(), ["models", "base"], "gguf:///models/m.gguf"), None, "demo",
     "spec.models.base: Invalid value: tiny://, smollm2:// and gguf:// models exist on a laptop only"),
    ("words", with_path(S(), ["selfInstruct"], {"minWords": 10, "maxWords": 11}), None, "demo",
     "spec.selfInstruct.minWords: Invalid value: minWords must be at least 2 below maxWords"),
    ("full-port", with_path({**S(), "iterations": 3, "training": {"mode": "full"}}, ["inference", "port"], 65534),
     None, "demo", "spec.inference.port: Invalid value: inference.port: at most 65533 with training.mode full"),
    ("inference-gpu", with_path(S(), ["inference", "resources"], {"limits": {"nvidia.com/gpu": 4}}), None, "demo",
     "spec.inference.resources: Invalid value: resources must not set the GPU resource"),
    ("training-gpu", with_path(S(), ["training", "resources"], {"requests": {"nvidia.com/gpu": 8}}), None, "demo",
     "spec.training.resources: Invalid value: resources must not set the GPU resource: GPUs follow from "
     "processesPerNode"),
    ("resource-key", with_path(S(), ["inference", "resources"], {"requests": {"gpu memory!": 1}}), None, "demo",
     "spec.inference.resources.requests: Invalid value: keys must match"),
    ("vllm-flags", with_path(S(), ["inference", "extraArgs"], ["--enable-prefix-caching", "--port=9000"]), None,
     "demo", "spec.inference.extraArgs: Invalid value: must not repeat flags the operator sets"),
    ("retry-stage", with_path(S(), ["retry", "stages"], {"trian-generator": 2}), None, "demo",
     "spec.retry.stages: Invalid value: keys must be stage names"),
    ("deadline-stages", with_path(S(), ["deadlines"], {"stages": {"serving": 600}}), None, "demo",
     "spec.deadlines.stages: Invalid value: keys must be the names of stages that run as Jobs"),
    ("retry-backoff", with_path(S(), ["retry"], {"backoffSeconds": 600, "maxBackoffSeconds": 60}), None, "demo",
     "spec.retry.maxBackoffSeconds: Invalid value: maxBackoffSeconds must not be below backoffSeconds"),
    ("toleration-exists-value", with_path(S(), ["scheduling", "tolerations"],
                                          [{"key": "gpu", "operator": "Exists", "value": "yes"}]), None, "demo",
     "spec.scheduling.tolerations[0]: Invalid value: a toleration with operator Exists must not have a value"),
    ("toleration-no-key", with_path(S(), ["scheduling", "tolerations"], [{"operator": "Equal", "value": "x"}]),
     None, "demo", "spec.scheduling.tolerations[0]: Invalid value: a toleration without a key must use operator "
     "Exists"),
    ("target-modules-type", with_path(S(), ["training", "lora"], {"targetModules": 7}), None, "demo",
     "spec.training.lora.targetModules: Invalid value: 7 is not of type 'array'"),
    # hostile input (tests/reliability/test_hostile_input.py): what would fail at run time or leak a key
    ("s3-query", with_path(S(), ["storage", "uri"], "s3://bucket/runs?versionId=1"), None, "demo",
     "spec.storage.uri: Invalid value: must be s3://BUCKET/PREFIX without a query string"),
    ("s3-dot-segment", with_path(S(), ["storage", "uri"], "s3://bucket/runs/./x"), None, "demo",
     "spec.storage.uri: Invalid value: must not contain '.', '..' or empty segments"),
    ("s3-empty-segment", with_path(S(), ["storage", "uri"], "s3://bucket//x"), None, "demo",
     "spec.storage.uri: Invalid value: must not contain '.', '..' or empty segments"),
    ("s3-trailing-dot", with_path(S(), ["storage", "uri"], "s3://bucket/x/."), None, "demo",
     "spec.storage.uri: Invalid value: must not contain '.', '..' or empty segments"),
    ("target-modules-empty", with_path(S(), ["training", "lora"], {"targetModules": []}), None, "demo",
     "spec.training.lora.targetModules: Invalid value: [] should be non-empty"),
    # Kubernetes formats (issue 12): what the API server or the kubelet would refuse later
    ("node-selector-key", with_path(S(), ["scheduling", "nodeSelector"], {"gpu type": "h100"}), None, "demo",
     "spec.scheduling.nodeSelector: Invalid value: keys must match"),
    ("negative-quantity", with_path(S(), ["inference", "resources"], {"requests": {"cpu": -1}}), None, "demo",
     "spec.inference.resources.requests.cpu: Invalid value: must be at least 0"),
    ("toleration-seconds", with_path(S(), ["scheduling", "tolerations"], [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}]), None, "demo",
     "spec.scheduling.tolerations[0].tolerationSeconds: Invalid value: tolerationSeconds only with effect NoExecute"),
    ("name-reserved", S(), None, "iter-01", "<root>: Invalid value: metadata.name: names of the form iter-NN"),
    ("vllm-flags-underscore", with_path(S(), ["inference", "extraArgs"], ["--max_model_len=4096"]), None, "demo",
     "spec.inference.extraArgs: Invalid value: must not repeat flags the operator sets"),
    ("vllm-flags-short", with_path(S(), ["inference", "extraArgs"], ["-tp", "2"]), None, "demo",
     "spec.inference.extraArgs: Invalid value: must not repeat flags the operator sets"),
    ("vllm-api-key", with_path(S(), ["inference", "extraArgs"], ["--api-key", "sk-live-0123456789abcdef"]), None,
     "demo", "spec.inference.extraArgs: Invalid value: must not pass keys"),
    ("base-flag", with_path(S(), ["models", "base"], "--trust-remote-code"), None, "demo",
     "spec.models.base: Invalid value: must not begin with '-'"),
    ("inference-model-flag", with_path(S(), ["inference", "model"], "-tp"), None, "demo",
     "spec.inference.model: Invalid value: must not begin with '-'"),
] + [
    (f"{field}-{kind}", with_path(S(), path, url), None, "demo", f"spec.{field}: Invalid value: {expected}")
    for field, path in (("storage.endpointUrl", ["storage", "endpointUrl"]),
                        ("evaluate.judge.endpoint", ["evaluate", "judge", "endpoint"]))
    for kind, url, expected in (
        ("userinfo", "https://id:s3cr3t@minio.example.com", "must not contain credentials"),
        ("query", "https://minio.example.com/?X-Amz-Signature=abc", "must not have a query string"),
        ("not-url", "minio.example.com:9000", f"{field} must be an http:// or https:// URL"),
        ("line-break", "https://minio.example.com/a\r\nX-Injected: 1", f"{field} must be an http:// or https:// URL"))
] + [
    ("name-long", S(), None, "a" * (MAX_RUN_NAME + 1),
     f"<root>: Invalid value: metadata.name must be at most {MAX_RUN_NAME} characters"),
    ("name-digit", S(), None, "7b-run", "<root>: Invalid value: metadata.name must be a DNS-1035 label"),
    ("iterations-shrink", {**S(), "iterations": 2}, {**S(), "iterations": 3}, "demo",
     "spec.iterations: Invalid value: may only grow once the run has started"),
    ("storage-moved", with_path(S(), ["storage", "uri"], "s3://other-bucket/runs"), S(), "demo",
     "spec.storage.uri: Invalid value: is immutable once the run has started"),
    ("mode-changed", with_path(S(), ["training", "mode"], "full"), with_path(S(), ["training", "mode"], "lora"),
     "demo", "spec.training.mode: Invalid value: is immutable once the run has started"),
    ("lora-changed", with_path(S(), ["training", "lora"], {"rank": 16}), S(), "demo",
     "spec.training.lora: Invalid value: is immutable once the run has started"),
] + [
    (f"{section}-changed", with_path(S(), [section], value), S(), "demo",
     f"spec.{section}: Invalid value: is immutable once the run has started")
    for section, value in (
        ("models", {"base": "meta-llama/Llama-3.1-8B-Instruct"}), ("languages", ["en", "zh"]), ("seed", 7),
        ("sampling", {"temperature": 0.9}), ("selfInstruct", {"instructionsPerIteration": 10}),
        ("respond", {"samplesPerInstruction": 4}), ("extend", {"passes": 2}), ("filters", {"enNgram": 12}))
]


# The rules across fields, which the pipeline's own model (RunConfig, ClusterSpec: field by field) does not make: the
# operator has them from the CRD only. (The others are refused by the model first, with its own message.)
CROSS_FIELD_RULES = ("storage-file", "tiny-model", "packaged-model", "gguf-model", "inference-gpu",
                     "training-gpu", "vllm-flags", "retry-stage", "deadline-stages", "retry-backoff",
                     "toleration-exists-value", "toleration-no-key", "toleration-seconds", "vllm-flags-underscore",
                     "vllm-flags-short", "vllm-api-key", "inference-model-flag")
OPERATOR_CEL_CASES = [c for c in CEL_CASES if c[0] in CROSS_FIELD_RULES]


@pytest.mark.parametrize("case,spec,old,name,expected", OPERATOR_CEL_CASES, ids=[c[0] for c in OPERATOR_CEL_CASES])
def test_the_operator_runs_the_crds_own_cel_rules(case, spec, old, name, expected):
    """The operator's check of a spec (parse_spec) evaluates the CRD's rules: the same errors, word for word, as the
    API server's admission gives (no restatement that could drift)."""
    with pytest.raises(ConfigError) as err:
        parse_spec(name, spec)
    assert expected in str(err.value), str(err.value)


@pytest.mark.parametrize("case,spec,old,name,expected", CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_cel_rule_refuses(case, spec, old, name, expected):
    errors = validate(manifest(spec, name), manifest(old, name) if old is not None else None)
    assert any(e.startswith(expected) for e in errors), errors
    if old is None and case not in ("name-long", "name-digit"):
        with pytest.raises(ConfigError):  # the operator refuses it too (a run applied before the CRD was)
            parse_spec(name, spec)


def test_full_fine_tuning_is_admitted_for_every_iteration_count():
    for iterations in (1, 2, 3):
        spec = {**S(), "iterations": iterations, "training": {"mode": "full"}}
        assert validate(manifest(spec, "demo"), None) == []
        config, _ = parse_spec("demo", spec)
        assert config.training.mode == "full" and config.iterations == iterations


def test_every_cel_rule_has_a_refusing_case():
    rules = {v["message"] for _, node in _walk(root_schema(), "<root>")
             for v in node.get("x-kubernetes-validations", [])}
    hit = set()
    for _, spec, old, name, _expected in CEL_CASES:
        for error in validate(manifest(spec, name), manifest(old, name) if old is not None else None):
            hit.update(m for m in rules if m in error)
    assert rules - hit == set()


def test_cel_rules_avoid_escapes():
    """CEL string literals reject unknown escapes such as \\-; keep regexes in rules free of backslashes."""
    for path, node in _walk(root_schema(), "<root>"):
        for v in node.get("x-kubernetes-validations", []):
            assert "\\" not in v["rule"], f"{path}: {v['rule']}"


def test_allowed_updates_pass_the_transition_rules():
    old = manifest({**S(), "iterations": 2})
    new = manifest({**S(), "iterations": 3, "suspend": True, "inference": {"replicas": 3},
                    "client": {"concurrency": 8}, "retry": {"maxAttempts": 5},
                    "storage": {**S()["storage"], "credentialsSecret": "rotated"}})
    assert validate(new, old) == []


# -- the CRD as the API server checks it at install (operator/celcheck.py, Google's CEL with its type checker) -------


def test_the_crd_installs_every_rule_typed_compiled_bounded_and_within_the_cost_budgets():
    from selflengthen.operator.celcheck import PER_CRD_LIMIT, PER_RULE_LIMIT, install_errors, rule_costs

    root = root_schema()
    assert install_errors(root) == []
    costs = rule_costs(root)
    assert len(costs) >= 30 and max(c for _, _, c in costs) <= PER_RULE_LIMIT
    assert sum(c for _, _, c in costs) <= PER_CRD_LIMIT


def _node(root: dict, path: str) -> dict:
    node = root
    for part in path.split("."):
        node = node["properties"][part]
    return node


def test_install_checks_refuse_what_the_api_server_refuses():
    from selflengthen.operator.celcheck import install_errors

    # the landed CRD's targetModules: a CEL rule on a node with no declared type (helm install failed)
    root = copy.deepcopy(root_schema())
    lora = _node(root, "spec.training.lora")
    lora["properties"]["targetModules"] = {"x-kubernetes-preserve-unknown-fields": True, "x-kubernetes-validations": [
        {"rule": "type(self) == list || type(self) == string", "message": "must be one of: array, string"}]}
    assert any("targetModules: x-kubernetes-validations on a node without a declared type" in e
               for e in install_errors(root))
    # a map a rule iterates without maxProperties (no bound for the cost estimator)
    root = copy.deepcopy(root_schema())
    _node(root, "spec.retry.stages").pop("maxProperties")
    errors = install_errors(root)
    assert any("spec.retry.stages" in e and "no maxProperties" in e for e in errors)
    assert any("per-CRD budget" in e for e in errors)
    # rules that do not type-check: a wrong field, a wrong type, not a bool
    for rule, wanted in (("self.minWord < 3", "undefined field 'minWord'"),
                         ("self.minWords.startsWith('1')", "no matching overload for 'startsWith'"),
                         ("self.minWords + 1", "not bool")):
        root = copy.deepcopy(root_schema())
        _node(root, "spec.selfInstruct")["x-kubernetes-validations"].append({"rule": rule})
        assert any(wanted in e for e in install_errors(root)), rule


def test_a_union_without_a_structural_type_is_refused_at_generation():
    from pydantic import BaseModel

    class Odd(BaseModel):
        value: int | list[int] = 1

    with pytest.raises(ValueError, match="no structural schema"):
        openapi.openapi_schema(Odd)


def test_target_modules_is_a_typed_list_on_the_cluster_and_all_linear_for_peft():
    node = _node(root_schema(), "spec.training.lora")["properties"]["targetModules"]
    assert node["type"] == "array" and node["items"]["type"] == "string" and node["default"] == ["all-linear"]
    obj, errors = admit(manifest(minimal_spec()))
    assert errors == []
    config, _ = parse_spec("demo", obj["spec"])
    assert config.training.lora.target_modules == "all-linear"
    modules = ["q_proj", "v_proj"]
    obj, errors = admit(manifest(with_path(minimal_spec(), ["training", "lora", "targetModules"], modules)))
    assert errors == [] and parse_spec("demo", obj["spec"])[0].training.lora.target_modules == ["q_proj", "v_proj"]
    assert validate(manifest(with_path(minimal_spec(), ["training", "lora", "targetModules"], "q_proj")))
