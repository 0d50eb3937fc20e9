"""Malformed and boundary SelfLengthenRun specs (hypothesis): each is refused at admission (the CRD's schema and
CEL rules, as the API server applies them) or by the operator's own checks with a message that names a field,
or it is accepted and the state machine starts it (Serving, with its first children) — never an exception, a
crash loop or a silent stuck phase."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kube_fixtures import BASE_SPEC
from selflengthen.operator.reconcile import Observed, reconcile
from selflengthen.operator.resources import Run
from selflengthen.operator.spec import parse_spec
from selflengthen.operator.validation import admit, root_schema
from selflengthen.pipeline.config import ConfigError

PROPERTY = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def leaf_paths(schema: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every property path of the spec's schema, with its schema (objects and their fields both)."""
    out = [(path, schema)] if path else []
    for name, sub in (schema.get("properties") or {}).items():
        out += leaf_paths(sub, (*path, name))
    return out


SPEC_SCHEMA = root_schema()["properties"]["spec"]
PATHS = leaf_paths(SPEC_SCHEMA)


def boundary_values(schema: dict) -> st.SearchStrategy:
    """Values around the schema's own bounds and of the wrong kinds."""
    edges = []
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
        if key in schema:
            n = schema[key]
            edges += [n - 1, n, n + 1] if isinstance(n, int) else [n, n * 0.999, n * 1.001]
    strings = ["", "x", "UPPER", "a/b", "../up", "s3://b/p", "-lead", "x" * 300]
    if "enum" in schema:
        strings += list(schema["enum"])
    near = [schema["default"]] if "default" in schema else []
    near += list(schema.get("enum", [])) + [e for e in edges if isinstance(e, int) and e >= 0]
    # about half the draws stay near valid values (defaults, enums, on the bounds), so that accepted specs run too
    valid_ish = st.sampled_from(near) if near else st.sampled_from(edges or [0])
    return st.one_of(
        valid_ish, valid_ish, valid_ish, valid_ish, valid_ish, valid_ish, valid_ish, valid_ish,
        st.sampled_from(edges or [0]),
        st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
        st.sampled_from(strings), st.lists(st.integers(0, 3), max_size=3), st.just({}), st.just({"bogus": 1}),
    )


@st.composite
def mutated_specs(draw):
    spec = copy.deepcopy(BASE_SPEC)
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        path, schema = draw(st.sampled_from(PATHS))
        value = draw(boundary_values(schema))
        node = spec
        for name in path[:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[path[-1]] = value
        touched.append(".".join(path))
    return spec, touched


def names_a_field(message: str) -> bool:
    field = message.split(": ", 1)[0].strip()
    return bool(field) and " " not in field


@PROPERTY
@given(mutated_specs())
def test_a_spec_is_refused_naming_a_field_or_it_starts(case):
    spec, touched = case
    doc = {"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun",
           "metadata": {"name": "demo", "namespace": "ml"}, "spec": spec}
    admitted, errors = admit(doc)
    if errors:
        assert all(e.startswith("spec") and names_a_field(e) for e in errors), errors
        event("refused at admission")
        return
    try:
        config, cluster = parse_spec("demo", admitted["spec"])
    except ConfigError as err:
        lines = str(err).splitlines()[1:]
        assert lines and all(names_a_field(line) for line in lines), str(err)
        event("refused by the operator")
        return
    run = Run(name="demo", namespace="ml", uid="uid", config=config, cluster=cluster)
    plan = reconcile(run, 1, None, Observed(), NOW)
    phase = plan.status["phase"]
    assert phase in ("Serving", "Suspended"), plan.status
    if phase == "Serving":  # it makes progress: its config and its first vLLM server are being created
        kinds = {a.kind for a in plan.actions if a.verb == "create"}
        assert {"ConfigMap", "Deployment", "Service"} <= kinds, plan.actions
    event(f"accepted: {phase}")


@pytest.mark.parametrize("path", ["iterations", "retry.maxAttempts", "inference.tensorParallelSize"])
def test_the_generator_reaches_the_fields_it_means_to(path):
    assert tuple(path.split(".")) in {p for p, _ in PATHS}
