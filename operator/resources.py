"""Builders of a run's children: pure functions from the run to Kubernetes manifests (plain dicts).

Names are deterministic (run, iteration or served model, stage, attempt), so that a reconcile that runs twice, or
after an operator restart, finds what it made instead of making it again. Every child carries the common labels
and an owner reference to its SelfLengthenRun (the cluster garbage-collects what the finalizer missed).

    <run>-config                        ConfigMap: the run configuration (config.yaml) the stage Jobs read
    <run>-m<MM>-vllm-a<N>               Deployment: vLLM serving model MM (0: base; k: adapters of iteration k, or
                                        with full fine-tuning one server a model: Generator, Extender, base)
    <run>-m<MM>-vllm                    Service in front of it (the data stages' endpoint; a port a server)
    <run>-i<KK>-<stage>-a<N>            Job: one attempt of one stage of iteration KK
    <run>-i<KK>-train-<role>-a<N>       + headless Service of the same name for a multi-node (Indexed) Job
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

from ..pipeline import stage_table
from ..pipeline.config import BASE_MODEL_NAME, RunConfig, dump_config
from ..pipeline.layout import LENGTH_FOLLOWING, model_prefix
from .crd import API_VERSION, KIND
from .spec import LF_EVAL_STAGE, LF_MODEL, LF_TRAIN_STAGE, ClusterSpec

MANAGED_BY = "selflengthen-operator"
LABEL_RUN = "selflengthen.io/run"
LABEL_ITERATION = "selflengthen.io/iteration"
LABEL_STAGE = "selflengthen.io/stage"
LABEL_ATTEMPT = "selflengthen.io/attempt"
LABEL_MODEL = "selflengthen.io/model"
LABEL_COMPONENT = "app.kubernetes.io/component"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_HASH = "selflengthen.io/config-hash"

CONFIG_DIR = "/etc/selflengthen"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
ADAPTERS_DIR = "/adapters"
HF_HOME = "/cache/huggingface"
# vLLM's compile caches in each serving pod, seeded from and published to <HF_HOME>/<COMPILE_CACHE_SUBDIR>/<key>
# on the cache claim (operator/compile_cache.py)
COMPILE_CACHE_DIR = "/compile-cache"
COMPILE_CACHE_SUBDIR = "selflengthen-compile-cache"
WORKDIR = "/work"
# Every stage pod serves its Prometheus metrics here while it runs (`selflengthen stage --metrics-port`; one
# server a pod: local rank 0 under torchrun).
METRICS_PORT = 9400
# $USER of every container (the images' user, uid 10001, has this name)
POD_USER = "selflengthen"
# vLLM's accepted --max-lora-rank values; the smallest one at least the trained rank is used.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Run:
    """What the builders need to know of a SelfLengthenRun."""

    name: str
    namespace: str
    uid: str
    config: RunConfig
    cluster: ClusterSpec

    @cached_property
    def rendered_config(self) -> str:
        return _render(self.config.model_dump_json())


@lru_cache(maxsize=64)
def _render(config_json: str) -> str:
    return dump_config(RunConfig.model_validate_json(config_json))


# -- names and labels -------------------------------------------------------------------------------------------------


def config_map_name(run: str) -> str:
    return f"{run}-config"


def serving_name(run: str, model: int) -> str:
    return f"{run}-m{model:02d}-vllm"


def deployment_name(run: str, model: int, attempt: int) -> str:
    return f"{serving_name(run, model)}-a{attempt}"


# Short names of the long stage names in Job names, so that `<run>-i01-<stage>-a1-0` stays a DNS label with the
# longest run name (spec.MAX_RUN_NAME): the stage itself is in the Job's labels.
JOB_STAGE_NAMES = {LF_TRAIN_STAGE: "train-lf", LF_EVAL_STAGE: "evaluate-lf"}


def job_name(run: str, iteration: int, stage: str, attempt: int) -> str:
    return f"{run}-i{iteration:02d}-{JOB_STAGE_NAMES.get(stage, stage)}-a{attempt}"


def selector(run: str) -> dict[str, str]:
    return {LABEL_RUN: run, "app.kubernetes.io/managed-by": MANAGED_BY}


def labels(run: Run, component: str, **extra: object) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "selflengthen",
        "app.kubernetes.io/instance": run.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_COMPONENT: component,
        LABEL_RUN: run.name,
    }
    for key, value in extra.items():
        out[f"selflengthen.io/{key}"] = str(value)
    return out


def owner_reference(run: Run) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run.name, "uid": run.uid,
            "controller": True, "blockOwnerDeletion": True}


def literal(value: str) -> str:
    """A user's string as it must appear in a container's command, args or env value: the kubelet expands
    `$(VAR)` there from the container's environment (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...), and `$$` is its escape
    for a literal `$`. Every string from the spec goes through this; only our own `$(VAR)`s stay live."""
    return value.replace("$", "$$")


def _meta(run: Run, name: str, component: str, **extra: object) -> dict:
    return {"name": name, "namespace": run.namespace, "labels": labels(run, component, **extra),
            "ownerReferences": [owner_reference(run)]}


# -- the run configuration --------------------------------------------------------------------------------------------


def rendered_config(run: Run) -> str:
    """The YAML `selflengthen stage --config` reads: the run configuration with the run's name."""
    return run.rendered_config


def config_hash(run: Run) -> str:
    return hashlib.sha256(rendered_config(run).encode()).hexdigest()[:16]


def config_map(run: Run) -> dict:
    meta = _meta(run, config_map_name(run.name), "config")
    meta["annotations"] = {CONFIG_HASH: config_hash(run)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"config.yaml": rendered_config(run)}}


# -- pod pieces -------------------------------------------------------------------------------------------------------


def storage_env(run: Run) -> list[dict]:
    """S3 access for pods: credentials only as Secret references, never values."""
    access = run.cluster.storage
    env: list[dict] = []
    if access.credentials_secret:
        for var, key in (("AWS_ACCESS_KEY_ID", access.access_key_id_key),
                         ("AWS_SECRET_ACCESS_KEY", access.secret_access_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": access.credentials_secret, "key": key}}})
        env.append({"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": access.credentials_secret, "key": "AWS_SESSION_TOKEN", "optional": True}}})
    if access.region:
        env.append({"name": "AWS_REGION", "value": literal(access.region)})
    return env


def hf_env(run: Run) -> list[dict]:
    env = [{"name": "HF_HOME", "value": HF_HOME}]
    secret = run.cluster.inference.hf_token_secret
    if secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
    return env


def _resources(section, gpus: int = 0, resources=None) -> dict:
    resources = resources or section.resources
    requests = dict(resources.requests)
    limits = dict(resources.limits)
    if gpus:
        requests[section.gpu_resource] = gpus
        limits[section.gpu_resource] = gpus
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_spec(run: Run, containers: list[dict], *, role, restart: str, volumes: list[dict],
              init_containers: list[dict] | None = None) -> dict:
    """`role`: the spec section (inference, training, cpuJobs) whose nodeSelector/tolerations replace the
    scheduling ones when set."""
    s, sec = run.cluster.scheduling, run.cluster.security
    spec: dict = {"restartPolicy": restart, "containers": containers,
                  "volumes": [*volumes, {"name": "tmp", "emptyDir": {}}],
                  "enableServiceLinks": False,
                  # OnRootMismatch: the volumes (a model cache of many GB) are chowned to fsGroup once, not at every
                  # pod start
                  "securityContext": {"runAsNonRoot": True, "runAsUser": sec.run_as_user,
                                      "runAsGroup": sec.run_as_user, "fsGroup": sec.run_as_user,
                                      "fsGroupChangePolicy": "OnRootMismatch",
                                      "seccompProfile": {"type": "RuntimeDefault"}}}
    if init_containers:
        spec["initContainers"] = init_containers
    node_selector = s.node_selector if role.node_selector is None else role.node_selector
    tolerations = s.tolerations if role.tolerations is None else role.tolerations
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]
    if s.priority_class_name:
        spec["priorityClassName"] = s.priority_class_name
    if s.service_account_name:
        spec["serviceAccountName"] = s.service_account_name
    if s.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    return spec


def _container(run: Run, name: str, image: str, command: list[str], *, env: list[dict] | None = None,
               resources: dict | None = None, mounts: list[dict] | None = None) -> dict:
    # /tmp is the one writable place besides the mounted volumes; HOME points there for the caches that
    # vLLM, torch and triton keep under ~ (the root filesystem is read-only).
    # USER: the uid has no passwd entry in the image unless it is the image's own (getpass.getuser(), which torch's
    # and triton's cache paths use, fails without one or the other).
    c = {"name": name, "image": image, "imagePullPolicy": run.cluster.image_pull_policy, "command": command,
         "env": [*(env or []), {"name": "HOME", "value": "/tmp"}, {"name": "USER", "value": POD_USER}],
         "volumeMounts": [*(mounts or []), {"name": "tmp", "mountPath": "/tmp"}],
         "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                             "readOnlyRootFilesystem": run.cluster.security.read_only_root_filesystem},
         # A failing stage's last log lines (its one-line "error: ..." reason) become the pod's termination
         # message, which the operator copies into the run's status.
         "terminationMessagePolicy": "FallbackToLogsOnError"}
    if resources:
        c["resources"] = resources
    return c


def _metrics_port() -> dict:
    return {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}


def _shm(size) -> dict:
    return {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def _cache_volume(run: Run) -> dict:
    claim = run.cluster.inference.model_cache_claim
    if claim:
        return {"name": "hf-cache", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "hf-cache", "emptyDir": {}}


# -- serving ----------------------------------------------------------------------------------------------------------


def served_model(run: Run) -> str:
    return run.cluster.inference.model or run.config.models.base


def max_lora_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def served_prefixes(run: Run, model: int) -> dict[str, str]:
    """Store prefix of each role's trained model that serving `model` pulls: iteration `model`'s, or for the
    length-following model (LF_MODEL) that model as the Generator (with LoRA beside the last iteration's
    Extender)."""
    full = run.config.training.mode == "full"
    if model == LF_MODEL:
        last = run.config.iterations
        return {role: model_prefix(run.name, last, LENGTH_FOLLOWING if role == "generator" else role)
                for role in (("generator",) if full else ("generator", "extender"))}
    return {role: model_prefix(run.name, model, role) for role in ("generator", "extender")}


@dataclass(frozen=True)
class ServedPart:
    """One vLLM server of a serving pod: what it loads, under which names, on which port (the pod's containers
    share its network namespace, so each listens on its own)."""

    container: str
    port_name: str
    port: int
    weights: str
    names: tuple[str, ...]


def served_parts(run: Run, model: int) -> list[ServedPart]:
    """The vLLM servers of model `model`'s pod. One, except with full fine-tuning: vLLM serves one model a
    process, and each role's trained weights are a model of their own, so model k (k >= 1) has three, the
    Generator's, the Extender's and the base model (self-instruct asks it in every iteration), each with its own
    GPUs; the length-following model has its own weights under the Generator's name."""
    cfg, port = run.config, run.cluster.inference.port
    gen, ext = literal(cfg.models.generator), literal(cfg.models.extender)
    if model == 0:  # the base model, also under its own name
        return [ServedPart("vllm", "http", port, literal(served_model(run)), (gen, ext, BASE_MODEL_NAME))]
    if cfg.training.mode != "full":  # the base model plus both adapters (see serving_deployment)
        return [ServedPart("vllm", "http", port, literal(served_model(run)), (BASE_MODEL_NAME,))]
    parts = [ServedPart("vllm", "http", port, f"{ADAPTERS_DIR}/generator", (gen,))]
    if model != LF_MODEL:
        parts += [ServedPart("vllm-extender", "http-extender", port + 1, f"{ADAPTERS_DIR}/extender", (ext,)),
                  ServedPart("vllm-base", "http-base", port + 2, literal(served_model(run)), (BASE_MODEL_NAME,))]
    return parts


def serving_deployment(run: Run, model: int, attempt: int, *, replicas: int | None = None) -> dict:
    """vLLM serving model `model`: the base model (0), or the adapters (or full weights) trained in iteration
    `model` (or the length-following model, LF_MODEL), pulled from the store by an init container."""
    inf, cfg = run.cluster.inference, run.config
    name = deployment_name(run.name, model, attempt)
    init: list[dict] = []
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "hf-cache", "mountPath": HF_HOME}]
    volumes = [_shm(inf.shm_size), _cache_volume(run)]
    lora: list[str] = []
    if model > 0 and cfg.training.mode != "full":
        roles = (literal(cfg.models.generator), literal(cfg.models.extender))
        adapters = [f"{roles[0]}={ADAPTERS_DIR}/generator", f"{roles[1]}={ADAPTERS_DIR}/extender"]
        # --max-loras: adapters in one batch (vLLM's default 1 would serialize the Generator and the Extender)
        lora = ["--enable-lora", "--max-lora-rank", str(max_lora_rank(cfg.training.lora.rank)), "--max-loras",
                str(len(adapters)), "--lora-modules", *adapters]
    if model > 0:
        pairs = [f"{literal(prefix)}={ADAPTERS_DIR}/{role}" for role, prefix in served_prefixes(run, model).items()]
        fetch_cmd = ["python", "-m", "selflengthen.operator.fetch", "--storage", literal(cfg.storage.uri)]
        if cfg.storage.endpoint_url:
            fetch_cmd += ["--endpoint-url", literal(cfg.storage.endpoint_url)]
        init.append(_container(run, "fetch-models", run.cluster.image, [*fetch_cmd, *pairs],
                               env=storage_env(run), mounts=[{"name": "adapters", "mountPath": ADAPTERS_DIR}],
                               resources=_resources(inf, resources=inf.fetch_resources)))
        volumes.append({"name": "adapters", "emptyDir": {}})
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True})
    containers = []
    for i, part in enumerate(served_parts(run, model)):
        args = [part.weights, "--served-model-name", *part.names, *lora,
                "--host", "0.0.0.0", "--port", str(part.port),
                "--tensor-parallel-size", str(inf.tensor_parallel_size),
                "--gpu-memory-utilization", str(inf.gpu_memory_utilization)]
        if inf.max_model_len:
            args += ["--max-model-len", str(inf.max_model_len)]
        args += [literal(a) for a in inf.extra_args]
        env = hf_env(run)
        # compile caches kept on the claim across iterations (operator/compile_cache.py): the first server's only
        # (with full fine-tuning the others compile cold; one pod directory written by several would race)
        if inf.model_cache_claim and i == 0:
            init += compile_cache_containers(run, args)
            volumes.append({"name": "compile-cache", "emptyDir": {}})
            env += compile_cache_env()
        period = 10
        http = {"path": "/health", "port": part.port_name}
        own_mounts = mounts + ([{"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR}]
                               if inf.model_cache_claim and i == 0 else [])
        container = _container(run, part.container, inf.image, ["vllm", "serve", *args], env=env,
                               mounts=own_mounts, resources=_resources(inf, inf.tensor_parallel_size))
        container["ports"] = [{"name": part.port_name, "containerPort": part.port, "protocol": "TCP"}]
        container["startupProbe"] = {"httpGet": http, "periodSeconds": period, "timeoutSeconds": 5,
                                     "failureThreshold": max(1, math.ceil(inf.startup_timeout_seconds / period))}
        container["readinessProbe"] = {"httpGet": http, "periodSeconds": 5, "timeoutSeconds": 5,
                                       "failureThreshold": 3}
        container["livenessProbe"] = {"httpGet": http, "periodSeconds": 20, "timeoutSeconds": 10,
                                      "failureThreshold": 3}
        containers.append(container)
    pod_labels = labels(run, "inference", model=model, attempt=attempt)
    meta = _meta(run, name, "inference", model=model, attempt=attempt)
    if run.cluster.scheduling.queue_name:
        meta["labels"][KUEUE_LABEL] = run.cluster.scheduling.queue_name
    pod = _pod_spec(run, containers, role=inf, restart="Always", volumes=volumes, init_containers=init)
    pod["terminationGracePeriodSeconds"] = 30
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": inf.replicas if replicas is None else replicas,
            "strategy": {"type": "Recreate"},  # GPUs: never two generations side by side
            "selector": {"matchLabels": {LABEL_RUN: run.name, LABEL_MODEL: str(model), LABEL_ATTEMPT: str(attempt),
                                         LABEL_COMPONENT: "inference"}},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


def compile_cache_env() -> list[dict]:
    """vLLM's torch.compile cache, Inductor's and Triton's, all in the pod's own directory (seeded from the claim)."""
    return [{"name": "VLLM_CACHE_ROOT", "value": f"{COMPILE_CACHE_DIR}/vllm"},
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{COMPILE_CACHE_DIR}/inductor"},
            {"name": "TRITON_CACHE_DIR", "value": f"{COMPILE_CACHE_DIR}/triton"}]


def compile_cache_key(run: Run, args: list[str]) -> str:
    """What vLLM compiles for depends on its image and arguments: one snapshot series per (image, arguments), so
    that runs sharing a claim, and the base model against the adapters, never seed each other's caches."""
    return hashlib.sha256("\0".join([run.cluster.inference.image, *args]).encode()).hexdigest()[:16]


def compile_cache_containers(run: Run, args: list[str]) -> list[dict]:
    """The init container that seeds the pod's compile cache from the claim, and the sidecar (an init container
    with restartPolicy Always, Kubernetes >= 1.29) that publishes it back once vLLM is healthy."""
    inf = run.cluster.inference
    shared = f"{HF_HOME}/{COMPILE_CACHE_SUBDIR}/{compile_cache_key(run, args)}"
    mounts = [{"name": "hf-cache", "mountPath": HF_HOME}, {"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR}]
    cmd = ["python", "-m", "selflengthen.operator.compile_cache"]
    where = ["--shared", shared, "--local", COMPILE_CACHE_DIR]
    resources = _resources(inf, resources=inf.fetch_resources)
    seed = _container(run, "seed-compile-cache", run.cluster.image, [*cmd, "seed", *where], mounts=mounts,
                      resources=resources)
    publish = _container(run, "publish-compile-cache", run.cluster.image,
                         [*cmd, "publish", *where, "--health-url", f"http://127.0.0.1:{inf.port}/health",
                          "--timeout", str(inf.startup_timeout_seconds)], mounts=mounts, resources=resources)
    publish["restartPolicy"] = "Always"
    return [seed, publish]


def serving_service(run: Run, model: int) -> dict:
    """The Service of model `model`'s vLLM pods. With client.balancePerRequest it is headless (clusterIP None):
    its name resolves to every ready pod, and the client sends each request to the one with the fewest in flight
    (a ClusterIP resolves to one virtual IP, balanced per connection)."""
    spec: dict = {
        "type": "ClusterIP",
        "selector": {LABEL_RUN: run.name, LABEL_MODEL: str(model), LABEL_COMPONENT: "inference"},
        "ports": [{"name": p.port_name, "port": p.port, "targetPort": p.port_name, "protocol": "TCP"}
                  for p in served_parts(run, model)],
    }
    if run.config.client.balance_per_request:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, serving_name(run.name, model), "inference", model=model),
        "spec": spec,
    }


def _url(run: Run, model: int, port: int) -> str:
    return f"http://{serving_name(run.name, model)}.{run.namespace}.svc:{port}/v1"


def endpoint(run: Run, model: int) -> str:
    """The stages' endpoint for model `model`: its (first) server's."""
    return _url(run, model, served_parts(run, model)[0].port)


def model_endpoints(run: Run, model: int) -> dict[str, str]:
    """The served names of model `model` that are not at endpoint() (full fine-tuning), with their URLs."""
    return {name: _url(run, model, part.port) for part in served_parts(run, model)[1:] for name in part.names}


# -- stage Jobs -------------------------------------------------------------------------------------------------------


def _stage_command(stage: str, iteration: int, endpoint_url: str | None,
                   routes: dict[str, str] | None = None) -> list[str]:
    cmd = ["stage", stage, "--config", CONFIG_FILE, "--iteration", str(iteration), "--metrics-port", str(METRICS_PORT)]
    if endpoint_url:
        cmd += ["--endpoint", endpoint_url]
    for name, url in sorted((routes or {}).items()):  # full fine-tuning: the models served elsewhere in the pod
        cmd += ["--model-endpoint", f"{name}={url}"]
    return cmd


def _job(run: Run, name: str, component: str, iteration: int, stage: str, attempt: int, pod: dict, *,
         suspend: bool, completions: int = 1) -> dict:
    meta = _meta(run, name, component, iteration=iteration, stage=stage, attempt=attempt)
    pod_labels = labels(run, component, iteration=iteration, stage=stage, attempt=attempt)
    if run.cluster.scheduling.queue_name:
        meta["labels"][KUEUE_LABEL] = run.cluster.scheduling.queue_name
    spec: dict = {
        # The operator retries a failed stage itself (a new attempt, recorded in the run's status): a container
        # that fails fails the Job at once.
        "backoffLimit": 0,
        # ...but a pod killed from outside (preemption, eviction, a drain, its node lost: the pod gets the
        # DisruptionTarget condition) is not the stage's fault: the Job replaces it without counting a failure,
        # and the new pod resumes from the store (finished shards, the last training checkpoint).
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        # a replacement only once the old pod has stopped (it holds GPUs until then)
        "podReplacementPolicy": "Failed",
        # past the stage's deadline the Job fails (DeadlineExceeded) and the operator retries it
        "activeDeadlineSeconds": run.cluster.deadlines.stage(stage),
        "completions": completions,
        "parallelism": completions,
        "suspend": suspend,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod},
    }
    if completions > 1:
        spec["completionMode"] = "Indexed"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def _config_volume(run: Run) -> dict:
    return {"name": "config", "configMap": {"name": config_map_name(run.name)}}


def stage_job(run: Run, iteration: int, stage: str, attempt: int, *, endpoint_url: str | None = None,
              routes: dict[str, str] | None = None, suspend: bool = False) -> dict:
    """A Job running `selflengthen stage STAGE` (data stages, build-sft, the evaluations, collect): CPU only."""
    needs_server = stage_table.stage(stage).served
    if needs_server and not endpoint_url:
        raise ValueError(f"stage {stage} needs the inference endpoint")
    name = job_name(run.name, iteration, stage, attempt)
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "work", "mountPath": WORKDIR}, {"name": "hf-cache", "mountPath": HF_HOME}]
    env = [*storage_env(run), *hf_env(run), {"name": "SELFLENGTHEN_WORKDIR", "value": WORKDIR}]
    if needs_server:  # API keys (the judge's) for the stages that talk to models
        env += [{"name": e.name, "valueFrom": {"secretKeyRef": {"name": e.secret_key_ref.name,
                                                                 "key": e.secret_key_ref.key}}}
                for e in run.cluster.secret_env]
    jobs = run.cluster.cpu_jobs
    container = _container(run, "stage", run.cluster.image,
                           ["selflengthen", *_stage_command(stage, iteration, endpoint_url, routes)],
                           env=env, mounts=mounts, resources=_resources(jobs))
    container["ports"] = [_metrics_port()]
    pod = _pod_spec(run, [container], role=jobs, restart="Never",
                    volumes=[_config_volume(run), {"name": "work", "emptyDir": {}}, _cache_volume(run)])
    component = "evaluation" if stage_table.stage(stage).phase == "Evaluating" else "data"
    return _job(run, name, component, iteration, stage, attempt, pod, suspend=suspend)


def training_job(run: Run, iteration: int, stage: str, attempt: int, *, suspend: bool = False) -> dict:
    """A GPU Job running a training stage; several nodes: an Indexed Job whose pods meet through torchrun's
    static rendezvous at index 0, reached through the headless Service of the same name."""
    t = run.cluster.training
    name = job_name(run.name, iteration, stage, attempt)
    stage_args = _stage_command(stage, iteration, None)
    env = [*storage_env(run), *hf_env(run), {"name": "SELFLENGTHEN_WORKDIR", "value": WORKDIR}]
    if t.nodes == 1 and t.processes_per_node == 1:
        command = ["selflengthen", *stage_args]
    elif t.nodes == 1:
        command = ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", str(t.processes_per_node),
                   "-m", "selflengthen", *stage_args]
    else:
        env += [
            {"name": "MASTER_ADDR", "value": f"{name}-0.{name}.{run.namespace}.svc"},
            {"name": "MASTER_PORT", "value": str(t.rendezvous_port)},
            {"name": "NNODES", "value": str(t.nodes)},
            {"name": "NPROC_PER_NODE", "value": str(t.processes_per_node)},
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        ]
        command = ["torchrun", "--nnodes", "$(NNODES)", "--nproc-per-node", "$(NPROC_PER_NODE)",
                   "--node-rank", "$(NODE_RANK)", "--master-addr", "$(MASTER_ADDR)", "--master-port",
                   "$(MASTER_PORT)", "-m", "selflengthen", *stage_args]
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "shm", "mountPath": "/dev/shm"},
              {"name": "work", "mountPath": WORKDIR}, {"name": "hf-cache", "mountPath": HF_HOME}]
    container = _container(run, "train", run.cluster.training_image, command, env=env, mounts=mounts,
                           resources=_resources(t, t.processes_per_node))
    container["ports"] = [_metrics_port()]
    if t.nodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": t.rendezvous_port, "protocol": "TCP"})
    pod = _pod_spec(run, [container], role=t, restart="Never",
                    volumes=[_config_volume(run), _shm(t.shm_size), {"name": "work", "emptyDir": {}},
                             _cache_volume(run)])
    if t.nodes > 1:
        pod["subdomain"] = name
    return _job(run, name, "training", iteration, stage, attempt, pod, suspend=suspend, completions=t.nodes)


def training_service(run: Run, iteration: int, stage: str, attempt: int) -> dict:
    """Headless Service giving the pods of a multi-node training Job stable DNS names (<job>-<index>.<job>)."""
    name = job_name(run.name, iteration, stage, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, name, "training", iteration=iteration, stage=stage, attempt=attempt),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before anything is ready
            "selector": {JOB_NAME_LABEL: name},
            "ports": [{"name": "rendezvous", "port": run.cluster.training.rendezvous_port, "protocol": "TCP"}],
        },
    }
