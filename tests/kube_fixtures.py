"""Test fixtures for the operator: example specs, and an in-memory world the pure state machine acts on.

The kmock-backed API server with its realism (tests/test_operator_kmock.py) builds on `RealisticKubernetes`
below; the state-machine tests use `World`, which applies a Plan's actions to plain dicts.
"""

from __future__ import annotations

import copy
import datetime as dt

from selflengthen.operator.reconcile import Observed, Plan, reconcile
from selflengthen.operator.resources import Run
from selflengthen.operator.spec import parse_spec

T0 = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)

BASE_SPEC = {
    "image": "ghcr.io/example/selflengthen:0.1.0",
    "iterations": 2,
    "models": {"base": "Qwen/Qwen2-7B-Instruct"},
    "storage": {"uri": "s3://selflengthen-artifacts/runs", "credentialsSecret": "s3-credentials"},
    "inference": {"startupTimeoutSeconds": 600},
    "retry": {"maxAttempts": 2, "backoffSeconds": 30},
    "evaluate": {"enabled": False},
}


def spec(**overrides) -> dict:
    out = copy.deepcopy(BASE_SPEC)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def make_run(spec_dict: dict | None = None, name: str = "demo", namespace: str = "ml") -> Run:
    config, cluster = parse_spec(name, spec_dict or spec())
    return Run(name=name, namespace=namespace, uid="uid-demo", config=config, cluster=cluster)


def merge(target: dict, patch: dict) -> dict:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class World:
    """Children as the API server would hold them, and the store's completion markers."""

    def __init__(self, run: Run):
        self.run = run
        self.objects: dict[tuple[str, str], dict] = {}
        self.done: set[tuple[int, str]] = set()
        self.manifests: dict[tuple[int, str], dict] = {}
        self.pods: list[dict] = []
        self.status: dict = {}
        self.now = T0
        self.created: list[str] = []
        self.events: list = []
        self.statuses: list[dict] = []  # every status emitted, in order

    def observed(self) -> Observed:
        by_kind: dict[str, dict] = {"Deployment": {}, "Service": {}, "Job": {}, "ConfigMap": {}, "Workload": {}}
        for (kind, name), obj in self.objects.items():
            by_kind[kind][name] = copy.deepcopy(obj)
        return Observed(deployments=by_kind["Deployment"], services=by_kind["Service"], jobs=by_kind["Job"],
                        config_maps=by_kind["ConfigMap"], pods=copy.deepcopy(self.pods), done=set(self.done),
                        manifests=dict(self.manifests), workloads=by_kind["Workload"])

    def step(self, advance: float = 1.0) -> Plan:
        self.now += dt.timedelta(seconds=advance)
        plan = reconcile(self.run, 1, self.status, self.observed(), self.now)
        self.check(plan)
        for action in plan.actions:
            key = (action.kind, action.name)
            if action.verb == "create":
                if key not in self.objects:  # an existing one is adopted (same deterministic name)
                    self.objects[key] = copy.deepcopy(action.body)
                    self.created.append(f"{action.kind}/{action.name}")
            elif action.verb == "patch":
                merge(self.objects[key], action.body)
            elif action.verb == "delete":
                self.objects.pop(key, None)
        self.status = plan.status
        self.events.extend(plan.events)
        return plan

    def check(self, plan: Plan) -> None:
        """Every status the state machine emits is one the API server stores as written: nothing pruned, no 422."""
        from selflengthen.operator.validation import status_problems

        problems = status_problems(plan.status)
        assert not problems, f"the API server would not store this status as written: {problems}"
        self.statuses.append(plan.status)

    def settle(self, limit: int = 10) -> Plan:
        """Reconcile until nothing more is asked for."""
        for _ in range(limit):
            plan = self.step()
            if not plan.actions:
                return plan
        raise AssertionError(f"no fixed point after {limit} reconciles: {plan.actions}")

    # -- the cluster's side

    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self.objects if k == kind)

    def ready(self, name: str) -> None:
        dep = self.objects[("Deployment", name)]
        n = dep["spec"]["replicas"]
        dep["status"] = {"replicas": n, "readyReplicas": n, "availableReplicas": n}

    def scaled_to_zero(self, name: str) -> None:
        self.objects[("Deployment", name)]["status"] = {"replicas": 0}

    def complete(self, name: str, manifest: dict | None = None) -> None:
        job = self.objects[("Job", name)]
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
        labels = job["metadata"]["labels"]
        key = (int(labels["selflengthen.io/iteration"]), labels["selflengthen.io/stage"])
        self.done.add(key)
        if manifest:
            self.manifests[key] = manifest

    def fail(self, name: str, message: str = "error: boom") -> None:
        job = self.objects[("Job", name)]
        job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}], "failed": 1}
        self.pods.append({"metadata": {"name": f"{name}-x1", "labels": {"batch.kubernetes.io/job-name": name}},
                          "status": {"phase": "Failed", "containerStatuses": [{"name": "stage", "state": {
                              "terminated": {"reason": "Error", "exitCode": 1, "message": message}}}]}})


def current_child(status: dict) -> str | None:
    k, stage = status.get("currentIteration"), status.get("stage")
    for rec in status.get("history", []):
        if rec["iteration"] == k:
            return rec["stages"].get(stage, {}).get("child")
    return None


MANIFESTS = {
    "self-instruct": {"counts": {"requested": 5000, "accepted": 4100}},
    "respond": {"counts": {"requested": 8200, "accepted": 7000}, "averageWords": 820.0},
    "extend": {"counts": {"requested": 7000, "accepted": 5200}, "averageWords": 2310.4, "averageWordsInitial": 830},
    "build-sft": {"counts": {"generator": 5200, "extender": 5200}},
    # finalLoss: the last logged step's loss; trainLoss: the Trainer's mean over the training (not what is reported)
    "train-generator": {"finalLoss": 1.23, "trainLoss": 1.5, "modelUri": "s3://selflengthen-artifacts/runs/demo/iter-01/train-generator/model"},
    "train-extender": {"finalLoss": 1.31, "trainLoss": 1.6},
    "evaluate": {"scores": {"overall": 0.71}, "averageWords": 1500},
}


def play_cluster(world: World) -> str:
    """Do what the cluster (and the stage's pods) would do next for the run's current step; returns what."""
    st = world.status
    phase, child = st.get("phase"), current_child(st)
    if phase == "Serving":
        world.ready(child)
        return f"ready {child}"
    if phase == "ScalingDown":
        for name in world.names("Deployment"):
            world.scaled_to_zero(name)
        return "scaled down"
    if phase in ("Generating", "Training", "Evaluating"):
        world.complete(child, MANIFESTS.get(st["stage"]))
        return f"complete {child}"
    raise AssertionError(f"nothing to play in phase {phase}")


def run_to_completion(world: World, limit: int = 200, before_each=None) -> list[str]:
    log = []
    for _ in range(limit):
        world.settle()
        if world.status.get("phase") in ("Succeeded", "Failed"):
            return log
        if before_each:
            before_each(world)
            world.settle()
        log.append(play_cluster(world))
    raise AssertionError("the run did not finish")


# -- kmock with the realism the operator needs ------------------------------------------------------------------------

import asyncio  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import uuid  # noqa: E402

import attrs  # noqa: E402
import kmock  # noqa: E402
from kmock._internal import enums as _kmock_enums  # noqa: E402
from kmock._internal.dicts import patch_dict as _patch_dict  # noqa: E402

_WRITES = (_kmock_enums.action.CREATE, _kmock_enums.action.UPDATE, _kmock_enums.action.DELETE)


@attrs.frozen
class Write:
    """A write the API server accepted."""

    action: str  # CREATE | UPDATE | DELETE
    plural: str
    name: str | None
    subresource: str | None
    body: object
    who: str  # the client's bearer token ("" without one)


def token_of(headers) -> str:
    auth = headers.get("Authorization") or ""
    return auth.removeprefix("Bearer ").strip()


_SELECTOR = re.compile(r"\s*(!?)([\w./-]+)(?:\s*(==|=|!=)\s*([\w.-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*")


def _pointer(doc, path: str):
    for part in path.strip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict):
            doc = doc.get(part)
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


def parse_selector(text: str) -> list[tuple[str, str, set[str]]]:
    """A label selector ('a=b,c!=d,e in (x,y),!f,g') as (key, operator, values)."""
    terms, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _SELECTOR.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad label selector {text!r}")
        neg, key, op, value, setop, values = m.groups()
        if neg:
            terms.append((key, "!exists", set()))
        elif op:
            terms.append((key, "!=" if op == "!=" else "=", {value}))
        elif setop:
            terms.append((key, setop, {v.strip() for v in values.split(",") if v.strip()}))
        else:
            terms.append((key, "exists", set()))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ValueError(f"bad label selector {text!r}")
            pos += 1
    return terms


def selector_matches(labels: dict, text: str | None) -> bool:
    if not text:
        return True
    for key, op, values in parse_selector(text):
        value = labels.get(key)
        ok = {"exists": value is not None, "!exists": value is None, "=": value in values,
              "!=": value not in values, "in": value in values, "notin": value not in values}[op]
        if not ok:
            return False
    return True


@attrs.define(kw_only=True)
class RealisticKubernetes(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server does that the operator relies on:

    - metadata stamped on writes: uid, creationTimestamp, generation (bumped on spec changes only) and an
      increasing resourceVersion; metadata.generateName honoured; the URL's namespace put into the object;
    - status subresources: the main resource ignores status changes, /status changes only status;
    - list and watch filtered by ?labelSelector=.

    And what fault tests need (tests/reliability/test_operator_faults.py):

    - `log`: every write that landed (`Write`: action, resource, name, subresource, body, and the bearer token
      of the client that sent it, so that tests tell operator replicas apart);
    - `after_write(write)`: called once a write has landed; raising a kmock.KubernetesError from it answers the
      client with that error although the write stays (a reply lost on the way back);
    - `blocked`: tokens whose requests are refused (503) before they touch anything: a replica whose process died.
    """

    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1000), init=False)
    status_subresources: set = attrs.field(factory=set, init=False)
    strict_resources: set = attrs.field(factory=set, init=False)  # validated like kube-apiserver (_admit_run)
    unchecked: set = attrs.field(factory=set, init=False)  # names of runs whose next create skips the CEL rules
    refused: list = attrs.field(factory=list, init=False)  # (kind, name, causes) of every child create refused
    lists: list = attrs.field(factory=list, init=False)  # (plural, query parameters) of every list request
    watches: list = attrs.field(factory=list, init=False)  # ... and of every watch request
    # admission the cluster adds (ValidatingAdmissionPolicies, webhooks, quotas): policy(kind, obj) -> None to
    # admit, or (code, message) to refuse (422 as a ValidatingAdmissionPolicy denies, 403 as a quota or webhook)
    policies: list = attrs.field(factory=list, init=False)

    def register_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            key = f"{spec['group']}/{version['name']}/{spec['names']['plural']}"
            self.resources[key] = kmock.ResourceInfo(
                kind=spec["names"]["kind"], singular=spec["names"]["singular"],
                namespaced=spec["scope"] == "Namespaced", shortnames=set(spec["names"].get("shortNames", [])),
                categories=set(spec["names"].get("categories", [])),
                verbs={"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
                subresources=set(version.get("subresources", {})))
            if spec["names"]["plural"] == "selflengthenruns":
                self.strict_resources.add(kmock.resource(spec["group"], version["name"], spec["names"]["plural"]))
            if "status" in version.get("subresources", {}):
                self.status_subresources.add(kmock.resource(spec["group"], version["name"], spec["names"]["plural"]))

    # -- SelfLengthenRun as kube-apiserver handles a structural CRD ----------------------------------------------

    def _admit_run(self, request) -> None:
        """Create, update, patch and /status writes of a SelfLengthenRun: the object after the write is pruned of
        undeclared fields (silently; refused with ?fieldValidation=Strict), defaulted, validated against the
        openAPIV3Schema and its CEL rules (transition rules against the old object); a refusal is a 422 Status
        listing the causes. The write then lands as the merge patch from the stored object to that result."""
        from selflengthen.operator.validation import admit, root_schema, unknown_fields

        data, sub = request.data, request.subresource
        creating = request.action == _kmock_enums.action.CREATE
        current = None if creating else self._current(request)
        if not creating and current is None:
            return  # kmock answers 404
        if creating:
            after = copy.deepcopy(data) if isinstance(data, dict) else {}
            after.pop("status", None)  # the status subresource: a create sets no status
        elif isinstance(data, dict):
            kept = {"status": data.get("status")} if sub == "status" else {k: v for k, v in data.items()
                                                                            if k != "status"}
            after = dict(_patch_dict(current, kept))
        else:
            for op in data:  # optimistic concurrency: a failed test is 422, as the API server says
                if op.get("op") == "test" and _pointer(current, op["path"]) != op.get("value"):
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=f"the test of {op['path']} "
                                                f"failed: {op.get('value')!r} wanted")
            patched = dict(_patch_dict(current, data))
            after = {**current, "status": patched.get("status")} if sub == "status" else \
                {**patched, "status": current.get("status")}
            if after.get("status") is None:
                after.pop("status")
        after = copy.deepcopy(after)
        meta = after.setdefault("metadata", {})
        name = meta.get("name") or meta.get("generateName", "")
        if request.params.get("fieldValidation") == "Strict":
            unknown = unknown_fields(root_schema(), after)
            if unknown:
                raise _invalid(request, name, [(f, "FieldValueInvalid", "unknown field") for f in unknown],
                               reason="BadRequest", status=400)
        final, errors = admit(after, current, prune_unknown=True, ratchet=not creating)
        if creating and name in self.unchecked:  # a run an older CRD admitted (its rules were not these yet)
            self.unchecked.discard(name)
            errors = [e for e in errors if "Unsupported value" in e or "Required value" in e]
        if errors:
            raise _invalid(request, name, [_cause(e) for e in errors])
        meta = final["metadata"]
        if creating:
            if request.namespace:
                meta["namespace"] = request.namespace
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1,
                        creationTimestamp=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            data.clear()
            data.update(final)
            return
        for immutable in ("uid", "creationTimestamp", "generation", "name", "namespace"):
            if immutable in current["metadata"]:
                meta[immutable] = current["metadata"][immutable]
        meta["resourceVersion"] = str(next(self._versions))
        if final.get("spec") != current.get("spec"):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        object.__setattr__(request, "data", merge_diff(current, final))

    def _admit_child(self, request) -> None:
        """A built-in object is created only when kube-apiserver would accept it (tests/kube_admission.py: the
        official schema, strict, and the server's own checks); apiVersion and kind default from the URL."""
        from kube_admission import child_errors

        res, data = request.resource, request.data
        kind = BUILTIN_KINDS.get((res.group, res.plural))
        if kind is None:
            return
        data.setdefault("apiVersion", f"{res.group}/{res.version}" if res.group else res.version)
        data.setdefault("kind", kind)
        if request.namespace and kind != "Namespace":
            data.setdefault("metadata", {}).setdefault("namespace", request.namespace)
        meta = data.get("metadata") or {}
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "x" * 5  # as long as the name the server will make
        errors = child_errors(data)
        if meta.get("name") == meta.get("generateName", "") + "x" * 5:
            meta.pop("name")
        if errors:
            self.refused.append((kind, meta.get("name") or meta.get("generateName"), errors))
            raise _invalid(request, meta.get("name") or "", [(f, "FieldValueInvalid", m) for f, m in errors],
                           kind=kind)
        for policy in self.policies:
            refusal = policy(kind, data)
            if refusal:
                code, message = refusal
                self.refused.append((kind, meta.get("name"), [("", message)]))
                raise kmock.KubernetesError(status=code, reason={403: "Forbidden", 422: "Invalid"}.get(code, "Error"),
                                            message=message, details={"name": meta.get("name"), "kind": kind})

    def _has_status(self, resource) -> bool:
        return resource in self.status_subresources or (
            resource.group in ("apps", "batch") or (resource.group == "" and resource.plural in ("pods", "services")))

    def _current(self, request):
        key = (request.resource, request.namespace, request.name)
        obj = self.objects.get(key) if hasattr(self.objects, "get") else None
        if obj is None:
            try:
                obj = self.objects[key]
            except (KeyError, IndexError, TypeError):
                return None
        return None if obj.deleted else obj.raw

    # kmock keeps every request and matches each new one against all of them (quadratic); a run makes thousands.
    # Only a recent window is kept (far more than ever run concurrently); `log` keeps what tests assert on.
    request_window: int = 32
    log: list = attrs.field(factory=list, init=False)
    after_write: object = attrs.field(default=None, init=False)
    blocked: set = attrs.field(factory=set, init=False)

    async def _handle(self, request):
        if len(self._requests) > self.request_window:
            del self._requests[: -self.request_window // 2]
        who = token_of(request.headers)
        if who and who in self.blocked:
            return await self._render_error(kmock.KubernetesError(
                status=503, reason="ServiceUnavailable", message="this client is gone (blocked by the test)"))
        response = await self._handle_realistically(request)
        if request.resource is not None and request.action in _WRITES and response.status < 400:
            name = request.name or ((request.data or {}).get("metadata") or {}).get("name") \
                if isinstance(request.data, dict) or request.name else request.name
            write = Write(request.action.name, request.resource.plural, name, request.subresource,
                          copy.deepcopy(request.data), who)
            self.log.append(write)
            if self.after_write is not None:
                try:
                    self.after_write(write)
                except kmock.KubernetesError as exc:
                    return await self._render_error(exc)
        return response

    def _check_workload_write(self, request) -> None:
        """Kueue's webhook on a Workload update: of its spec only `active` may change (podSets, queueName and the
        rest are immutable once Kueue made it), so a client that rewrites more is refused as Kueue refuses it."""
        res, data = request.resource, request.data
        if res is None or res.group != "kueue.x-k8s.io" or res.plural != "workloads" or \
                request.action != _kmock_enums.action.UPDATE or request.subresource or not isinstance(data, dict):
            return
        changed = sorted(set(data.get("spec") or {}) - {"active"})
        if changed:
            raise _invalid(request, request.name or "", [(f"spec.{f}", "FieldValueInvalid", "field is immutable")
                                                         for f in changed], kind="Workload")

    async def _handle_realistically(self, request):
        self._check_workload_write(request)
        if request.resource is not None and request.resource in self.strict_resources and \
                request.action in (_kmock_enums.action.CREATE, _kmock_enums.action.UPDATE):
            self._admit_run(request)
            return await super()._handle(request)
        data = request.data
        if request.resource is not None and request.action == _kmock_enums.action.CREATE and isinstance(data, dict):
            self._admit_child(request)
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace:
                meta["namespace"] = request.namespace
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1,
                        creationTimestamp=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            if self._has_status(request.resource) and request.resource in self.status_subresources:
                data.pop("status", None)
        elif (request.resource is not None and request.action == _kmock_enums.action.UPDATE
              and request.name is not None):
            current = self._current(request)
            if current is not None:
                sub = request.subresource
                if isinstance(data, dict):
                    if request.resource in self.status_subresources:
                        kept = {"status": data.get("status")} if sub == "status" else {
                            k: v for k, v in data.items() if k != "status"}
                        data.clear()
                        data.update(kept)
                    meta = data.setdefault("metadata", {}) if isinstance(data.get("metadata"), dict) or \
                        "metadata" not in data else data["metadata"]
                    for immutable in ("uid", "creationTimestamp", "generation", "name", "namespace"):
                        meta.pop(immutable, None)
                    after = _patch_dict(current, data)
                    meta["resourceVersion"] = str(next(self._versions))
                    if after.get("spec") != current.get("spec"):
                        meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
                elif isinstance(data, list):
                    for op in data:  # optimistic concurrency: a failed test is 422, as the API server says
                        if op.get("op") == "test" and _pointer(current, op["path"]) != op.get("value"):
                            raise kmock.KubernetesError(
                                status=422, reason="Invalid",
                                message=f"the test of {op['path']} failed: {op.get('value')!r} wanted")
                    after = _patch_dict(current, data)
                    data.append({"op": "add", "path": "/metadata/resourceVersion",
                                 "value": str(next(self._versions))})
                    if after.get("spec") != current.get("spec"):
                        data.append({"op": "add", "path": "/metadata/generation",
                                     "value": int(current["metadata"].get("generation", 1)) + 1})
        return await super()._handle(request)

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        sel = request.params.get("labelSelector")
        result["items"] = [o for o in result["items"]
                           if selector_matches((o.get("metadata") or {}).get("labels") or {}, sel)]
        result["metadata"]["resourceVersion"] = str(next(self._versions))
        self.lists.append((request.resource.plural, dict(request.params)))
        limit = int(request.params.get("limit") or 0)
        if limit > 0:  # chunked: ?limit=N&continue=TOKEN (the token is our offset)
            start = int(request.params.get("continue") or 0)
            items = sorted(result["items"], key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
            result["items"] = items[start:start + limit]
            if start + limit < len(items):
                result["metadata"]["continue"] = str(start + limit)
                result["metadata"]["remainingItemCount"] = len(items) - start - limit
        return result

    async def _serve_watch(self, request):
        sel = request.params.get("labelSelector")
        self.watches.append((request.resource.plural, dict(request.params)))
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and "object" in event and not selector_matches(
                    (event["object"].get("metadata") or {}).get("labels") or {}, sel):
                continue
            yield event


def merge_diff(old: dict, new: dict) -> dict:
    """The JSON merge patch that turns `old` into `new` (lists replace, a removed key is null)."""
    patch: dict = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = merge_diff(old[key], value)
            if sub:
                patch[key] = sub
        elif key not in old or old[key] != value:
            patch[key] = copy.deepcopy(value)
    return patch


_CAUSE_REASONS = (("Required value", "FieldValueRequired"), ("unknown field", "FieldValueInvalid"),
                  ("Unsupported value", "FieldValueNotSupported"))


def _cause(error: str) -> tuple[str, str, str]:
    field, _, message = error.partition(": ")
    reason = next((r for text, r in _CAUSE_REASONS if text in message), "FieldValueInvalid")
    return field, reason, message


BUILTIN_KINDS = {("", "configmaps"): "ConfigMap", ("", "services"): "Service", ("", "pods"): "Pod",
                 ("", "secrets"): "Secret", ("", "events"): "Event", ("", "namespaces"): "Namespace",
                 ("apps", "deployments"): "Deployment", ("batch", "jobs"): "Job"}


def _invalid(request, name: str, causes: list[tuple[str, str, str]], *, reason: str = "Invalid",
             status: int = 422, kind: str | None = None) -> kmock.KubernetesError:
    """The Status an API server answers a refused write with: `Kind.group "name" is invalid: [causes]`."""
    info = request.resource
    kind = kind or {"selflengthenruns": "SelfLengthenRun"}.get(info.plural, info.plural)
    qualified = f"{kind}.{info.group}" if info.group else kind
    listed = ", ".join(f"{f}: {m}" for f, _, m in causes)
    return kmock.KubernetesError(
        status=status, reason=reason, message=f'{qualified} "{name}" is invalid: [{listed}]',
        details={"name": name, "group": info.group, "kind": kind,
                 "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]})


def parse_path(path: str):
    """kmock's path parser, fixed for the namespaces resource itself: /api/v1/namespaces[/NAME] (it reads
    `namespaces` as the start of a namespaced path and fails on the list of namespaces kopf asks for)."""
    from kmock._internal import parsing

    parts = path.strip("/").split("/")
    if len(parts) in (3, 4) and parts[:3] == ["api", "v1", "namespaces"]:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _original_parse_path(path)


from kmock._internal import parsing as _parsing  # noqa: E402

_original_parse_path = _parsing.parse_path


# -- the operator against kmock: the test's hands on the API server, and operator replicas --------------------------

import contextlib  # noqa: E402
import threading  # noqa: E402

import aiohttp  # noqa: E402
import kopf  # noqa: E402

NS = "ml"
RUNS_PATH = f"/apis/selflengthen.io/v1alpha1/namespaces/{NS}/selflengthenruns"
PATHS = {
    "Job": f"/apis/batch/v1/namespaces/{NS}/jobs",
    "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments",
    "Service": f"/api/v1/namespaces/{NS}/services",
    "ConfigMap": f"/api/v1/namespaces/{NS}/configmaps",
    "Pod": f"/api/v1/namespaces/{NS}/pods",
    "Event": f"/api/v1/namespaces/{NS}/events",
    "Secret": f"/api/v1/namespaces/{NS}/secrets",
    "KopfPeering": f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings",
    "Workload": f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{NS}/workloads",
}
QUEUE_LABEL, JOB_UID_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/job-uid"
# Kueue's Workload resource as its CRD declares it (the parts the tests touch: names, scope, status subresource)
WORKLOAD_CRD = {"spec": {"group": "kueue.x-k8s.io", "scope": "Namespaced",
                         "names": {"kind": "Workload", "plural": "workloads", "singular": "workload"},
                         "versions": [{"name": "v1beta1", "subresources": {"status": {}}}]}}
CHILD_PLURALS = ("configmaps", "services", "deployments", "jobs")
MERGE = {"Content-Type": "application/merge-patch+json"}


class MemoryProbe:
    """The artifact store as the operator reads it: completion markers and manifests, per (iteration, stage)."""

    def __init__(self):
        self.markers: dict[tuple[int, str], dict] = {}
        self.deleted = False

    def done(self, iteration, stage):
        return (iteration, stage) in self.markers

    def manifest(self, iteration, stage):
        return self.markers.get((iteration, stage))

    def delete_run(self):
        count = len(self.markers)
        self.markers.clear()
        self.deleted = True
        return count


async def prepare_api(k8s) -> None:
    """Discovery of the built-ins, our CRD and kopf's peering CRDs, and the namespace the tests use."""
    from kube_admission import warm

    from selflengthen.operator.crd import crd
    from selflengthen.operator.deploy import peering_crds

    warm({kind: f"{group}/v1" if group else "v1" for (group, _), kind in BUILTIN_KINDS.items()})
    k8s.resources.load_bundled()
    k8s.register_crd(crd())
    for peering in peering_crds():
        k8s.register_crd(peering)
    k8s.register_crd(WORKLOAD_CRD)
    async with aiohttp.ClientSession(base_url=str(k8s.url)) as session:
        async with session.post("/api/v1/namespaces", json={"metadata": {"name": NS}}) as rsp:
            assert rsp.status < 400


@contextlib.asynccontextmanager
async def prepared_cluster(k8s, monkeypatch, probe: MemoryProbe | None = None):
    """The test's hands (a Cluster) on kmock's API server `k8s`, prepared as prepare_api does, with kmock's path
    parser fixed (parse_path) for the test."""
    from kmock._internal import parsing

    monkeypatch.setattr(parsing, "parse_path", parse_path)
    await prepare_api(k8s)
    async with aiohttp.ClientSession(base_url=str(k8s.url)) as session:
        yield Cluster(k8s, session, probe)


class Cluster:
    """The test's hands on the API server: apply runs, read them, and play the cluster's controllers and pods."""

    def __init__(self, k8s, session: aiohttp.ClientSession, probe: MemoryProbe | None = None, store=None):
        """`store`: a pipeline Store the "pods" write their completion markers to (else the MemoryProbe)."""
        self.k8s, self.http, self.probe, self.store = k8s, session, probe or MemoryProbe(), store

    async def request(self, method: str, path: str, body=None, headers=None, ok=(200, 201)):
        async with self.http.request(method, path, json=body, headers=headers) as rsp:
            data = await rsp.json(content_type=None)
            assert rsp.status in ok or rsp.status < 400, (method, path, rsp.status, data)
            return data if rsp.status < 400 else None

    async def apply(self, name: str, run_spec: dict, *, admitted_by_older_crd: bool = False) -> dict:
        """Create a run; `admitted_by_older_crd`: as a CRD without today's CEL rules would have admitted it (the
        schema's types still hold), so that the operator's own checks are what refuses it."""
        if admitted_by_older_crd:
            self.k8s.unchecked.add(name)
        return await self.request("POST", RUNS_PATH, {"apiVersion": "selflengthen.io/v1alpha1",
                                                      "kind": "SelfLengthenRun", "metadata": {"name": name},
                                                      "spec": run_spec})

    async def run(self, name: str = "demo") -> dict | None:
        return await self.request("GET", f"{RUNS_PATH}/{name}", ok=(404,))

    async def status(self, name: str = "demo") -> dict:
        return ((await self.run(name)) or {}).get("status") or {}

    async def items(self, kind: str) -> list[dict]:
        return (await self.request("GET", PATHS[kind]))["items"]

    async def names(self, kind: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in await self.items(kind))

    async def get(self, kind: str, name: str) -> dict | None:
        return await self.request("GET", f"{PATHS[kind]}/{name}", ok=(404,))

    async def patch(self, kind: str, name: str, body: dict, sub: str | None = None) -> dict | None:
        return await self.request("PATCH", f"{PATHS[kind]}/{name}" + (f"/{sub}" if sub else ""), body, MERGE,
                                  ok=(404,))

    async def patch_run(self, body: dict, sub: str | None = None, name: str = "demo") -> dict | None:
        return await self.request("PATCH", f"{RUNS_PATH}/{name}" + (f"/{sub}" if sub else ""), body, MERGE)

    async def events(self) -> list[dict]:
        return await self.items("Event")

    async def wait(self, predicate, what: str, timeout: float = 15.0, name: str = "demo") -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            st = await self.status(name)
            if predicate(st):
                return st
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {st}")
            await asyncio.sleep(0.05)

    async def until(self, predicate, what: str, timeout: float = 15.0, name: str = "demo"):
        """Poll `await predicate()` until it is true, and return it; the timeout only bounds a failing test."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (result := await predicate()):
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {await self.status(name)}")
            await asyncio.sleep(0.05)
        return result

    # -- the cluster's part (each idempotent: doing it twice is doing it once)

    async def ready(self, name: str) -> bool:
        dep = await self.get("Deployment", name)
        if dep is None:
            return False
        n = dep["spec"]["replicas"]
        await self.patch("Deployment", name, {"status": {"replicas": n, "readyReplicas": n, "availableReplicas": n}},
                         "status")
        return True

    async def complete(self, name: str, manifest: dict | None = None) -> bool:
        job = await self.get("Job", name)
        if job is None:
            return False
        labels = job["metadata"]["labels"]
        key = (int(labels["selflengthen.io/iteration"]), labels["selflengthen.io/stage"])
        # the pod wrote manifest.json and _SUCCESS
        if self.store is not None:
            from selflengthen.pipeline.artifacts import StageArtifacts

            artifacts = StageArtifacts(self.store, labels["selflengthen.io/run"], *key)
            await asyncio.to_thread(artifacts.finish, manifest or {})
        else:
            self.probe.markers[key] = manifest or {"stage": key[1]}
        await self.patch("Job", name, {"status": {"succeeded": 1, "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}}, "status")
        return True

    async def fail(self, name: str, message: str) -> None:
        """A stage pod exits 1 with `message` as its termination message; the Job controller fails the Job."""
        job = await self.get("Job", name)
        labels = dict(job["spec"]["template"]["metadata"]["labels"], **{"batch.kubernetes.io/job-name": name})
        await self.request("POST", PATHS["Pod"], {"metadata": {"name": f"{name}-abcde", "labels": labels},
                                                  "spec": {"containers": [{"name": "stage", "image": "x"}]}})
        await self.patch("Pod", f"{name}-abcde", {"status": {"phase": "Failed", "containerStatuses": [{
            "name": "stage", "state": {"terminated": {"reason": "Error", "exitCode": 1, "message": message}}}]}},
            "status")
        await self.patch("Job", name, {"status": {"failed": 1, "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"}]}}, "status")

    async def kueue(self) -> list[str]:
        """One pass of Kueue's Job integration, with a queue that has room for everything: each Job labelled with
        a queue gets a Workload (named job-<job>-<hash>, labelled with the Job's UID, owned by the Job); an active
        Workload is admitted and its Job unsuspended (also when someone else suspended it: Kueue starts an
        admitted Job again); a deactivated one (spec.active false) is evicted and its Job suspended. Returns what
        it did."""
        done = []
        workloads = await self.items("Workload")
        for job in await self.items("Job"):
            meta = job["metadata"]
            queue = (meta.get("labels") or {}).get(QUEUE_LABEL)
            conditions = {c["type"] for c in (job.get("status") or {}).get("conditions") or []
                          if c.get("status") == "True"}
            if not queue or conditions & {"Complete", "Failed"} or meta.get("deletionTimestamp"):
                continue
            wl = next((w for w in workloads if (w["metadata"].get("labels") or {}).get(JOB_UID_LABEL) == meta["uid"]),
                      None)
            if wl is None:
                wl = await self.request("POST", PATHS["Workload"], {
                    "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                    "metadata": {"name": f"job-{meta['name']}-{meta['uid'][:5]}",
                                 "labels": {JOB_UID_LABEL: meta["uid"]},
                                 "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                      "uid": meta["uid"], "controller": True,
                                                      "blockOwnerDeletion": True}]},
                    "spec": {"queueName": queue, "active": True, "podSets": [
                        {"name": "main", "count": job["spec"].get("parallelism", 1)}]}})
                done.append(f"workload {wl['metadata']['name']}")
            active = (wl.get("spec") or {}).get("active", True)
            suspended = bool(job["spec"].get("suspend"))
            if active and suspended:
                await self.patch("Workload", wl["metadata"]["name"], {"status": {"conditions": [
                    {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"},
                    {"type": "Admitted", "status": "True", "reason": "Admitted"}]}}, "status")
                await self.patch("Job", meta["name"], {"spec": {"suspend": False}})
                done.append(f"admitted {meta['name']}")
            elif not active and not suspended:
                await self.patch("Workload", wl["metadata"]["name"], {"status": {"conditions": [
                    {"type": "Evicted", "status": "True", "reason": "InactiveWorkload"},
                    {"type": "Admitted", "status": "False", "reason": "NoReservation"}]}}, "status")
                await self.patch("Job", meta["name"], {"spec": {"suspend": True}})
                done.append(f"evicted {meta['name']}")
        return done

    async def scale_down(self) -> None:
        for dep in await self.names("Deployment"):
            await self.patch("Deployment", dep, {"status": {"replicas": 0, "readyReplicas": 0}}, "status")

    async def play_once(self, name: str = "demo") -> str | None:
        """The cluster's next part for the run's current step, without waiting for the operator; None when there
        is nothing to do yet (the child the status names does not exist)."""
        st = await self.status(name)
        phase, child = st.get("phase"), current_child(st)
        if phase == "Serving" and child and await self.ready(child):
            return f"ready {child}"
        if phase == "ScalingDown":
            await self.scale_down()
            return "scaled down"
        if phase in ("Generating", "Training", "Evaluating") and child and \
                await self.complete(child, MANIFESTS.get(st["stage"])):
            return f"complete {child}"
        return None

    async def play(self, name: str = "demo") -> str:
        """The cluster's next part, then wait until the operator moved on."""
        st = await self.status(name)
        before = (st.get("phase"), current_child(st))
        done = await self.play_once(name)
        assert done, f"nothing to play: {st}"
        await self.wait(lambda s: (s.get("phase"), current_child(s)) != before, f"progress after {done}", name=name)
        return done

    # -- what the API server was asked

    def created(self, kind_plural: str, who: str | None = None) -> list[str]:
        """Names created of a resource (plural), in order; a duplicate would show a child made twice."""
        return [w.name for w in self.k8s.log if w.action == "CREATE" and w.plural == kind_plural
                and (who is None or w.who == who)]


def fast_settings(settings: kopf.OperatorSettings) -> None:
    settings.watching.reconnect_backoff = 0.1
    settings.queueing.idle_timeout = 1.0
    settings.queueing.exit_timeout = 1.0
    settings.posting.enabled = False  # kopf's own events; ours are posted by the operator itself
    # kopf retries its own failed API calls (a crashed replica's last keep-alive among them) this often
    settings.networking.error_backoffs = [0.05, 0.1, 0.2]


class Replica:
    """One operator process: kopf in its own thread and event loop, logging in with its own bearer token.

    Its own loop, because kopf cancels every task of its loop created after it started when it stops: two
    replicas in one loop would take each other down, and a stopped one the API server's request handlers.
    `kill()` is a crash: the API server refuses the replica's requests from that moment (nothing it still has in
    flight lands), then its task is cancelled. `stop()` is a graceful SIGTERM."""

    def __init__(self, cluster: Cluster, token: str, *, poll: float = 0.3, peering: str | None = None,
                 priority: int = 0, probe=None, configure=None, metrics=None, clusterwide: bool = False):
        """`clusterwide`: serve every namespace (else only NS)."""
        self.cluster, self.token, self.poll, self.metrics = cluster, token, poll, metrics
        self.peering, self.priority, self.clusterwide = peering, priority, clusterwide
        self.probe, self.configure = probe, configure
        self.controller = None
        self.ready_flag = threading.Event()
        self.stop_flag: asyncio.Event | None = None  # of the replica's loop (kopf waits for a threading.Event in
        # an executor thread, which a cancelled loop would then wait for at its shutdown)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    async def _main(self) -> None:
        from selflengthen.operator.handlers import OperatorOptions, build_registry

        async def memory_probe(kube, run):
            return self.cluster.probe

        def configure(settings):
            fast_settings(settings)
            if self.configure:
                self.configure(settings)

        url = str(self.cluster.k8s.url)
        options = OperatorOptions(poll_seconds=self.poll, configure=configure, probe=self.probe or memory_probe,
                                  login=lambda **_: kopf.ConnectionInfo(server=url, token=self.token),
                                  metrics=self.metrics)
        registry, self.controller = build_registry(options)
        peering = {"peering_name": self.peering, "priority": self.priority} if self.peering else {"standalone": True}
        self.loop, self.task, self.stop_flag = asyncio.get_running_loop(), asyncio.current_task(), asyncio.Event()
        await kopf.operator(registry=registry, clusterwide=self.clusterwide,
                            namespaces=[] if self.clusterwide else [NS], stop_flag=self.stop_flag,
                            ready_flag=self.ready_flag, identity=self.token, **peering)

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except asyncio.CancelledError:
            pass  # killed
        except BaseException as exc:  # reported by start() or stop()
            self.error = exc
            self.ready_flag.set()

    async def start(self) -> Replica:
        self.thread = threading.Thread(target=self._thread, name=f"operator-{self.token}", daemon=True)
        self.thread.start()
        assert await asyncio.to_thread(self.ready_flag.wait, 10), f"{self.token} did not start"
        if self.error:
            raise self.error
        return self

    def crash_now(self) -> None:
        """The synchronous part of a crash (safe to call from the API server's request handling)."""
        self.cluster.k8s.blocked.add(self.token)
        if self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)

    @property
    def crashed(self) -> bool:
        return self.token in self.cluster.k8s.blocked

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def kill(self) -> None:
        self.crash_now()
        await self.wait_gone()

    async def wait_gone(self) -> None:
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 30)
            assert not self.thread.is_alive(), f"{self.token} did not go away"

    async def stop(self) -> None:
        if self.running and self.loop is not None and self.stop_flag is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: it is gone already
                self.loop.call_soon_threadsafe(self.stop_flag.set)
        await self.wait_gone()
        if self.error:
            raise self.error


@contextlib.asynccontextmanager
async def operator(cluster: Cluster, identity: str = "replica-0", **kwargs):
    """One replica for the block; it logs in with the token `identity`."""
    replica = await Replica(cluster, identity, **kwargs).start()
    try:
        yield replica
    finally:
        if replica.crashed:
            await replica.wait_gone()
        else:
            await replica.stop()
