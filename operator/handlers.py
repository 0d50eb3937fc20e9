"""The kopf side: thin handlers around the state machine (operator/reconcile.py).

- One daemon per SelfLengthenRun: observe (children by label, store markers), `reconcile`, apply the actions,
  write the status, post the events; then sleep until a child of the run changes (on.event of Jobs, Deployments
  and pods wakes it), the run itself changes, a timer of the state machine is due, or the poll interval passes.
  kopf starts the daemons of existing runs when the operator starts, so a restart resumes every run.
- on.delete (a finalizer): delete every child (their pods and GPUs with them), and the S3 artifacts only when
  `retention.artifacts: Delete`.
- on.login: the same credentials for kopf and for our own client; on.probe for the liveness endpoint.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import kopf

from ..pipeline.config import ConfigError
from ..pipeline.metrics import Metrics, metrics
from ..pipeline.urls import redact, redact_log_records
from .crd import API_VERSION, GROUP, KIND, PLURAL, VERSION
from .kube import (
    BY_KIND,
    CONFIGMAPS,
    DEPLOYMENTS,
    EVENTS,
    JOB_UID_LABEL,
    JOBS,
    PODS,
    SERVICES,
    WORKLOADS,
    ApiError,
    Kube,
    Resource,
)
from .probe import Probe, store_probe
from .reconcile import (
    Action,
    Event,
    Observed,
    Plan,
    child_rejected,
    cleanup_actions,
    invalid_spec,
    job_complete,
    job_failed,
    reconcile,
)
from .resources import LABEL_RUN, MANAGED_BY, Run, selector
from .spec import may_overlap, parse_spec, run_steps

log = logging.getLogger("selflengthen.operator")
RUNS = Resource(GROUP, VERSION, PLURAL, KIND)
FINALIZER = "selflengthen.io/finalizer"
COMPONENT = "selflengthen-operator"
# The children whose changes wake their run's daemon; kopf watches them with this server-side label selector.
WATCHED_CHILDREN = (("batch", "v1", "jobs"), ("apps", "v1", "deployments"), ("", "v1", "pods"))
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
LIST_CHUNK = 500
FINISHED_PHASES = ("Succeeded", "Failed")
# Answers to a create that mean "not this object" (not "not now"): 400 BadRequest, 403 Forbidden (admission
# webhooks, quotas, policies), 422 Invalid; the state machine records them (reconcile.child_rejected).
REFUSALS = (400, 403, 422)
QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def default_login(**kwargs) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


async def default_probe(kube: Kube, run: Run) -> Probe:
    return await store_probe(kube, run)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class OperatorOptions:
    poll_seconds: float = 30.0
    login: Callable[..., kopf.ConnectionInfo | None] = default_login
    probe: Callable[[Kube, Run], Awaitable[Probe]] = default_probe
    clock: Callable[[], dt.datetime] = utcnow
    # kopf settings applied at startup (tests shorten timeouts here)
    configure: Callable[[kopf.OperatorSettings], None] | None = None
    metrics: Metrics | None = None  # default: the process-wide registry (served by --metrics-port)


@dataclass
class Controller:
    options: OperatorOptions
    kube: Kube | None = None
    credentials: kopf.ConnectionInfo | None = None
    wakers: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    reconciles: int = 0
    written: dict[tuple[str, str], str] = field(default_factory=dict)  # resourceVersion of our last status write
    finished: dict[tuple[str, str], bool] = field(default_factory=dict)  # runs Succeeded or Failed, at rest
    # one store client per run and store (not one per reconcile); dropped when reading the store fails (rotated
    # credentials, a moved endpoint), so the next reconcile opens it again
    probes: dict[tuple[str, str], tuple[tuple, Probe]] = field(default_factory=dict)

    @property
    def metrics(self) -> Metrics:
        return self.options.metrics or metrics()

    def record_metrics(self, namespace: str, name: str, old: dict, new: dict) -> None:
        """The run's series from its status (so they survive operator restarts): phase, iteration, stage, and
        what changed since the last status: attempts started, failures by reason, stage durations."""
        m = self.metrics
        m.set_run(name, namespace, phase=new.get("phase") or "Pending", iteration=new.get("currentIteration") or 0,
                  iterations=new.get("iterations") or 0, stage=new.get("stage") or None)
        before = {(r.get("iteration"), s): rec for r in old.get("history") or []
                  for s, rec in (r.get("stages") or {}).items()}
        for r in new.get("history") or []:
            stages = r.get("stages") or {}
            for stage, rec in stages.items():
                prev = before.get((r.get("iteration"), stage)) or {}
                if rec.get("attempts", 0) > prev.get("attempts", 0):
                    m.stage_attempts.labels(run=name, namespace=namespace, stage=stage).inc(
                        rec["attempts"] - prev.get("attempts", 0))
                seen = {f.get("attempt") for f in prev.get("failures") or []}
                for f in rec.get("failures") or []:
                    if f.get("attempt") not in seen:
                        m.stage_failures.labels(run=name, namespace=namespace, stage=stage, reason=f["reason"]).inc()
                if rec.get("state") == "Succeeded" != prev.get("state") and "durationSeconds" in rec:
                    m.stage_seconds.labels(run=name, stage=stage).observe(rec["durationSeconds"])
            # the records keep the manifests' results under their own keys: the metrics read them as they read manifests
            m.set_iteration(name, namespace, int(r.get("iteration") or 0), stages)

    def client(self) -> Kube:
        if self.kube is None:
            self.kube = Kube(lambda: self.credentials)
        return self.kube

    def waker(self, namespace: str, name: str) -> asyncio.Event:
        return self.wakers.setdefault((namespace, name), asyncio.Event())

    def wake(self, namespace: str | None, name: str | None) -> None:
        if namespace and name and (namespace, name) in self.wakers:
            self.wakers[(namespace, name)].set()

    # ---- observing

    async def observe(self, run: Run, status: dict, logger: logging.Logger) -> Observed:
        kube = self.client()
        sel = selector(run.name)
        deps, svcs, jobs, cms, pods = await asyncio.gather(*(
            kube.list(res, run.namespace, sel) for res in (DEPLOYMENTS, SERVICES, JOBS, CONFIGMAPS, PODS)))

        def mine(objs: list[dict]) -> dict[str, dict]:
            out = {}
            for obj in objs:
                owners = obj.get("metadata", {}).get("ownerReferences") or []
                if any(o.get("uid") == run.uid for o in owners) or obj.get("kind") == "Pod":
                    out[obj["metadata"]["name"]] = obj
            return out

        observed = Observed(deployments=mine(deps), services=mine(svcs), jobs=mine(jobs), config_maps=mine(cms),
                            pods=pods)
        if run.cluster.scheduling.queue_name:
            observed.workloads = await self.observe_workloads(kube, run, observed.jobs)
        await self.observe_store(run, status, observed, logger)
        return observed

    async def observe_workloads(self, kube: Kube, run: Run, jobs: dict[str, dict]) -> dict[str, dict]:
        """Kueue's Workloads of the run's unfinished Jobs (the ones suspend and resume act on): selected by the
        server on the Job UID label Kueue puts on each, and kept only when one of those Jobs owns them."""
        uids = {j["metadata"]["uid"] for j in jobs.values() if j.get("metadata", {}).get("uid")
                and not job_complete(j) and not job_failed(j)}
        if not uids:
            return {}
        found = await kube.list(WORKLOADS, run.namespace, f"{JOB_UID_LABEL} in ({','.join(sorted(uids))})")
        return {w["metadata"]["name"]: w for w in found
                if any(o.get("uid") in uids for o in w["metadata"].get("ownerReferences") or [])}

    async def observe_store(self, run: Run, status: dict, observed: Observed, logger: logging.Logger) -> None:
        """Completion markers of the stages not yet known done, in order, up to the first one missing (and of the
        steps that run beside it); and the manifests of those found done, for the status's records."""
        recorded = {(r["iteration"], s) for r in status.get("history") or []
                    for s, rec in (r.get("stages") or {}).items() if rec.get("state") == "Succeeded"}
        steps = run_steps(run.config)
        try:
            probe = await self.probe(run)
            rest = [step for step in steps if step not in recorded]
            for i, (k, s) in enumerate(rest):
                if not await asyncio.to_thread(probe.done, k, s):
                    # the steps that run beside the first missing one (spec.may_overlap) may have finished first
                    unfinished = [(k, s)]
                    for step in rest[i + 1:]:
                        if not all(may_overlap(run.cluster, e, step) for e in unfinished):
                            break
                        if await asyncio.to_thread(probe.done, *step):
                            observed.done.add(step)
                        else:
                            unfinished.append(step)
                    break
                observed.done.add((k, s))
            for k, s in steps:
                if (k, s) not in recorded and ((k, s) in observed.done or any(
                        j.get("metadata", {}).get("labels", {}).get("selflengthen.io/stage") == s
                        and j.get("metadata", {}).get("labels", {}).get("selflengthen.io/iteration") == str(k)
                        and any(c.get("type") == "Complete" and c.get("status") == "True"
                                for c in (j.get("status") or {}).get("conditions") or [])
                        for j in observed.jobs.values())):
                    manifest = await asyncio.to_thread(probe.manifest, k, s)
                    if manifest:
                        observed.manifests[(k, s)] = manifest
        except Exception as exc:  # the store is a hint; Jobs and the status still drive the run
            self.probes.pop((run.namespace, run.name), None)
            logger.warning("store of run %s not readable (%s): going by Jobs and status only",
                           run.name, type(exc).__name__)

    async def probe(self, run: Run) -> Probe:
        cfg, access = run.config, run.cluster.storage
        key = (run.uid, cfg.storage.uri, cfg.storage.endpoint_url, access.model_dump_json())
        cached = self.probes.get((run.namespace, run.name))
        if cached is not None and cached[0] == key:
            return cached[1]
        probe = await self.options.probe(self.client(), run)
        self.probes[(run.namespace, run.name)] = (key, probe)
        return probe

    # ---- acting

    async def apply(self, run: Run, action: Action, logger: logging.Logger) -> None:
        kube = self.client()
        res = BY_KIND[action.kind]
        if action.verb == "create":
            try:
                await kube.create(res, run.namespace, action.body or {})
                self.metrics.children_created.labels(namespace=run.namespace, kind=action.kind).inc()
                logger.info("created %s/%s", action.kind, action.name)
            except ApiError as err:
                if err.status != 409:
                    raise
                existing = await kube.get(res, run.namespace, action.name) or {}
                owners = existing.get("metadata", {}).get("ownerReferences") or []
                if not any(o.get("uid") == run.uid for o in owners):
                    raise kopf.TemporaryError(f"{action.kind} {action.name} exists and belongs to someone else; "
                                              "delete it or rename the run", delay=60) from None
                logger.info("adopted existing %s/%s", action.kind, action.name)
        elif action.verb == "patch":
            try:
                await kube.patch(res, run.namespace, action.name, action.body or {})
            except ApiError as err:
                if err.status != 404:
                    raise
        elif action.verb == "delete":
            await kube.delete(res, run.namespace, action.name)
            logger.info("deleted %s/%s", action.kind, action.name)

    async def post_event(self, obj: dict, event: Event) -> None:
        meta = obj["metadata"]
        now = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": event.type, "reason": event.reason, "message": redact(event.message),
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self.client().create(EVENTS, meta["namespace"], body)
        except ApiError as err:  # events are best effort
            log.warning("cannot post event %s: %s", event.reason, err)

    async def write_status(self, namespace: str, name: str, old: dict, new: dict) -> None:
        if old == new:
            return
        patch = {k: v for k, v in new.items() if old.get(k) != v}
        patch.update({k: None for k in old if k not in new})
        body = await self.client().patch(RUNS, namespace, name, {"status": patch}, subresource="status")
        self.written[(namespace, name)] = ((body or {}).get("metadata") or {}).get("resourceVersion", "")

    # ---- one reconcile

    async def reconcile_once(self, namespace: str, name: str, logger: logging.Logger) -> float | None:
        started = time.perf_counter()
        try:
            return await self._reconcile_once(namespace, name, logger)
        except Exception:
            self.metrics.reconcile_errors.labels(namespace=namespace).inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _reconcile_once(self, namespace: str, name: str, logger: logging.Logger) -> float | None:
        lock = self.locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            self.reconciles += 1
            obj = await self.client().get(RUNS, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None
            meta, status = obj["metadata"], obj.get("status") or {}
            generation = int(meta.get("generation") or 0)
            now = self.options.clock()
            try:
                config, cluster = parse_spec(name, obj.get("spec") or {})
            except ConfigError as err:
                plan: Plan = invalid_spec(status, generation, str(err), now)
            else:
                run = Run(name=name, namespace=namespace, uid=meta["uid"], config=config, cluster=cluster)
                observed = await self.observe(run, status, logger)
                plan = reconcile(run, generation, status, observed, now)
                for action in plan.actions:
                    try:
                        await self.apply(run, action, logger)
                    except ApiError as err:
                        if action.verb != "create" or err.status not in REFUSALS:
                            raise
                        # the API server refused the child (validation, admission, quota): the status says so
                        plan = child_rejected(plan, run, generation, action, err.status, err.reason, err.message,
                                              now)
                        break
            # Events before the status that records their transition: a crash in between posts them again
            # (at least once) instead of never (the next reconcile sees no transition in the written status).
            for event in plan.events:
                (logger.warning if event.type == "Warning" else logger.info)("%s: %s", event.reason, event.message)
                await self.post_event(obj, event)
            await self.write_status(namespace, name, status, plan.status)
            self.record_metrics(namespace, name, status, plan.status)
            self.finished[(namespace, name)] = plan.status.get("phase") in FINISHED_PHASES and not plan.actions
            return plan.requeue_after

    async def cleanup(self, namespace: str, name: str, uid: str, spec: dict, logger: logging.Logger) -> None:
        kube = self.client()
        sel = selector(name)
        lists = await asyncio.gather(*(kube.list(res, namespace, sel)
                                       for res in (DEPLOYMENTS, JOBS, SERVICES, CONFIGMAPS)))
        observed = Observed(**{key: {o["metadata"]["name"]: o for o in objs if any(
            r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])}
            for key, objs in zip(("deployments", "jobs", "services", "config_maps"), lists)})
        for action in cleanup_actions(observed):
            await kube.delete(BY_KIND[action.kind], namespace, action.name, propagation="Foreground"
                              if action.kind in ("Job", "Deployment") else "Background")
            logger.info("deleted %s/%s", action.kind, action.name)
        if (spec.get("retention") or {}).get("artifacts") == "Delete":
            try:
                config, cluster = parse_spec(name, spec)
                probe = await self.options.probe(kube, Run(name, namespace, uid, config, cluster))
                count = await asyncio.to_thread(probe.delete_run)
                logger.info("deleted %d artifact(s) of run %s", count, name)
            except Exception as exc:
                raise kopf.TemporaryError(f"cannot delete the artifacts yet ({type(exc).__name__})", delay=30)
        remaining = await asyncio.gather(*(kube.list(res, namespace, sel) for res in (DEPLOYMENTS, JOBS)))
        left = [o["metadata"]["name"] for objs in remaining for o in objs
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]
        if left:
            raise kopf.TemporaryError(f"waiting for {', '.join(sorted(left))} to go away", delay=5)


def build_registry(options: OperatorOptions | None = None) -> tuple[kopf.OperatorRegistry, Controller]:
    options = options or OperatorOptions()
    registry = kopf.OperatorRegistry()
    controller = Controller(options)
    managed = {"app.kubernetes.io/managed-by": MANAGED_BY}

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_):
        # kopf's own bookkeeping in annotations of ours, the status stays ours alone
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        settings.posting.level = logging.WARNING  # our own events say what happens; kopf's only on trouble
        # botocore's DEBUG records carry signing material (the key id and session token of the run's Secret in
        # the canonical request and the request headers): never below WARNING, also under --verbose
        for noisy in QUIET_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        settings.execution.max_workers = 4
        # Only our children, filtered by the API server (a handler's labels= filters in the client, after the
        # whole cluster's pods were listed and watched), and listed in chunks (no one LIST of every object).
        for group, version, plural in WATCHED_CHILDREN:
            settings.watching.label_selectors[group, version, plural] = MANAGED_SELECTOR
        settings.watching.chunk_size = LIST_CHUNK
        if options.configure:
            options.configure(settings)

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        controller.credentials = options.login(**kwargs)
        return controller.credentials

    @kopf.on.cleanup(registry=registry)
    async def close(**_):
        if controller.kube is not None:
            await controller.kube.close()

    @kopf.on.probe(id="reconciles", registry=registry)
    def reconciles(**_):
        return controller.reconciles

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_backoff=1.0, cancellation_timeout=10.0)
    async def run_daemon(name, namespace, logger, stopped, **_):
        waker = controller.waker(namespace, name)
        try:
            while not stopped:
                waker.clear()
                try:
                    delay = await controller.reconcile_once(namespace, name, logger)
                except ApiError as err:
                    logger.warning("reconcile of %s failed: %s; retrying", name, err)
                    delay = min(options.poll_seconds, 5.0)
                except kopf.TemporaryError as err:
                    logger.warning("reconcile of %s: %s", name, err)
                    delay = err.delay or options.poll_seconds
                timeout = options.poll_seconds if delay is None else min(max(delay, 0.05), options.poll_seconds)
                if delay is None and controller.finished.get((namespace, name)):
                    timeout = None  # a finished run: nothing to poll; a change of the run or a child wakes it
                try:
                    await asyncio.wait_for(waker.wait(), timeout=timeout)
                except TimeoutError:
                    pass
        finally:
            controller.wakers.pop((namespace, name), None)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def run_changed(name, namespace, meta, **_):
        if meta.get("resourceVersion") != controller.written.get((namespace, name)):  # not our own status write
            controller.wake(namespace, name)

    def child_changed(labels, namespace, **_):
        controller.wake(namespace, labels.get(LABEL_RUN))

    for group, version, plural in WATCHED_CHILDREN:
        kopf.on.event(group, version, plural, labels=managed, registry=registry,
                      id=f"wake-on-{plural}")(child_changed)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    async def delete_run(name, namespace, uid, spec, logger, **_):
        controller.wakers.pop((namespace, name), None)
        controller.probes.pop((namespace, name), None)
        controller.finished.pop((namespace, name), None)
        await controller.cleanup(namespace, name, uid, dict(spec), logger)
        controller.metrics.forget_run(name, namespace)
        logger.info("run %s deleted: children removed%s", name,
                    "" if (spec.get("retention") or {}).get("artifacts") == "Delete" else ", artifacts kept")

    return registry, controller


def default_priority(started: float) -> int:
    """Peering priority of a replica started at `started` (epoch seconds): the older replica is the higher one,
    so that a new replica (a rolling update, a second one) pauses instead of preempting the one that is acting,
    and both never act at once; it takes over only when the old one is gone. Equal priorities would pause both:
    a random tail separates replicas started in the same millisecond."""
    return -int(started * 1000) * 1000 - random.SystemRandom().randint(0, 999)


def run_operator(*, namespaces: list[str] | None = None, clusterwide: bool = False, liveness: str | None = None,
                 peering: str | None = None, standalone: bool = False, priority: int | None = None,
                 log_format: str = "json", verbose: bool = False, poll_seconds: float = 30.0) -> None:
    """Run the operator until it is stopped (SIGTERM/SIGINT). Without --namespace it serves the whole cluster.
    Its metrics (the process-wide `metrics()`) are served by the caller: `selflengthen operator run --metrics-port`."""
    formats = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}
    kopf.configure(verbose=verbose, log_format=formats[log_format])
    redact_log_records()
    registry, _ = build_registry(OperatorOptions(poll_seconds=poll_seconds))
    if not namespaces:
        clusterwide = True
    if priority is None and not standalone:
        priority = default_priority(time.time())
    asyncio.run(kopf.operator(
        registry=registry, clusterwide=clusterwide, namespaces=namespaces or [],
        liveness_endpoint=liveness or None, peering_name=peering, standalone=True if standalone else None,
        priority=priority, identity=os.environ.get("POD_NAME") or None,
    ))
