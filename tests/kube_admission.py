"""What kube-apiserver refuses when a built-in object is created, for the test API (kube_fixtures):

- the official OpenAPI schema of the kind, strict (kubernetes-validate: unknown fields and wrong types refused);
- the checks the API server makes in code that the schemas do not carry (pkg/apis/core/validation,
  pkg/apis/apps/validation, pkg/apis/batch/validation): object names (DNS-1123 subdomain, 253; Services and
  Namespaces DNS labels, 63; Jobs 63, their name becomes a label value), label keys and values, annotation keys,
  container and volume names, env var names, port names, resource quantities (grammar, no negatives, requests not
  above limits, extended resources whole and requests equal to limits), nodeSelector keys and values, tolerations,
  a Deployment's selector matching its template, volume mounts naming a volume.

`child_errors(obj)` returns (field, message) causes; empty when the API server would accept the object.
"""

from __future__ import annotations

import re
from functools import lru_cache

from selflengthen.operator import k8sformat as fmt

K8S_VERSION = "1.37.0"
# ConfigMap and Secret data keys
_DATA_KEY = r"[-._a-zA-Z0-9]+"


@lru_cache(maxsize=64)
def _validator(kind: str, api_version: str):
    """kubernetes-validate's strict schema of a kind, compiled once (its validate() reloads the 6 MB definitions
    on every call)."""
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    version = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(K8S_VERSION)][-1]
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = kv.schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", K8S_VERSION)
    except FileNotFoundError:
        return None
    registry = _definitions(folder) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


@lru_cache(maxsize=2)
def _definitions(folder: str):
    import kubernetes_validate.utils as kv
    from referencing import Resource

    return Resource.from_contents(kv.schema_contents(f"{folder}/_definitions.json", K8S_VERSION))


def warm(kinds: dict[str, str]) -> None:
    """Compile the validators of these kinds (kind -> apiVersion) now, not in the middle of a timed test."""
    for kind, api_version in kinds.items():
        _validator(kind, api_version)


def _p(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_errors(obj: dict) -> list[tuple[str, str]]:
    validator = _validator(obj.get("kind", ""), obj.get("apiVersion", ""))
    if validator is None:
        return []
    return [(_p(e.absolute_path) or "<root>", e.message) for e in validator.iter_errors(obj)]


def _meta_errors(meta: dict, path: str, *, name_check=fmt.dns1123_subdomain) -> list[tuple[str, str]]:
    out = []
    name = meta.get("name")
    if name is not None and path == "metadata":
        out.extend((f"{path}.name", m) for m in name_check(name))
    out.extend((f"{path}.labels", m) for _, m in fmt.labels(meta.get("labels") or {}))
    for key in meta.get("annotations") or {}:
        out.extend((f"{path}.annotations", f"key {key!r}: {m}") for m in fmt.qualified_name(key))
    if sum(len(k) + len(str(v)) for k, v in (meta.get("annotations") or {}).items()) > 256 * 1024:
        out.append((f"{path}.annotations", "must have at most 262144 bytes"))
    return out


def _resources_errors(res: dict, path: str) -> list[tuple[str, str]]:
    out = []
    parsed: dict[str, dict] = {}
    for kind in ("requests", "limits"):
        for key, value in (res.get(kind) or {}).items():
            where = f"{path}.{kind}[{key}]"
            out.extend((where, m) for m in fmt.qualified_name(key))
            problems = fmt.quantity(value)
            out.extend((where, m) for m in problems)
            if not problems:
                parsed.setdefault(key, {})[kind] = fmt.parse_quantity(value)
    for key, both in parsed.items():
        req, lim = both.get("requests"), both.get("limits")
        if req is not None and lim is not None and req > lim:
            out.append((f"{path}.requests[{key}]", f"must be less than or equal to {key} limit"))
        standard = "/" not in key or key.startswith("kubernetes.io/") or key.startswith("requests.")
        if not standard:  # an extended resource (nvidia.com/gpu, rdma/...): whole units, requests == limits
            for value in both.values():
                if value is not None and value != value.to_integral_value():
                    out.append((f"{path}[{key}]", "must be an integer"))
            if req is not None and lim is None:
                out.append((f"{path}.limits[{key}]", "Required value: Limit must be set for non overcommitable "
                                                      "resources"))
            if req is not None and lim is not None and req != lim:
                out.append((f"{path}.requests[{key}]", "must be equal to " + key + " limit"))
    return out


def _container_errors(c: dict, path: str, volumes: set[str]) -> list[tuple[str, str]]:
    out = [(f"{path}.name", m) for m in fmt.dns1123_label(c.get("name", ""))]
    image = c.get("image")
    if image is None or image != image.strip() or not image:
        out.append((f"{path}.image", "Required value" if not image else "must not have leading or trailing "
                                                                        "whitespace"))
    for i, env in enumerate(c.get("env") or []):
        out.extend((f"{path}.env[{i}].name", m) for m in fmt.env_var_name(env.get("name", "")))
    for i, port in enumerate(c.get("ports") or []):
        if "name" in port:
            name = port["name"]
            if len(name) > 15 or not re.fullmatch(fmt.IANA_SVC_NAME, name) or not re.search("[a-z]", name) \
                    or "--" in name:
                out.append((f"{path}.ports[{i}].name", "must be no more than 15 characters, lowercase "
                                                       "alphanumerics or '-', with at least one letter"))
    out.extend(_resources_errors(c.get("resources") or {}, f"{path}.resources"))
    for i, mount in enumerate(c.get("volumeMounts") or []):
        if mount.get("name") not in volumes:
            out.append((f"{path}.volumeMounts[{i}].name", f"Not found: {mount.get('name')!r}"))
    return out


def _restart_policy_errors(c: dict, path: str, *, init: bool) -> list[tuple[str, str]]:
    """A container's restartPolicy: only `Always`, and only on an init container (a native sidecar, 1.29+); an
    init container that is not a sidecar runs to completion, so it may have no probes (validateInitContainers;
    restart rules of regular containers are behind a feature gate that is off by default)."""
    policy = c.get("restartPolicy")
    if not init:
        return [(f"{path}.restartPolicy", "Forbidden: may not be set for non-init containers")] if policy else []
    if policy is not None and policy != "Always":
        return [(f"{path}.restartPolicy", f'Unsupported value: "{policy}": supported values: "Always"')]
    if policy is None:
        return [(f"{path}.{probe}", "Forbidden: may not be set for init containers without restartPolicy=Always")
                for probe in ("livenessProbe", "readinessProbe", "startupProbe") if probe in c]
    return []


def pod_spec_errors(spec: dict, path: str) -> list[tuple[str, str]]:
    out = []
    volumes = set()
    for i, vol in enumerate(spec.get("volumes") or []):
        name = vol.get("name", "")
        out.extend((f"{path}.volumes[{i}].name", m) for m in fmt.dns1123_label(name))
        if name in volumes:
            out.append((f"{path}.volumes[{i}].name", f"Duplicate value: {name!r}"))
        volumes.add(name)
        size = (vol.get("emptyDir") or {}).get("sizeLimit")
        if size is not None:
            out.extend((f"{path}.volumes[{i}].emptyDir.sizeLimit", m) for m in fmt.quantity(size))
    names = set()
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            out.extend(_container_errors(c, f"{path}.{kind}[{i}]", volumes))
            out.extend(_restart_policy_errors(c, f"{path}.{kind}[{i}]", init=kind == "initContainers"))
            if c.get("name") in names:
                out.append((f"{path}.{kind}[{i}].name", f"Duplicate value: {c.get('name')!r}"))
            names.add(c.get("name"))
    out.extend((f"{path}.nodeSelector", m) for _, m in fmt.labels(spec.get("nodeSelector") or {}))
    for i, tol in enumerate(spec.get("tolerations") or []):
        out.extend((f"{path}.tolerations[{i}].{f}", m) for f, m in fmt.toleration(tol))
    for key in ("serviceAccountName", "priorityClassName", "hostname", "subdomain"):
        if spec.get(key):
            check = fmt.dns1123_label if key in ("hostname", "subdomain") else fmt.dns1123_subdomain
            out.extend((f"{path}.{key}", m) for m in check(spec[key]))
    return out


def _template_errors(template: dict, path: str) -> list[tuple[str, str]]:
    return [*_meta_errors(template.get("metadata") or {}, f"{path}.metadata"),
            *pod_spec_errors(template.get("spec") or {}, f"{path}.spec")]


def child_errors(obj: dict) -> list[tuple[str, str]]:
    """Why kube-apiserver would refuse to create `obj` (a built-in kind); empty when it would accept it."""
    kind = obj.get("kind", "")
    out = schema_errors(obj)
    if out:
        return out  # the server decodes before it validates: a body that does not decode goes no further
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    name_check = {"Service": fmt.dns1035_label, "Namespace": fmt.dns1123_label}.get(kind, fmt.dns1123_subdomain)
    out.extend(_meta_errors(meta, "metadata", name_check=name_check))
    if kind == "Job" and len(meta.get("name", "")) > 63:
        out.append(("metadata.name", "must be no more than 63 characters (it becomes the job-name label)"))
    if kind in ("Deployment", "Job"):
        template = spec.get("template") or {}
        out.extend(_template_errors(template, "spec.template"))
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        out.extend(("spec.selector.matchLabels", m) for _, m in fmt.labels(selector))
        if kind == "Deployment":
            pod_labels = (template.get("metadata") or {}).get("labels") or {}
            if any(pod_labels.get(k) != v for k, v in selector.items()) or not selector:
                out.append(("spec.template.metadata.labels", "Invalid value: `selector` does not match template "
                                                             "`labels`"))
        if kind == "Job" and spec.get("completionMode") == "Indexed" and spec.get("completions") is None:
            out.append(("spec.completions", "Required value: when completion mode is Indexed"))
    if kind == "Pod":
        out.extend(pod_spec_errors(spec, "spec"))
    if kind == "Service":
        out.extend(("spec.selector", m) for _, m in fmt.labels(spec.get("selector") or {}))
        ports = spec.get("ports") or []
        names, numbers = set(), set()
        for i, port in enumerate(ports):
            if len(ports) > 1 and not port.get("name"):
                out.append((f"spec.ports[{i}].name", "Required value"))
            if port.get("name") and port["name"] in names:
                out.append((f"spec.ports[{i}].name", f"Duplicate value: {port['name']!r}"))
            number = (port.get("port"), port.get("protocol", "TCP"))
            if number in numbers:
                out.append((f"spec.ports[{i}]", f"Duplicate value: {{port: {number[0]}, protocol: {number[1]}}}"))
            names.add(port.get("name"))
            numbers.add(number)
    if kind in ("ConfigMap", "Secret"):
        for section in ("data", "binaryData", "stringData"):
            for key in obj.get(section) or {}:
                if len(key) > 253 or not re.fullmatch(_DATA_KEY, key):
                    out.append((f"{section}[{key}]", "a valid config key must consist of alphanumeric characters, "
                                                     "'-', '_' or '.'"))
    return out
