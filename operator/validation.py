"""Offline admission of SelfLengthenRun manifests against the CRD, the way the API server does it.

The API server defaults a custom resource from the CRD's schema, validates it (OpenAPI v3, strict field
validation refusing unknown fields), then evaluates the CEL `x-kubernetes-validations` rules (transition rules
with `oldSelf` only on updates). This module does the same with jsonschema and cel-python so that tests, and
`python -m selflengthen.operator validate run.yaml`, refuse a bad manifest with the message a cluster would give.
Needs the `jsonschema` and `cel-python` packages (test/operator extras).
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

from ..pipeline.yamlfile import shorten
from .crd import crd

_MISSING = object()


@lru_cache(maxsize=1)
def root_schema() -> dict:
    """The CRD's schema, generated once (from the pydantic models: ~0.2 s); callers only read it."""
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# -- defaulting -----------------------------------------------------------------------------------------------------


def apply_defaults(schema: dict, value: Any) -> Any:
    """Fill in defaults as the API server does: for absent properties of present objects, recursively."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props:
            for name, sub in props.items():
                if name not in value and "default" in sub:
                    value[name] = copy.deepcopy(sub["default"])
                if name in value:
                    value[name] = apply_defaults(sub, value[name])
        elif isinstance(schema.get("additionalProperties"), dict):
            for key in value:
                value[key] = apply_defaults(schema["additionalProperties"], value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


# -- pruning ----------------------------------------------------------------------------------------------------------


def prune(schema: dict, value: Any, *, root: bool = True) -> Any:
    """Drop the fields a structural schema does not declare, silently, as the API server does on every write
    (without fieldValidation=Strict), unless the node says x-kubernetes-preserve-unknown-fields. The root's
    apiVersion, kind and metadata are the server's own (ObjectMeta), never pruned."""
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields")
        out = {}
        for key, sub_value in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = sub_value
            elif props is not None and key in props:
                out[key] = prune(props[key], sub_value, root=False)
            elif isinstance(extra, dict):
                out[key] = prune(extra, sub_value, root=False)
            elif keep:
                out[key] = sub_value
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], item, root=False) for item in value]
    return value


def unknown_fields(schema: dict, value: Any, path: tuple = ()) -> list[str]:
    """The paths `prune` would drop (what fieldValidation=Strict refuses and Warn reports)."""
    out: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, sub_value in value.items():
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue
            if props is not None and key in props:
                out.extend(unknown_fields(props[key], sub_value, (*path, key)))
            elif isinstance(extra, dict):
                out.extend(unknown_fields(extra, sub_value, (*path, key)))
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(_path([*path, key]))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out.extend(unknown_fields(schema["items"], item, (*path, i)))
    return out


# -- OpenAPI v3 (Kubernetes flavour) -> JSON Schema draft 4 ---------------------------------------------------------


def _jsonschema(node: Any) -> Any:
    """Draft 4 knows boolean exclusiveMinimum like OpenAPI 3.0; add what the server enforces beyond JSON Schema."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_jsonschema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("default", "nullable", "format"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # strict field validation: unknown fields are errors
    if node.get("nullable"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "null"}, out]}
    return out


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = _jsonschema(root_schema())
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _message(err) -> str:
    """jsonschema's message, with the bad value cut to ~200 characters (a megabyte value is not echoed)."""
    value = repr(err.instance)
    return err.message.replace(value, shorten(value)) if len(value) > 200 else err.message


def _schema_errors(obj: dict) -> list[str]:
    errors = []
    found = sorted(_validator().iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    too_long = {tuple(e.absolute_path) for e in found if e.validator in ("maxLength", "maxItems", "maxProperties")}
    for err in found:
        if err.validator == "pattern" and tuple(err.absolute_path) in too_long:
            continue  # a value too long is refused for that, not also for its format (nor echoed twice)
        if err.validator == "additionalProperties" and err.validator_value is False:
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            for name in extra:
                errors.append(f"{_path([*err.absolute_path, name])}: unknown field")
            continue
        if err.validator == "required":
            missing = err.message.split("'")[1]
            errors.append(f"{_path([*err.absolute_path, missing])}: Required value")
            continue
        if err.validator == "enum":  # the API server's wording
            supported = ", ".join(json.dumps(v) for v in err.validator_value)
            errors.append(f"{_path(err.absolute_path)}: Unsupported value: {shorten(json.dumps(err.instance))}: "
                          f"supported values: {supported}")
            continue
        errors.append(f"{_path(err.absolute_path)}: Invalid value: {_message(err)}")
    return errors


# -- CEL ------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_errors(schema: dict, value: Any, old: Any, path: list, ratchet: bool = False) -> list[str]:
    """`ratchet`: a value equal to the old one is not validated again (the API server's validation ratcheting,
    GA in 1.33: an update is not refused for what it did not change)."""
    import celpy

    if ratchet and old is not _MISSING and value == old:
        return []
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is _MISSING:
            continue  # transition rules run on updates only, where the old value exists
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        try:
            ok = _program(rule["rule"]).evaluate(activation)
        except Exception as exc:  # an error evaluating is a broken rule; the server reports it the same way
            errors.append(f"{_path(path)}: rule {rule['rule']!r} failed to evaluate: {exc}")
            continue
        if not ok:
            where = _path(path) + rule.get("fieldPath", "")
            errors.append(f"{where}: Invalid value: {rule.get('message') or 'failed rule: ' + rule['rule']}")
    if isinstance(value, dict):
        props = schema.get("properties")
        if props:
            for name, sub in props.items():
                if name in value:
                    sub_old = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                    errors.extend(_cel_errors(sub, value[name], sub_old, [*path, name], ratchet))
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, sub_value in value.items():
                sub_old = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
                errors.extend(_cel_errors(schema["additionalProperties"], sub_value, sub_old, [*path, key],
                                           ratchet))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors.extend(_cel_errors(schema["items"], item, _MISSING, [*path, i]))
    return errors


@lru_cache(maxsize=256)
def _spec_rule_errors(spec_json: str) -> tuple[str, ...]:
    schema = root_schema()["properties"]["spec"]
    spec = apply_defaults(schema, json.loads(spec_json))
    return tuple(e.removeprefix("spec.") for e in _cel_errors(schema, spec, _MISSING, ["spec"]))


def spec_rule_errors(spec: dict) -> list[str]:
    """The errors of the CRD's CEL rules on a spec (a create: no transition rules), defaulted as the API server
    defaults it first; paths relative to spec (`storage.uri: Invalid value: ...`). Cached by content: the operator
    checks the same spec on every reconcile."""
    return list(_spec_rule_errors(json.dumps(spec, sort_keys=True)))


# -- admission ------------------------------------------------------------------------------------------------------


def admit(obj: dict, old: dict | None = None, *, prune_unknown: bool = False,
          ratchet: bool = False) -> tuple[dict, list[str]]:
    """Default and validate a SelfLengthenRun as the API server would; returns (defaulted object, errors).

    `prune_unknown`: drop undeclared fields silently first (the server's default field validation) instead of
    refusing them (kubectl's fieldValidation=Strict). `ratchet`: on an update, skip the CEL rules of the values that
    did not change (the server's validation ratcheting: a status write does not re-run the spec's rules, and a spec
    change is not refused for a field it left alone)."""
    schema = root_schema()
    obj = copy.deepcopy(obj)
    if prune_unknown:
        obj = prune(schema, obj)
    obj = apply_defaults(schema, obj)
    errors = _schema_errors(obj)
    if not errors:
        old_obj = apply_defaults(schema, prune(schema, copy.deepcopy(old))) if old is not None else _MISSING
        view = {**obj, "metadata": {k: obj.get("metadata", {}).get(k) for k in ("name",)}}
        if ratchet and isinstance(old_obj, dict):
            changed = {k for k in schema["properties"] if view.get(k) != old_obj.get(k)}
            rules = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k in changed}}
            if not changed & {"spec", "metadata"}:
                rules.pop("x-kubernetes-validations", None)  # the root's rules read metadata.name only
            errors = _cel_errors(rules, view, old_obj, [], True)
        else:
            errors = _cel_errors(schema, view, old_obj, [])
    return obj, errors


def validate(obj: dict, old: dict | None = None) -> list[str]:
    return admit(obj, old)[1]


@lru_cache(maxsize=1)
def _status_validator():
    import jsonschema

    return jsonschema.Draft4Validator(_jsonschema(root_schema()["properties"]["status"]))


def status_problems(status: dict) -> list[str]:
    """What the API server would do to a status the operator writes: the fields it would prune (undeclared) and
    the schema errors it would refuse the write for (422). Empty when the status is stored as written."""
    schema = root_schema()["properties"]["status"]
    problems = [f"{p}: would be pruned (not in the CRD's status schema)"
                for p in unknown_fields(schema, status, ("status",))]
    for err in _status_validator().iter_errors(prune(schema, status, root=False)):
        problems.append(f"{_path(['status', *err.absolute_path])}: {err.message}")
    return problems
