"""The SelfLengthenRun CustomResourceDefinition, generated from the pydantic models.

    python -m selflengthen.operator crd --write     # regenerate crds/ and the chart's crds/ (one source)

The spec schema is RunConfig's JSON schema (the same model the local runner reads) turned into a structural
OpenAPI v3 schema (references inlined, `anyOf null` dropped, pydantic's numeric keywords translated, defaults kept
so the API server fills them in), merged with the cluster-only models of operator/spec.py. Rules JSON Schema cannot
say (cross-field checks, fields that may not change once the run has started) are CEL `x-kubernetes-validations`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..pipeline.config import RunConfig
from .spec import (
    ALL_STAGES,
    EXCLUDED_CONFIG_FIELDS,
    MAX_RUN_NAME,
    RESERVED_VLLM_FLAGS,
    SERVING,
    ClusterSpec,
    merged_sections,
)
from .status import RunStatus

GROUP = "selflengthen.io"
VERSION = "v1alpha1"
KIND = "SelfLengthenRun"
PLURAL = "selflengthenruns"
SINGULAR = "selflengthenrun"
SHORT_NAMES = ["slr"]
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"
ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = ROOT / "crds" / "selflengthenrun.yaml"
# The Helm chart installs the same file from its own crds/ (Helm reads CRDs only from inside the chart).
CHART_DIR = ROOT / "charts" / "selflengthen"
CHART_CRD_PATH = CHART_DIR / "crds" / "selflengthenrun.yaml"
CRD_PATHS = (CRD_PATH, CHART_CRD_PATH)

_DROP = {"title", "$defs", "examples"}

# ---------------------------------------------------------------------------------------------------------------
# JSON schema (pydantic, draft 2020-12) -> structural OpenAPI v3 schema (Kubernetes CRD)


def _camel_path(path: str) -> list[str]:
    from pydantic.alias_generators import to_camel

    return [to_camel(p) for p in path.split(".")]


def openapi_schema(model: type[BaseModel], *, exclude: tuple[str, ...] = ()) -> dict:
    """A structural OpenAPI v3 schema for a pydantic model (by alias), minus the dotted snake_case paths."""
    source = model.model_json_schema(by_alias=True)
    defs = source.get("$defs", {})
    schema = _convert(source, defs)
    for path in exclude:
        *parents, leaf = _camel_path(path)
        node = schema
        for p in parents:
            node = node["properties"][p]
        node["properties"].pop(leaf, None)
        if leaf in node.get("required", []):
            node["required"].remove(leaf)
            if not node["required"]:
                node.pop("required")
    _fill_factory_defaults(schema, model)
    return schema


def _convert(node: Any, defs: dict) -> Any:
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        merged = {**target, **node}  # a description beside the $ref wins
        return _convert(merged, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        return _convert({**_convert(inner, defs), **node}, defs)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        nullable = len(variants) < len(node["anyOf"])
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if nullable and rest.get("default", "absent") is None:
            rest.pop("default")
        if len(variants) == 1:
            return _convert({**_convert(variants[0], defs), **rest}, defs)
        types = {v.get("type") for v in variants}
        if types == {"integer", "string"}:  # a Kubernetes quantity or port: int-or-string
            out = {k: v for k, v in _convert(rest, defs).items()}
            string = next(v for v in variants if v.get("type") == "string")
            for key in ("pattern", "maxLength"):
                if key in string:
                    out[key] = string[key]
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            out["x-kubernetes-int-or-string"] = True
            integer = next(v for v in variants if v.get("type") == "integer")
            if "minimum" in integer:  # the schema's minimum would hold for both: say it of the integer only
                out.setdefault("x-kubernetes-validations", []).append(_rule(
                    f"type(self) == string || self >= {integer['minimum']}",
                    f"must be at least {integer['minimum']}"))
            return out
        if types == {"array", "string"}:  # a name or a list of names: on the cluster always the list
            out = _convert(rest, defs)
            array = _convert(next(v for v in variants if v.get("type") == "array"), defs)
            if isinstance(out.get("default"), str):
                out["default"] = [out["default"]]
            out = {**array, **out}
            out["description"] = " ".join(filter(None, [out.get("description"), "(a list; one name is a "
                                                                                "one-item list)"]))
            return out
        # A structural schema types every node, and the API server cannot declare CEL's `self` for an untyped
        # one (the whole CRD is refused): a union must be given one type here.
        raise ValueError(f"a union of {sorted(types)} has no structural schema: type it")
    out: dict = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties":
            if value is False or value is True:
                continue  # unknown fields are pruned (and refused by strict field validation) on the server
            out[key] = _convert(value, defs)
        elif key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "patternProperties":  # a map with constrained keys: values typed, keys checked by CEL
            ((pattern, sub),) = value.items()
            out["additionalProperties"] = _convert(sub, defs)
            out.setdefault("x-kubernetes-validations", []).append(
                _rule(f"self.all(k, k.matches('{_cel_string(pattern)}'))", f"keys must match {pattern}"))
        elif key == "propertyNames":
            continue  # not in OpenAPI v3 (map keys are checked with CEL where it matters)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    return out


def _cel_string(text: str) -> str:
    """`text` inside a single-quoted CEL string literal (a backslash is an escape there: a regex's \\. is \\\\.)."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _fill_factory_defaults(schema: dict, model: type[BaseModel]) -> None:
    """Defaults pydantic leaves out of the schema (default_factory): {} for nested models, non-empty lists."""
    for name, field in model.model_fields.items():
        prop = schema.get("properties", {}).get(field.alias or name)
        if prop is None or "default" in prop or field.is_required() or field.default_factory is None:
            continue
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            prop["default"] = {}
            _fill_factory_defaults(prop, type(value))
        elif isinstance(value, list) and value:
            prop["default"] = value
    # nested models reached through a default value
    for name, field in model.model_fields.items():
        prop = schema.get("properties", {}).get(field.alias or name)
        annotation = field.annotation
        if prop and isinstance(annotation, type) and issubclass(annotation, BaseModel) and "default" in prop:
            _fill_factory_defaults(prop, annotation)


# ---------------------------------------------------------------------------------------------------------------
# The spec: run configuration + cluster sections + CEL rules

IMMUTABLE = "is immutable once the run has started: create a new SelfLengthenRun instead"
# Fields of the run configuration that may not change once the run exists (the artifacts already made depend on
# them); everything else (iterations excepted: it may only grow) may be tuned on a running run.
IMMUTABLE_FIELDS = ("models", "languages", "seed", "sampling", "selfInstruct", "respond", "extend", "filters")


def _rule(rule: str, message: str, **extra: str) -> dict:
    return {"rule": rule, "message": message, **extra}


def _add_rules(node: dict, *rules: dict) -> None:
    node.setdefault("x-kubernetes-validations", []).extend(rules)


def spec_schema() -> dict:
    config = openapi_schema(RunConfig, exclude=EXCLUDED_CONFIG_FIELDS)
    cluster = openapi_schema(ClusterSpec)
    props = config["properties"]
    for key, sub in cluster["properties"].items():
        if key in merged_sections():
            target = props[key]
            clash = set(target["properties"]) & set(sub["properties"])
            if clash:
                raise ValueError(f"spec.{key}: cluster fields {sorted(clash)} clash with the run configuration")
            target["properties"].update(sub["properties"])
            target["description"] = " ".join(filter(None, [target.get("description"), sub.get("description")]))
        else:
            props[key] = sub
    schema = {
        "type": "object",
        "description": "A Self-Lengthen run: the run configuration (as in the local runner's YAML) plus where and "
        "how it runs on the cluster.",
        "required": sorted({*cluster.get("required", []), "storage"}),
        "properties": props,
    }

    # storage: S3 only on a cluster, no file:// default.
    storage = props["storage"]
    storage.pop("default", None)
    storage["required"] = ["uri"]
    uri = storage["properties"]["uri"]
    uri.pop("default", None)
    uri["maxLength"] = 1024
    _add_rules(
        uri,
        _rule("self.startsWith('s3://')", "must be s3://BUCKET[/PREFIX]: pods share no disk, artifacts go to S3"),
        _rule("!self.startsWith('s3://') || self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$')",
              "must be s3://BUCKET[/PREFIX] with a valid bucket name"),
        _rule("!self.contains('/../') && !self.endsWith('/..')", "must not contain '..' segments"),
        _rule("self == oldSelf", IMMUTABLE),
    )
    props["languages"]["x-kubernetes-list-type"] = "set"
    # The model has no sensible default on a cluster (the local default is the tiny laptop model).
    models = props["models"]
    models.pop("default", None)
    models["properties"]["base"].pop("default", None)
    models["required"] = ["base"]
    schema["required"] = sorted({*schema["required"], "models"})

    for key in IMMUTABLE_FIELDS:
        _add_rules(props[key], _rule("self == oldSelf", IMMUTABLE))
    _add_rules(props["iterations"], _rule("self >= oldSelf", "may only grow once the run has started"))
    _add_rules(props["training"]["properties"]["mode"], _rule("self == oldSelf", IMMUTABLE))
    _add_rules(props["training"]["properties"]["lora"], _rule("self == oldSelf", IMMUTABLE))

    si = props["selfInstruct"]
    _add_rules(si, _rule("self.minWords < self.maxWords - 1",
                         "minWords must be at least 2 below maxWords (both bounds are exclusive)",
                         fieldPath=".minWords"))
    _add_rules(props["models"]["properties"]["base"], _rule(
        "!self.startsWith('tiny://') && !self.startsWith('smollm2://') && !self.startsWith('gguf://')",
        "tiny://, smollm2:// and gguf:// models exist on a laptop only: name a real model (e.g. "
        "Qwen/Qwen2-7B-Instruct)"))

    for section in ("inference", "training"):
        res = props[section]
        _add_rules(res, _rule(
            "(!has(self.resources.requests) || !(self.gpuResource in self.resources.requests)) && "
            "(!has(self.resources.limits) || !(self.gpuResource in self.resources.limits))",
            "resources must not set the GPU resource: GPUs follow from "
            + ("tensorParallelSize" if section == "inference" else "processesPerNode"),
            fieldPath=".resources"))
    _add_rules(props["inference"]["properties"]["extraArgs"], _rule(
        f"self.all(a, !a.matches('{_flag_regex(RESERVED_VLLM_FLAGS)}'))",
        "must not repeat flags the operator sets (" + ", ".join(RESERVED_VLLM_FLAGS) + "), in any spelling"))
    stages = "[" + ", ".join(f"'{s}'" for s in (SERVING, *ALL_STAGES)) + "]"
    _add_rules(props["retry"]["properties"]["stages"], _rule(
        f"self.all(k, k in {stages})", "keys must be stage names: " + ", ".join((SERVING, *ALL_STAGES))))
    job_stages = "[" + ", ".join(f"'{s}'" for s in ALL_STAGES) + "]"
    _add_rules(props["deadlines"]["properties"]["stages"], _rule(
        f"self.all(k, k in {job_stages})", "keys must be the names of stages that run as Jobs: "
        + ", ".join(ALL_STAGES)))
    _add_rules(props["retry"], _rule(
        "self.maxBackoffSeconds >= self.backoffSeconds", "maxBackoffSeconds must not be below backoffSeconds",
        fieldPath=".maxBackoffSeconds"))
    for section in ("scheduling", "inference", "training", "cpuJobs"):  # every role's tolerations
        tol = props[section]["properties"]["tolerations"]["items"]
        _add_rules(tol, _rule("self.operator != 'Exists' || !has(self.value)",
                              "a toleration with operator Exists must not have a value"),
                   _rule("has(self.key) || self.operator == 'Exists'",
                         "a toleration without a key must use operator Exists"),
                   _rule("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                         "tolerationSeconds only with effect NoExecute", fieldPath=".tolerationSeconds"))
    _add_rules(schema, _rule(
        "self.training.mode != 'full' || self.iterations == 1",
        "training.mode full supports iterations: 1 only (one vLLM server cannot serve two different full models "
        "to the pipeline); use lora for several macro-iterations", fieldPath=".training.mode"))
    _hostile_input_rules(props)
    return schema


# The apiserver's share of pipeline/config.py's and pipeline/urls.py's checks of strings that would fail at run
# time or leak a key (RE2 regexes in double-quoted CEL strings, without backslashes).
_URL_RE = "^https?://[A-Za-z0-9.:-]+(/[A-Za-z0-9._~!&'()*+,;=:/%-]*)?$"


def _url_rules(field: str, home: str) -> list[dict]:
    return [
        _rule("!self.contains('@')", f"must not contain credentials (user:password@): a key belongs in {home}, "
              "never in the URL"),
        _rule("!self.contains('?') && !self.contains('#')", "must not have a query string or fragment"),
        _rule(f'self.matches("{_URL_RE}")', f"{field} must be an http:// or https:// URL without spaces or line "
              "breaks"),
    ]


def _flag_regex(flags) -> str:
    """An RE2 regex for every spelling of these vLLM flags vLLM's parser accepts that a regex can see: '-' or '_'
    in the name, `=value` or `.field`, the short aliases (abbreviations are left to the operator's own check)."""
    from ..pipeline.vllm_flags_table import OPTIONS

    dests = {OPTIONS[f]["dest"] for f in flags}
    longs = sorted({o[2:].replace("-", "[-_]") for o, v in OPTIONS.items() if v["dest"] in dests and o[:2] == "--"})
    shorts = sorted({o for o, v in OPTIONS.items() if v["dest"] in dests and o[:2] != "--"})
    return "^(--(" + "|".join(longs) + ")" + "".join(f"|{s}" for s in shorts) + ")([=.].*)?$"


def _hostile_input_rules(props: dict) -> None:
    from ..pipeline.urls import KEY_HOME

    storage = props["storage"]["properties"]
    _add_rules(storage["uri"],
               _rule("!self.contains('?') && !self.contains('#') && !self.contains('@')",
                     "must be s3://BUCKET/PREFIX without a query string, fragment or '@' (credentials come from "
                     "the AWS variables)"),
               _rule("!self.matches('^s3://.*/[.]{0,2}/') && !self.matches('/[.]{1,2}/?$')",
                     "must not contain '.', '..' or empty segments (each would name another prefix)"))
    _add_rules(storage["endpointUrl"], *_url_rules("storage.endpointUrl", KEY_HOME["storage.endpointUrl"]))
    judge = props["evaluate"]["properties"]["judge"]["properties"]["endpoint"]
    _add_rules(judge, *_url_rules("evaluate.judge.endpoint", KEY_HOME["evaluate.judge.endpoint"]))
    _add_rules(props["inference"]["properties"]["extraArgs"], _rule(
        f"self.all(a, !a.matches('{_flag_regex(('--api-key', '--hf-token', '--config'))}'))",
        "must not pass keys (--api-key, --hf-token) or an options file (--config): keys come from Secrets"))
    for node in (props["models"]["properties"]["base"], props["inference"]["properties"]["model"]):
        _add_rules(node, _rule("!self.startsWith('-')", "must not begin with '-' (vLLM would read it as a flag)"))
    # targetModules: typed as a list with minItems 1 (no rule needed to refuse an empty one)


# ---------------------------------------------------------------------------------------------------------------
# The status (written by the operator only)

def status_schema() -> dict:
    """The status schema, from the model the reconciler builds the status with (operator/status.py)."""
    return openapi_schema(RunStatus)


def crd() -> dict:
    root = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            _rule(f"self.metadata.name.size() <= {MAX_RUN_NAME}",
                  f"metadata.name must be at most {MAX_RUN_NAME} characters (it prefixes the names of Jobs, "
                  "Services and pod hostnames)"),
            _rule("!self.metadata.name.matches('^iter-[0-9]+$')",
                  "metadata.name: names of the form iter-NN are reserved (they name the iterations inside a run)"),
            _rule("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                  "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
                  "letter): it names Services"),
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "selflengthen"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": ["all", "selflengthen"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Iteration", "type": "string", "jsonPath": ".status.progress",
                     "description": "current macro-iteration / iterations"},
                    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
                    {"name": "Avg Words", "type": "integer", "jsonPath": ".status.averageWords"},
                    {"name": "Reason", "type": "string", "priority": 1,
                     "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"},
                    {"name": "Message", "type": "string", "priority": 1,
                     "jsonPath": ".status.conditions[?(@.type==\"Ready\")].message"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


HEADER = ("# Generated from pipeline/config.py (RunConfig) and operator/spec.py by\n"
          "#   python -m selflengthen.operator crd --write\n"
          "# Do not edit by hand: tests/test_crd.py fails when this file and the models differ.\n")


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120, allow_unicode=True)


def write(path: Path = CRD_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


def stale(paths: tuple[Path, ...] = CRD_PATHS) -> list[Path]:
    """The checked-in copies that differ from the models (missing ones included)."""
    text = render()
    return [p for p in paths if not p.exists() or p.read_text(encoding="utf-8") != text]
