"""The SelfLengthenRun CustomResourceDefinition, generated from the pydantic models.

    python -m selflengthen.operator crd --write     # regenerate crds/ and the chart's crds/ (one source)

The spec schema is RunConfig's JSON schema (the same model the local runner reads) turned into a structural
OpenAPI v3 schema (references inlined, `anyOf null` dropped, pydantic's numeric keywords translated, defaults kept
so the API server fills them in), merged with the cluster-only models of operator/spec.py. Rules JSON Schema cannot
say (cross-field checks, fields that may not change once the run has started) are CEL `x-kubernetes-validations`.

Apart: the generic converter (operator/openapi.py), the rules (operator/crd_rules.py), the status schema
(operator/status.py) and the checked-in files (operator/crd_files.py).
"""

from __future__ import annotations

from ..pipeline.config import RunConfig
from .crd_rules import add_spec_rules, root_rules
from .openapi import openapi_schema
from .spec import EXCLUDED_CONFIG_FIELDS, ClusterSpec, merged_sections
from .status import status_schema

GROUP = "selflengthen.io"
VERSION = "v1alpha1"
KIND = "SelfLengthenRun"
PLURAL = "selflengthenruns"
SINGULAR = "selflengthenrun"
SHORT_NAMES = ["slr"]
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"


# ---------------------------------------------------------------------------------------------------------------
# The spec: run configuration + cluster sections (+ the CEL rules of operator/crd_rules.py)


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
    props["languages"]["x-kubernetes-list-type"] = "set"
    # The model has no sensible default on a cluster (the local default is the tiny laptop model).
    models = props["models"]
    models.pop("default", None)
    models["properties"]["base"].pop("default", None)
    models["required"] = ["base"]
    schema["required"] = sorted({*schema["required"], "models"})
    add_spec_rules(schema)
    return schema


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
        "x-kubernetes-validations": root_rules(),
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
