"""The per-run state machine: (spec, status, observed children and store markers, now) -> (actions, new status).

Pure: no API calls, no clock, no store access, so every path is tested without a cluster. The kopf handlers
(operator/handlers.py) observe, call `reconcile`, apply the actions and write the status.

One macro-iteration k, in order (a stage is done when its `_SUCCESS` marker is in the store, its Job completed,
or the status already says so — whichever is seen first; finished stages never run again):

    Serving     vLLM Deployment for model k-1 (base model for k = 1), until ready or its startup timeout
    Generating  Jobs self-instruct -> respond -> extend, pointed at the Service
    ScalingDown the inference Deployments scaled to 0 and removed, so that their GPUs are free; build-sft (CPU
                only) runs meanwhile
    Training    Jobs build-sft -> train-generator -> train-extender (with training.concurrent the two training
                Jobs at once)
    Evaluating  (evaluate.enabled) vLLM for model k, then the evaluate Job; model k keeps serving into
                iteration k+1, whose data stages start beside the evaluation (spec.may_overlap)
    ... then Succeeded (inference removed). A failed attempt is retried with exponential backoff up to the
    stage's limit, each attempt recorded; then the run is Failed with the reason.

Everything is derived again from what is observed each time, so a reconcile that runs twice does nothing twice,
and one that runs after an operator restart picks up where the last one stopped: child names are deterministic,
and the attempt number is the highest of the status's and of the Jobs found.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field

from ..pipeline import stage_table
from ..pipeline.layout import stage_prefix
from ..pipeline.urls import redact
from .resources import (
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_ITERATION,
    LABEL_MODEL,
    LABEL_STAGE,
    JOB_NAME_LABEL,
    CONFIG_HASH,
    Run,
    config_hash,
    config_map,
    config_map_name,
    deployment_name,
    endpoint,
    model_endpoints,
    job_name,
    serving_deployment,
    serving_name,
    serving_service,
    stage_job,
    training_job,
    training_service,
)
from .spec import (
    EVAL_STAGE,
    LF_MODEL,
    SERVING,
    TRAIN_STAGES,
    run_steps,
    runnable_steps,
)
from .status import MAX_FAILURES_KEPT, MAX_MESSAGE, build_status, stage_results

CHILD_REJECTED = "ChildRejected"
# Refusals that the same request meets again (the object itself is invalid): the run fails until its spec changes.
# Others (403: a quota, a webhook; 429) may pass on a later try: the run stays Degraded and retries.
PERMANENT_REFUSALS = (400, 422)
ACTIVE_PHASES = ("Pending", "Serving", "Generating", "ScalingDown", "Training", "Evaluating")


@dataclass
class Observed:
    """What the operator saw of a run's world: its children by name, its pods, the store's completion markers."""

    deployments: dict[str, dict] = field(default_factory=dict)
    services: dict[str, dict] = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)
    config_maps: dict[str, dict] = field(default_factory=dict)
    pods: list[dict] = field(default_factory=list)
    done: set[tuple[int, str]] = field(default_factory=set)  # (iteration, stage) with _SUCCESS in the store
    manifests: dict[tuple[int, str], dict] = field(default_factory=dict)
    # with a Kueue queue: Kueue's Workloads of the unfinished Jobs, by name (each owned by its Job)
    workloads: dict[str, dict] = field(default_factory=dict)


@dataclass
class Action:
    verb: str  # create | patch | delete
    kind: str  # ConfigMap | Service | Deployment | Job | Workload
    name: str
    body: dict | None = None  # the manifest (create) or a JSON merge patch (patch)

    def __repr__(self) -> str:
        return f"{self.verb} {self.kind}/{self.name}"


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    actions: list[Action]
    status: dict
    events: list[Event]
    requeue_after: float | None = None


# -- time ---------------------------------------------------------------------------------------------------------


def ts(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


# -- observed objects ---------------------------------------------------------------------------------------------


def _label(obj: dict, key: str) -> str | None:
    return (obj.get("metadata", {}).get("labels") or {}).get(key)


def _condition(obj: dict, ctype: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def job_complete(job: dict) -> bool:
    return _condition(job, "Complete") is not None or _condition(job, "SuccessCriteriaMet") is not None


def job_failed(job: dict) -> dict | None:
    return _condition(job, "Failed") or _condition(job, "FailureTarget")


def _truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(redact(text).split())  # status fields and Events never show a URL's userinfo or query
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pod_summary(pod: dict) -> str:
    """One line on why a pod is not healthy: scheduling, waiting reasons, last termination, restarts."""
    name = pod.get("metadata", {}).get("name", "?")
    st = pod.get("status") or {}
    parts = [f"phase {st.get('phase', 'Unknown')}"]
    for c in st.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            parts.append(f"not scheduled ({c.get('reason', '')}: {c.get('message', '')})")
    for cs in [*(st.get("initContainerStatuses") or []), *(st.get("containerStatuses") or [])]:
        bits = []
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        if "waiting" in state:
            w = state["waiting"]
            bits.append(f"waiting {w.get('reason', '')}" + (f": {w['message']}" if w.get("message") else ""))
        if "terminated" in state:
            t = state["terminated"]
            bits.append(f"terminated {t.get('reason', '')} (exit code {t.get('exitCode')})"
                        + (f": {t['message']}" if t.get("message") else ""))
        if "terminated" in last:
            t = last["terminated"]
            bits.append(f"last terminated {t.get('reason', '')} (exit code {t.get('exitCode')})"
                        + (f": {t['message']}" if t.get("message") else ""))
        if cs.get("restartCount"):
            bits.append(f"{cs['restartCount']} restarts")
        if bits:
            parts.append(f"container {cs.get('name')}: " + ", ".join(bits))
    return f"pod {name}: " + "; ".join(parts)


# Container waiting reasons that do not pass by themselves: the image cannot be pulled or the container not made
# (a missing Secret or ConfigMap key).
STUCK_WAITING = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")
# A child without any pod this long after it was made: its pods are refused (a ResourceQuota, a LimitRange, an
# admission webhook: the controller's FailedCreate Events say which).
NO_POD_GRACE_SECONDS = 45


def stuck_pod(pods: list[dict]) -> tuple[str, str] | None:
    """(reason, message) of the first pod that cannot start: unpullable image, a container that cannot be made,
    or unschedulable."""
    for pod in pods:
        st = pod.get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed") or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for cs in [*(st.get("initContainerStatuses") or []), *(st.get("containerStatuses") or [])]:
            reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
            if reason in STUCK_WAITING:
                return reason, pod_summary(pod)
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return "Unschedulable", pod_summary(pod)
    return None


def _failure_recorded(rec: dict, attempt: int) -> bool:
    return any(f.get("attempt") == attempt for f in rec.get("failures") or [])


def serving_key(stage: str) -> str | None:
    """The serving pseudo-stage a stage needs the server of (its record key), None for build-sft and training: one
    per model a stage table entry is served (pipeline/stage_table.py)."""
    models = stage_table.stage(stage).models
    if models == "previous":
        return SERVING
    if models == "length-following":
        return f"{stage}-{SERVING}"
    if models == "current":  # collect reuses evaluate's server when evaluation ran
        return f"{EVAL_STAGE}-{SERVING}"
    return None


def served_for(k: int, stage: str) -> int:
    """The model a stage of iteration k asks (stage_table: `models`): those of iteration k-1, those just trained,
    or the length-following model."""
    models = stage_table.stage(stage).models
    return k - 1 if models == "previous" else LF_MODEL if models == "length-following" else k


# -- the state machine --------------------------------------------------------------------------------------------


class _Reconciler:
    def __init__(self, run: Run, generation: int, status: dict, obs: Observed, now: dt.datetime):
        self.run, self.generation, self.obs, self.now = run, generation, obs, now
        self.old = status or {}
        self.status = copy.deepcopy(self.old)
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.requeue: list[float] = []
        self.cfg, self.cl = run.config, run.cluster

    # ---- helpers

    def event(self, etype: str, reason: str, message: str) -> None:
        self.events.append(Event(etype, reason, _truncate(message)))

    def act(self, verb: str, kind: str, name: str, body: dict | None = None) -> None:
        if verb in ("create", "delete") and any((a.verb, a.kind, a.name) == (verb, kind, name) for a in self.actions):
            return  # asked already by a step beside this one (steps that share a server)
        self.actions.append(Action(verb, kind, name, body))

    def wait(self, seconds: float) -> None:
        self.requeue.append(max(seconds, 0.0))

    def iteration_record(self, k: int) -> dict:
        history = self.status.setdefault("history", [])
        for rec in history:
            if rec.get("iteration") == k:
                return rec
        rec = {"iteration": k, "startedAt": ts(self.now), "stages": {}}
        history.append(rec)
        history.sort(key=lambda r: r["iteration"])
        return rec

    def record(self, k: int, key: str) -> dict:
        return self.iteration_record(k)["stages"].setdefault(key, {"state": "Pending", "attempts": 0})

    def steps(self) -> list[tuple[int, str]]:
        return run_steps(self.cfg)

    def stage_jobs(self, k: int, stage: str) -> dict[int, dict]:
        out = {}
        for job in self.obs.jobs.values():
            if _label(job, LABEL_ITERATION) == str(k) and _label(job, LABEL_STAGE) == stage:
                out[int(_label(job, LABEL_ATTEMPT) or 0)] = job
        return out

    def done(self, k: int, stage: str) -> bool:
        if (k, stage) in self.obs.done:
            return True
        rec = self.iteration_record_if_any(k)
        if rec and rec["stages"].get(stage, {}).get("state") == "Succeeded":
            return True
        return any(job_complete(j) for j in self.stage_jobs(k, stage).values())

    def iteration_record_if_any(self, k: int) -> dict | None:
        return next((r for r in self.status.get("history", []) if r.get("iteration") == k), None)

    def workloads_of(self, job: dict) -> list[tuple[str, dict]]:
        """Kueue's Workloads of a Job: those it owns."""
        uid = job.get("metadata", {}).get("uid")
        return [(n, w) for n, w in self.obs.workloads.items()
                if uid and any(o.get("uid") == uid for o in w.get("metadata", {}).get("ownerReferences") or [])]

    def set_active(self, job: dict, active: bool) -> bool:
        """Kueue's own stop and start of a queued Job: (de)activate its Workloads (Kueue then suspends the Job, or
        queues it again and unsuspends it once admitted). `spec.suspend` is Kueue's there, never patched. False when
        Kueue has not made the Job's Workload yet."""
        found = self.workloads_of(job)
        for name, wl in found:
            if (wl.get("spec") or {}).get("active", True) is not active:
                self.act("patch", "Workload", name, {"spec": {"active": active}})
        return bool(found)

    def serving_deployments(self) -> dict[str, dict]:
        return {n: d for n, d in self.obs.deployments.items() if _label(d, LABEL_COMPONENT) == "inference"}

    # ---- stage bookkeeping

    def mark_succeeded(self, k: int, stage: str) -> None:
        rec = self.record(k, stage)
        if rec.get("state") == "Succeeded":
            return
        rec["state"] = "Succeeded"
        rec["finishedAt"] = ts(self.now)
        rec.pop("nextAttemptAt", None)
        started = parse_ts(rec.get("startedAt"))
        manifest = self.obs.manifests.get((k, stage)) or {}
        if manifest.get("durationSeconds") is not None:
            rec["durationSeconds"] = round(float(manifest["durationSeconds"]), 3)
        elif started:
            rec["durationSeconds"] = (self.now - started).total_seconds()
        rec.update(stage_results(manifest))  # the manifest's results, under its own keys
        where = stage_prefix(self.run.name, k, stage)  # collect's (...) output is the run's
        rec["artifactUri"] = manifest.get("modelUri") or f"{self.cfg.storage.uri}/{where}"
        if stage == "extend" and "averageWords" in rec:
            self.iteration_record(k)["averageWords"] = rec["averageWords"]
            self.status["averageWords"] = int(round(rec["averageWords"]))
        attempt = f" (attempt {rec['attempts']})" if rec.get("attempts", 0) > 1 else ""
        self.event("Normal", "StageSucceeded", f"iteration {k}: {stage} succeeded{attempt}")

    def fail_attempt(self, k: int, key: str, retry_key: str, reason: str, message: str) -> bool:
        """Record a failed attempt; True when the stage (and so the run) has failed for good."""
        rec = self.record(k, key)
        attempt = rec.get("attempts", 0)
        failure = {"attempt": attempt, "reason": reason, "message": _truncate(message), "time": ts(self.now)}
        rec["failures"] = [*(rec.get("failures") or []), failure][-MAX_FAILURES_KEPT:]
        self.status["lastFailure"] = {"iteration": k, "stage": key, **failure}
        limit = self.cl.retry.limit(retry_key)
        if attempt >= limit:
            rec["state"] = "Failed"
            rec["finishedAt"] = ts(self.now)
            self.fail_run(f"iteration {k}: {key} failed after {attempt} attempt(s): {reason}: {message}")
            return True
        delay = self.cl.retry.backoff(attempt)
        rec["state"] = "Retrying"
        rec["nextAttemptAt"] = ts(self.now + dt.timedelta(seconds=delay))
        self.event("Warning", "StageFailed", f"iteration {k}: {key} attempt {attempt}/{limit} failed: {reason}: "
                   f"{message}; retrying in {delay:g}s")
        self.wait(delay)
        return False

    def fail_run(self, message: str) -> None:
        self.status["phase"] = "Failed"
        self.status["finishedAt"] = ts(self.now)
        self.status["failureMessage"] = _truncate(message)
        self.event("Warning", "RunFailed", message)
        self.cleanup_serving()
        self.stop_jobs()

    def stop_jobs(self) -> None:
        """A step that ran beside the failed one (the other training Job, the next iteration's data stage) would
        hold its GPUs or ask a server that is gone: stopped too (its finished shards and checkpoints stay in the
        store, so a run resumed after a spec change continues them); failed Jobs stay for their logs."""
        for name, job in self.obs.jobs.items():
            if not job_complete(job) and not job_failed(job) and not job.get("metadata", {}).get("deletionTimestamp"):
                self.act("delete", "Job", name)
                if _label(self.obs.services.get(name) or {}, LABEL_COMPONENT) == "training":
                    self.act("delete", "Service", name)

    def backoff_pending(self, rec: dict) -> bool:
        due = parse_ts(rec.get("nextAttemptAt"))
        if due and due > self.now:
            self.wait((due - self.now).total_seconds())
            return True
        return False

    # ---- children

    def start_attempt(self, rec: dict, attempt: int, child_name, reason: str, started) -> int | None:
        """Where an attempt starts, the one path for stage Jobs and vLLM Deployments: the first attempt, or the next
        once the failed one's backoff is over (an event `reason` says so), else the attempt at hand whose child is
        missing (made again); its record Running and naming its child. None while the backoff waits."""
        if attempt == 0 or rec.get("state") == "Retrying":
            if self.backoff_pending(rec):
                return None
            attempt += 1
            rec["startedAt"] = ts(self.now)
            self.event("Normal", reason, started(attempt, child_name(attempt)))
        rec.update(attempts=attempt, state="Running", child=child_name(attempt))
        rec.pop("nextAttemptAt", None)
        rec.setdefault("startedAt", ts(self.now))
        return attempt

    def ensure_config(self) -> None:
        name = config_map_name(self.run.name)
        current = self.obs.config_maps.get(name)
        if current is None:
            self.act("create", "ConfigMap", name, config_map(self.run))
        elif (current.get("metadata", {}).get("annotations") or {}).get(CONFIG_HASH) != config_hash(self.run):
            desired = config_map(self.run)
            self.act("patch", "ConfigMap", name, {"metadata": {"annotations": desired["metadata"]["annotations"]},
                                                  "data": desired["data"]})

    def cleanup_serving(self, keep_model: int | None = None) -> None:
        for name, dep in self.serving_deployments().items():
            if keep_model is not None and _label(dep, LABEL_MODEL) == str(keep_model):
                continue
            self.act("delete", "Deployment", name)
        for name, svc in self.obs.services.items():
            if _label(svc, LABEL_COMPONENT) != "inference":
                continue
            if keep_model is not None and _label(svc, LABEL_MODEL) == str(keep_model):
                continue
            self.act("delete", "Service", name)

    def ensure_serving(self, k: int, model: int, key: str) -> bool:
        """Bring up vLLM for `model`; True when it is ready."""
        self.cleanup_serving(keep_model=model)
        rec = self.record(k, key)
        inf = self.cl.inference
        deps = {int(_label(d, LABEL_ATTEMPT) or 0): d for d in self.serving_deployments().values()
                if _label(d, LABEL_MODEL) == str(model)}
        attempt = max([rec.get("attempts", 0), *deps])
        # Older attempts of the same model that are still around hold GPUs.
        for a, d in deps.items():
            if a != attempt:
                self.act("delete", "Deployment", d["metadata"]["name"])
        svc = serving_name(self.run.name, model)
        if svc not in self.obs.services:
            self.act("create", "Service", svc, serving_service(self.run, model))
        dep = deps.get(attempt)
        if dep is not None and _failure_recorded(rec, attempt):
            self.act("delete", "Deployment", dep["metadata"]["name"])  # still going away
            dep = None
        if dep is None:
            attempt = self.start_attempt(
                rec, attempt, lambda a: deployment_name(self.run.name, model, a), "ServingStarted",
                lambda a, child: f"iteration {k}: starting vLLM for {self.model_text(model)} (Deployment {child}, "
                                 f"attempt {a})")
            if attempt is None:
                return False
            self.act("create", "Deployment", rec["child"], serving_deployment(self.run, model, attempt))
            self.wait(inf.startup_timeout_seconds)
            return False
        rec.update(attempts=attempt, child=dep["metadata"]["name"])
        if (dep.get("spec") or {}).get("replicas") != inf.replicas:
            # scaled down (suspended) or resized: back to the wanted size, and the startup clock starts again
            self.act("patch", "Deployment", rec["child"], {"spec": {"replicas": inf.replicas}})
            rec.update(state="Running", startedAt=ts(self.now))
            rec.pop("finishedAt", None)
            self.wait(inf.startup_timeout_seconds)
            return False
        ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
        if ready >= inf.replicas:
            if rec.get("state") != "Succeeded":
                rec["state"] = "Succeeded"
                rec["finishedAt"] = ts(self.now)
                started = parse_ts(rec.get("startedAt"))
                if started:
                    rec["durationSeconds"] = (self.now - started).total_seconds()
                self.event("Normal", "ServingReady", f"iteration {k}: vLLM ready for {self.model_text(model)} at "
                           f"{endpoint(self.run, model)}")
            return True
        if rec.get("state") == "Succeeded":  # it was ready and is not any more: wait for it again, with a deadline
            rec.update(state="Running", startedAt=ts(self.now))
            rec.pop("finishedAt", None)
            self.event("Warning", "ServingUnready", f"iteration {k}: vLLM for {self.model_text(model)} is not ready")
        started = parse_ts(rec.get("startedAt")) or self.now
        rec.setdefault("startedAt", ts(started))
        elapsed = (self.now - started).total_seconds()
        pods = [p for p in self.obs.pods if _label(p, LABEL_COMPONENT) == "inference"
                and _label(p, LABEL_MODEL) == str(model) and _label(p, LABEL_ATTEMPT) == str(attempt)]
        # a Deployment's missing pods show in its ReplicaFailure condition (quota), not as an empty pod list
        if self.check_stuck(k, key, rec, pods, dep, False, "Deployment"):
            return False
        if elapsed < inf.startup_timeout_seconds:
            self.wait(inf.startup_timeout_seconds - elapsed)
            return False
        detail = "; ".join(pod_summary(p) for p in pods) or "no pod was created (quota? admission?)"
        self.act("delete", "Deployment", rec["child"])
        self.fail_attempt(k, key, SERVING, "StartupTimeout",
                          f"vLLM not healthy after {inf.startup_timeout_seconds}s ({ready}/{inf.replicas} ready): "
                          f"{detail}")
        return False

    def model_text(self, model: int) -> str:
        if model == LF_MODEL:
            return "the length-following model"
        return "the base model" if model == 0 else f"the models of iteration {model}"

    def check_stuck(self, k: int, key: str, rec: dict, pods: list[dict], child: dict, none_made: bool,
                    kind: str) -> bool:
        """A pod of the child that cannot start: recorded (condition Degraded says so); past deadlines.stuckSeconds
        the child is deleted and the run Failed with that reason. True when the run has failed."""
        found = stuck_pod(pods)
        refused = _condition(child, "ReplicaFailure")  # a Deployment says why its ReplicaSet makes no pod (quota)
        if found is None and refused and refused.get("status") == "True":
            found = (refused.get("reason") or "FailedCreate", f"{kind} {rec['child']}: {refused.get('message')}")
        if found is None and none_made:  # a Job says nothing: no pod at all for a while is the sign
            made = parse_ts((child.get("metadata") or {}).get("creationTimestamp")) or parse_ts(rec.get("startedAt"))
            age = (self.now - made).total_seconds() if made else 0.0
            if age >= NO_POD_GRACE_SECONDS:
                found = ("FailedCreate", f"{kind} {rec['child']}: no pod created after {age:.0f}s (a ResourceQuota, "
                         f"LimitRange or admission webhook refuses its pods: kubectl describe {kind.lower()} "
                         f"{rec['child']})")
            else:
                self.wait(NO_POD_GRACE_SECONDS - age)
        if found is None:
            rec.pop("stuck", None)
            return False
        reason, message = found
        previous = rec.get("stuck") or {}
        since = parse_ts(previous.get("since")) if previous.get("reason") == reason else None
        if since is None:
            since = self.now
            self.event("Warning", "PodStuck", f"iteration {k}: {key}: {reason}: {message}")
        rec["stuck"] = {"reason": reason, "message": _truncate(message), "since": ts(since)}
        waited = (self.now - since).total_seconds()
        limit = self.cl.deadlines.stuck_seconds
        if waited < limit:
            self.wait(min(limit - waited, 30.0))
            return False
        self.act("delete", kind, rec["child"])
        if kind == "Job" and rec["child"] in self.obs.services:
            self.act("delete", "Service", rec["child"])
        attempt = rec.get("attempts", 0)
        failure = {"attempt": attempt, "reason": reason, "message": _truncate(message), "time": ts(self.now)}
        rec["failures"] = [*(rec.get("failures") or []), failure][-MAX_FAILURES_KEPT:]
        rec.update(state="Failed", finishedAt=ts(self.now))
        rec.pop("stuck", None)
        self.status["lastFailure"] = {"iteration": k, "stage": key, **failure}
        self.fail_run(f"iteration {k}: {key}: stuck {waited:.0f}s: {reason}: {message}")
        return True

    def run_stage(self, k: int, stage: str, endpoint_url: str | None, routes: dict[str, str] | None = None) -> None:
        rec = self.record(k, stage)
        jobs = self.stage_jobs(k, stage)
        attempt = max([rec.get("attempts", 0), *jobs])
        job = jobs.get(attempt)
        training = stage in stage_table.TRAINED_ROLE  # a training Job (GPUs, multi-node)
        if job is not None and _failure_recorded(rec, attempt):
            job = None  # a failed attempt, kept for its logs: the next attempt is due after the backoff
        if job is None:
            attempt = self.start_attempt(
                rec, attempt, lambda a: job_name(self.run.name, k, stage, a), "StageStarted",
                lambda a, child: f"iteration {k}: {stage} started (Job {child}, attempt {a})")
            if attempt is None:
                return
            queued = bool(self.cl.scheduling.queue_name)  # Kueue admits (unsuspends) queued Jobs itself
            if training:
                body = training_job(self.run, k, stage, attempt, suspend=queued)
                if self.cl.training.nodes > 1:
                    self.act("create", "Service", rec["child"], training_service(self.run, k, stage, attempt))
            else:
                body = stage_job(self.run, k, stage, attempt, endpoint_url=endpoint_url, routes=routes,
                                 suspend=queued)
            self.act("create", "Job", rec["child"], body)
            return
        rec.update(attempts=attempt, child=job["metadata"]["name"])
        failed = job_failed(job)
        if failed:
            pods = [p for p in self.obs.pods if _label(p, JOB_NAME_LABEL) == rec["child"]
                    or p.get("metadata", {}).get("labels", {}).get("job-name") == rec["child"]]
            detail = "; ".join(pod_summary(p) for p in pods)
            message = failed.get("message") or "the Job failed"
            self.fail_attempt(k, stage, stage, failed.get("reason") or "JobFailed",
                              f"{message}" + (f"; {detail}" if detail else ""))
            return
        if rec.get("state") != "Running":
            rec["state"] = "Running"
        if not job_complete(job) and not (job.get("spec") or {}).get("suspend"):
            pods = [p for p in self.obs.pods if _label(p, JOB_NAME_LABEL) == rec["child"]]
            counts = job.get("status") or {}
            none_made = not pods and not any(int(counts.get(n) or 0) for n in
                                             ("active", "ready", "succeeded", "failed", "terminating"))
            if self.check_stuck(k, stage, rec, pods, job, none_made, "Job"):
                return
        else:
            rec.pop("stuck", None)
        if self.cl.scheduling.queue_name:
            self.set_active(job, True)  # resumed (Kueue admits it again)
        elif (job.get("spec") or {}).get("suspend"):
            self.act("patch", "Job", rec["child"], {"spec": {"suspend": False}})  # resumed

    # ---- the whole

    def conditions(self) -> None:
        phase = self.status.get("phase", "Pending")
        stage = self.status.get("stage") or ""
        k = self.status.get("currentIteration")
        where = f"iteration {k}/{self.cfg.iterations}" + (f", {stage}" if stage else "") if k else ""
        failure = self.status.get("lastFailure") or {}
        records = (self.iteration_record_if_any(k) or {}).get("stages", {}) if k else {}
        # degraded from a stage's first failed attempt until that stage succeeds: while its retry waits and while
        # the retry runs (a run on its last attempts is not healthy, even when a Job is running)
        retrying = any(r.get("failures") and r.get("state") in ("Retrying", "Running") for r in records.values())
        stuck = next(((key, r["stuck"]) for key, r in records.items() if r.get("stuck")), None)
        if phase == "Succeeded":
            ready = ("True", "Succeeded", f"all {self.cfg.iterations} iteration(s) done")
        elif phase == "Failed":
            ready = ("False", failure.get("reason") or "Failed", self.status.get("failureMessage") or "failed")
        elif phase == "Suspended":
            ready = ("False", "Suspended", f"suspended at {where}" if where else "suspended")
        else:
            ready = ("False", phase, where or "starting")
        if phase in ACTIVE_PHASES:
            progressing = ("True", phase, where or "starting")
        else:
            progressing = ("False", phase, ready[2])
        rejection = self.status.get("rejection")
        if phase == "Failed":
            degraded = ("True", failure.get("reason") or "Failed", self.status.get("failureMessage") or "")
        elif rejection:
            degraded = ("True", CHILD_REJECTED, rejection_text(rejection))
        elif stuck:
            key, info = stuck
            degraded = ("True", info.get("reason") or "PodStuck", f"iteration {k}: {key}: {info.get('message')}")
        elif retrying and failure:
            degraded = ("True", "Retrying", f"iteration {failure.get('iteration')}: {failure.get('stage')} attempt "
                        f"{failure.get('attempt')} failed: {failure.get('reason')}: {failure.get('message')}")
        else:
            degraded = ("False", "AsExpected", "no failure")
        old = {c["type"]: c for c in self.old.get("conditions") or []}
        self.status["conditions"] = [
            condition(old.get(ctype), ctype, *value, self.now, self.generation)
            for ctype, value in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded))]

    def reconcile(self) -> Plan:
        st = self.status
        st["observedGeneration"] = self.generation
        st["iterations"] = self.cfg.iterations
        st.setdefault("startedAt", ts(self.now))
        if st.get("phase") is None:
            st["phase"] = "Pending"
            self.event("Normal", "Accepted", f"run accepted: {self.cfg.iterations} iteration(s) of "
                       f"{self.cfg.models.base}, artifacts in {self.cfg.storage.uri}/{self.run.name}")
        self.release_failed_jobs()
        rejection = st.get("rejection")
        if rejection and (rejection.get("generation") != self.generation or rejection.get("name") in {
                **self.obs.jobs, **self.obs.deployments, **self.obs.services, **self.obs.config_maps}):
            st.pop("rejection")  # the spec changed (the next create may pass) or the child exists now
            rejection = None
        reason = (st.get("lastFailure") or {}).get("reason")
        if st.get("phase") == "Failed" and (reason not in ("InvalidSpec", CHILD_REJECTED) or rejection):
            self.cleanup_serving()
            self.stop_jobs()
            return self.finish()
        if st.get("phase") == "Failed":  # an invalid spec was fixed, or a spec a child was refused for changed
            st.pop("failureMessage", None)
            st.pop("finishedAt", None)
            st["phase"] = "Pending"  # not Failed any more: the steps below set the phase they reach
        self.ensure_config()
        pending = [(k, s) for k, s in self.steps() if not self.done(k, s)]
        for k, s in self.steps():
            if (k, s) not in pending:
                self.mark_succeeded(k, s)
        for k in range(1, self.cfg.iterations + 1):
            rec = self.iteration_record_if_any(k)
            if rec and not any(p[0] == k for p in pending) and "finishedAt" not in rec:
                rec["finishedAt"] = ts(self.now)
        if not pending:
            return self.succeed()
        if st.get("phase") == "Succeeded":
            st.pop("finishedAt", None)
            self.event("Normal", "Resumed", f"iterations raised to {self.cfg.iterations}: continuing")
        k, stage = pending[0]
        st["currentIteration"] = k
        st["progress"] = f"{k}/{self.cfg.iterations}"
        st["stage"] = stage
        self.iteration_record(k)
        if self.cl.suspend:
            return self.suspend()
        if st.get("phase") == "Suspended":
            self.event("Normal", "Resumed", f"resumed at iteration {k}: {stage}")
        window = runnable_steps(self.cl, pending)  # the first pending step and those that may run beside it
        if serving_key(stage) is not None:
            model, key = served_for(k, stage), serving_key(stage)
            if not self.ensure_serving(k, model, key):
                if st.get("phase") != "Failed":
                    st["phase"] = "Serving"
                    st["stage"] = key
                return self.finish()
            st["endpoint"] = endpoint(self.run, model)
            st["phase"] = stage_table.stage(stage).phase  # Generating or Evaluating
            for kk, ss in window:
                # the same server: the record of the step's own iteration adopts it (no create, it is ready)
                if st.get("phase") == "Failed" or (
                        (kk, ss) != (k, stage) and not self.ensure_serving(kk, served_for(kk, ss), serving_key(ss))):
                    break
                self.run_stage(kk, ss, st["endpoint"], model_endpoints(self.run, model))
        elif stage == TRAIN_STAGES[0]:
            # build-sft needs neither the server nor a GPU: it runs while vLLM goes down for the training Jobs
            freed = self.scaled_down()
            st.pop("endpoint", None)
            st["phase"] = "Training" if freed else "ScalingDown"
            self.run_stage(k, stage, None)
        else:
            if not self.scaled_down():
                st["phase"] = "ScalingDown"
                return self.finish()
            st.pop("endpoint", None)
            st["phase"] = "Training"
            for kk, ss in window:  # with training.concurrent: both roles' Jobs at once
                if st.get("phase") == "Failed":
                    break
                self.run_stage(kk, ss, None)
        return self.finish()

    def release_failed_jobs(self) -> None:
        """A failed Job whose pods still run holds their GPUs (a multi-node Job that lost a node: the surviving
        ranks wait for it): delete it, and the headless Service of a failed multi-node attempt (its rendezvous is
        over). A failed Job without running pods is kept for its logs; its failure is in the status already."""
        for name, job in self.obs.jobs.items():
            if not job_failed(job) or job.get("metadata", {}).get("deletionTimestamp"):
                continue
            if int((job.get("status") or {}).get("active") or 0) > 0:
                self.act("delete", "Job", name)
            svc = self.obs.services.get(name)
            if svc is not None and _label(svc, LABEL_COMPONENT) == "training":
                self.act("delete", "Service", name)

    def scaled_down(self) -> bool:
        deps = self.serving_deployments()
        if not deps:
            for name, svc in self.obs.services.items():
                if _label(svc, LABEL_COMPONENT) == "inference":
                    self.act("delete", "Service", name)
            return True
        busy = False
        for name, dep in deps.items():
            if (dep.get("spec") or {}).get("replicas"):
                self.act("patch", "Deployment", name, {"spec": {"replicas": 0}})
                busy = True
            elif int((dep.get("status") or {}).get("replicas") or 0) > 0:
                busy = True  # pods still terminating: their GPUs are not free yet
            else:
                self.act("delete", "Deployment", name)
        if busy and self.old.get("phase") != "ScalingDown":
            self.event("Normal", "ScalingDown", "scaling vLLM down to free the GPUs for training")
        if busy:
            self.wait(5)
        return not busy

    def suspend(self) -> Plan:
        st = self.status
        queued = bool(self.cl.scheduling.queue_name)
        for name, job in self.obs.jobs.items():
            if job_complete(job) or job_failed(job):
                continue
            if queued:
                if not self.set_active(job, False):
                    self.wait(5)  # Kueue makes the Workload shortly: deactivate it then
            elif not (job.get("spec") or {}).get("suspend"):
                self.act("patch", "Job", name, {"spec": {"suspend": True}})
        for name, dep in self.serving_deployments().items():
            if (dep.get("spec") or {}).get("replicas"):
                self.act("patch", "Deployment", name, {"spec": {"replicas": 0}})
        if st.get("phase") != "Suspended":
            self.event("Normal", "Suspended", f"suspended at iteration {st.get('currentIteration')}: "
                       f"{st.get('stage')} ({'Kueue Workloads deactivated' if queued else 'Jobs suspended'}, "
                       "inference scaled to 0)")
        st["phase"] = "Suspended"
        return self.finish()

    def succeed(self) -> Plan:
        st = self.status
        self.cleanup_serving()
        if self.cl.retention.jobs == "Delete":
            for name in self.obs.jobs:
                self.act("delete", "Job", name)
            for name, svc in self.obs.services.items():
                if _label(svc, LABEL_COMPONENT) == "training":
                    self.act("delete", "Service", name)
        if st.get("phase") != "Succeeded":
            st["phase"] = "Succeeded"
            st["finishedAt"] = ts(self.now)
            words = st.get("averageWords")
            self.event("Normal", "RunSucceeded", f"all {self.cfg.iterations} iteration(s) done"
                       + (f"; average words {words}" if words is not None else ""))
        st["currentIteration"] = self.cfg.iterations
        st["progress"] = f"{self.cfg.iterations}/{self.cfg.iterations}"
        st["stage"] = ""
        st.pop("endpoint", None)
        st.pop("failureMessage", None)
        return self.finish()

    def finish(self) -> Plan:
        self.conditions()
        old_phase, new_phase = self.old.get("phase"), self.status.get("phase")
        if old_phase and old_phase != new_phase and new_phase not in ("Failed", "Succeeded", "Suspended"):
            self.event("Normal", "PhaseChanged", f"{old_phase} -> {new_phase}: iteration "
                       f"{self.status.get('currentIteration')}, {self.status.get('stage')}")
        requeue = min(self.requeue) if self.requeue else None
        return Plan(self.actions, build_status(self.status), self.events, requeue)


def condition(prev: dict | None, ctype: str, status: str, reason: str, message: str, now: dt.datetime,
              generation: int | None) -> dict:
    """The condition `ctype` as it is now, from its previous value (KubeRay's and apimachinery's SetStatusCondition):
    lastTransitionTime moves only when the status changes. Every condition the operator writes is made here."""
    changed = not prev or prev.get("status") != status
    out = {"type": ctype, "status": status, "reason": reason, "message": _truncate(message),
           "lastTransitionTime": ts(now) if changed else prev.get("lastTransitionTime")}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def reconcile(run: Run, generation: int, status: dict | None, observed: Observed, now: dt.datetime) -> Plan:
    """The next actions for a run and its new status (see the module's docstring)."""
    return _Reconciler(run, generation, status or {}, observed, now).reconcile()


def invalid_spec(status: dict | None, generation: int, message: str, now: dt.datetime) -> Plan:
    """A spec the operator cannot run (the CRD's rules were bypassed or changed): Failed, with the reason."""
    st = copy.deepcopy(status or {})
    events = []
    if (st.get("lastFailure") or {}).get("message") != _truncate(message) or st.get("phase") != "Failed":
        events.append(Event("Warning", "InvalidSpec", _truncate(message)))
    st.update(phase="Failed", observedGeneration=generation, failureMessage=_truncate(message))
    st["lastFailure"] = {"reason": "InvalidSpec", "message": _truncate(message), "time": ts(now)}
    old = {c["type"]: c for c in st.get("conditions") or []}
    st["conditions"] = [condition(old.get(ctype), ctype, value, "InvalidSpec", message, now, generation)
                        for ctype, value in (("Ready", "False"), ("Progressing", "False"), ("Degraded", "True"))]
    return Plan([], build_status(st), events, None)


def rejection_text(rejection: dict) -> str:
    return (f"{rejection.get('kind')} {rejection.get('name')} refused by the API server "
            f"({rejection.get('code')} {rejection.get('reason') or ''}): {rejection.get('message') or ''}")


def child_rejected(plan: Plan, run: Run, generation: int, action: Action, code: int, reason: str, message: str,
                   now: dt.datetime) -> Plan:
    """The API server refused to create a child of `plan` (the actions after it were not applied): the status
    says so (condition Degraded, reason ChildRejected, the API's message trimmed) with a Warning Event; a
    refusal the same request would meet again fails the run (until its spec changes), any other is retried."""
    st = copy.deepcopy(plan.status)
    old = st.get("rejection") or {}
    rejection = {"kind": action.kind, "name": action.name, "code": code, "reason": reason,
                 "message": _truncate(message, 512), "time": ts(now), "generation": generation}
    st["rejection"] = rejection
    text = rejection_text(rejection)
    events = [e for e in plan.events]
    if (old.get("name"), old.get("message"), old.get("generation")) != (
            rejection["name"], rejection["message"], generation):
        events.append(Event("Warning", CHILD_REJECTED, text))
    permanent = code in PERMANENT_REFUSALS
    if permanent:
        k, stage = st.get("currentIteration"), st.get("stage")
        st.update(phase="Failed", finishedAt=ts(now), failureMessage=_truncate(text))
        st["lastFailure"] = {"iteration": k, "stage": stage, "reason": CHILD_REJECTED, "message": _truncate(text),
                             "time": ts(now)}
        events.append(Event("Warning", "RunFailed", f"{text}; fix the spec (the run resumes when it changes)"))
    st["conditions"] = [
        condition(c, c["type"], "True" if c["type"] == "Degraded" else "False", CHILD_REJECTED, text, now,
                  c.get("observedGeneration"))
        if c["type"] == "Degraded" or (permanent and c["type"] in ("Ready", "Progressing")) else c
        for c in st.get("conditions") or []]
    delay = 1.0 if permanent else max(float(run.cluster.retry.backoff_seconds), 5.0)
    return Plan([], build_status(st), events, delay)


def cleanup_actions(observed: Observed) -> list[Action]:
    """Everything the run made, for its finalizer (pods go with their Jobs and Deployments)."""
    out = []
    for kind, objs in (("Deployment", observed.deployments), ("Job", observed.jobs),
                       ("Service", observed.services), ("ConfigMap", observed.config_maps)):
        out.extend(Action("delete", kind, name) for name in objs)
    return out
