"""pydantic model -> structural OpenAPI v3 schema, as a Kubernetes CRD wants it (generic: nothing of this project).

pydantic's JSON schema (draft 2020-12) with its references inlined, `anyOf null` dropped, numeric keywords
translated to OpenAPI 3.0's, defaults kept (default factories filled in) so that the API server fills them in;
int-or-string unions and maps with constrained keys get the CEL rules a schema cannot say.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def rule(rule: str, message: str, **extra: str) -> dict:
    return {"rule": rule, "message": message, **extra}


def add_rules(node: dict, *rules: dict) -> None:
    node.setdefault("x-kubernetes-validations", []).extend(rules)


_DROP = {"title", "$defs", "examples"}

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
                out.setdefault("x-kubernetes-validations", []).append(rule(
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
                rule(f"self.all(k, k.matches('{cel_string(pattern)}'))", f"keys must match {pattern}"))
        elif key == "propertyNames":
            continue  # not in OpenAPI v3 (map keys are checked with CEL where it matters)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    return out


def cel_string(text: str) -> str:
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
