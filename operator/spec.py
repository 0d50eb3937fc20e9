"""The SelfLengthenRun spec: the run configuration (pipeline.config.RunConfig) plus the cluster-only sections.

The spec is one flat object on the cluster. Its run-configuration part is RunConfig without the fields that only
make sense on one machine (`name` comes from metadata.name, `local`, `models.endpoint`, `models.apiKeyEnv`: the
operator serves the models itself). The cluster part is the pydantic models below. Both become the CRD's schema
(operator/crd.py), and `parse_spec` splits a spec back into (RunConfig, ClusterSpec) with the same error format as
the pipeline's configuration errors.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from ..pipeline import stage_table
from ..pipeline.config import ConfigError, RunConfig, _format_errors
from ..pipeline.stage_table import DATA_STAGES, LENGTH_FOLLOWING_STAGES, TRAIN_STAGES
from ..pipeline.stages import iteration_stages
from ..pipeline.vllm_flags import check_extra_args, check_positional
from ..pipeline.vllm_flags_table import OPTIONS
from . import k8sformat

# RunConfig fields that are not part of the cluster spec (dotted snake_case paths).
EXCLUDED_CONFIG_FIELDS = ("name", "local", "models.endpoint", "models.api_key_env")

# The stages, in order, and what each needs: pipeline/stage_table.py (the contract both orchestrators run).
EVAL_STAGE = stage_table.EVALUATE_STAGE
COLLECT_STAGE = stage_table.COLLECT_STAGE  # once after the last iteration, with its models (collect.enabled)
# optional, after collect (lengthFollowing.enabled): a training Job, then an evaluation served by its model
LF_TRAIN_STAGE, LF_EVAL_STAGE = LENGTH_FOLLOWING_STAGES
ALL_STAGES = stage_table.NAMES
# The model index of the length-following model, served for its evaluation (iterations' models are 0..100).
LF_MODEL = 101
SERVING = "serving"  # the pseudo-stage of bringing the vLLM server up (retried and timed like a stage)

RESOURCE_KEY = r"^([a-z0-9.-]+/)?[a-zA-Z0-9][-._a-zA-Z0-9]*$"
# The formats the API server and the kubelet check (operator/k8sformat.py), as patterns the CRD can carry too.
QUANTITY = rf"^{k8sformat.NONNEGATIVE_QUANTITY}$"  # resource.Quantity, no negatives
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# a label key / nodeSelector key: [DNS-subdomain prefix/]name, the name at most 63 characters
QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
IMAGE = rf"^{k8sformat.IMAGE_REFERENCE}$"
# vLLM flags the operator sets itself (in any spelling: pipeline/vllm_flags.py), and the setting that owns each:
# passing them again in inference.extraArgs would conflict.
RESERVED_VLLM_SETTINGS = {
    "--model": "inference.model (or models.base)", "--port": "inference.port", "--host": "nothing (the operator)",
    "--served-model-name": "models.generator and models.extender",
    "--tensor-parallel-size": "inference.tensorParallelSize", "--enable-lora": "training.mode",
    "--lora-modules": "training.mode", "--max-lora-rank": "training.lora.rank",
    "--max-loras": "nothing (the number of adapters served)",
    "--max-model-len": "inference.maxModelLen", "--gpu-memory-utilization": "inference.gpuMemoryUtilization",
}
RESERVED_VLLM_FLAGS = tuple(RESERVED_VLLM_SETTINGS)
# Longest run name: the hostname of an Indexed Job's pod, `<run>-i<KK>-<stage>-a<N>-<index>`, must stay a DNS label
# (63) for every allowed value: 100 iterations, the longest stage (train-generator), attempt 9, node index 127.
MAX_RUN_NAME = 63 - len("-i100-train-generator-a9-127")

Quantity = Annotated[Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=QUANTITY, max_length=64)],
                     Field()]


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


MAX_RESOURCES = 32  # resource names per requests/limits map (bounds the CRD rules that iterate them)
Image = Annotated[str, Field(min_length=1, max_length=4096, pattern=IMAGE)]


class Resources(Model):
    """Container resources other than GPUs (cpu, memory, ephemeral-storage, RDMA devices, ...)."""

    requests: dict[Annotated[str, Field(pattern=RESOURCE_KEY, max_length=316)], Quantity] = Field(
        default_factory=dict, max_length=MAX_RESOURCES)
    limits: dict[Annotated[str, Field(pattern=RESOURCE_KEY, max_length=316)], Quantity] = Field(
        default_factory=dict, max_length=MAX_RESOURCES)


class SecretKeyRef(Model):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Secret in the run's namespace")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class SecretEnv(Model):
    """An environment variable of the stage Jobs taken from a Secret, e.g. the judge's API key
    (evaluate.judge.apiKeyEnv names the variable)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)
    secret_key_ref: SecretKeyRef


class Toleration(Model):
    key: str | None = Field(None, max_length=316, pattern=QUALIFIED_NAME, description="A taint key (label key)")
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, description="Only with effect NoExecute")


# node label keys and values, as the API server checks them (bounded: the CRD's rules iterate the keys)
NodeSelector = Annotated[dict[Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME)],
                              Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]], Field(max_length=64)]


def _role_node_selector(role: str):
    return Field(None, description=f"nodeSelector of the {role} pods, replacing scheduling.nodeSelector for them "
                 "({} : none); unset: scheduling.nodeSelector")


def _role_tolerations(role: str):
    return Field(None, max_length=32, description=f"Tolerations of the {role} pods, replacing "
                 "scheduling.tolerations for them ([] : none); unset: scheduling.tolerations")


def _resources(requests: dict, limits: dict, what: str):
    def words(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items())

    return Field(default_factory=lambda: Resources(requests=dict(requests), limits=dict(limits)),
                 description=f"Resources of {what}; default: requests {words(requests)}, limits {words(limits)} (a "
                 "namespace whose ResourceQuota asks for requests admits them; setting this replaces both)")


class Inference(Model):
    """The vLLM server of each macro-iteration (a Deployment and its Service)."""

    image: Image = Field("vllm/vllm-openai:v0.32.0", description="vLLM OpenAI-compatible server image")
    model: str | None = Field(
        None, min_length=1, description="What vLLM loads (Hugging Face name or path in the image/cache); "
        "default: models.base")
    tensor_parallel_size: int = Field(1, ge=1, le=16, description="GPUs per replica (vLLM --tensor-parallel-size)")
    replicas: int = Field(1, ge=1, le=64)
    max_model_len: int | None = Field(None, ge=256, le=1_048_576, description="vLLM --max-model-len")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    gpu_resource: str = Field("nvidia.com/gpu", pattern=RESOURCE_KEY, description="Extended resource name of a GPU")
    resources: Resources = Field(default_factory=Resources)
    shm_size: Quantity = Field("16Gi", description="Size of the /dev/shm memory volume")
    extra_args: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="More vLLM arguments, one per item")
    port: int = Field(8000, ge=1024, le=65535)
    startup_timeout_seconds: int = Field(
        1800, ge=1, le=86_400, description="Fail Serving when the server is not healthy this long after it starts")
    hf_token_secret: SecretKeyRef | None = Field(None, description="Hugging Face token (gated models), as HF_TOKEN")
    model_cache_claim: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="PVC mounted as the Hugging Face cache of every pod (else an emptyDir each), so that only the "
        "first pod downloads the model; it also keeps vLLM's compile caches (torch.compile, Inductor, Triton) "
        "across iterations, as snapshots each vLLM pod seeds from and publishes to. Pods on several nodes share it "
        "(replicas, training nodes, CPU Jobs), so it must be ReadWriteMany; a ReadWriteOnce claim attaches to one "
        "node only and the pods elsewhere stay Pending")
    fetch_resources: Resources = _resources({"cpu": "500m", "memory": "1Gi"}, {"memory": "4Gi"},
                                            "the init container that fetches trained models from the store "
                                            "(and those that seed and publish the compile cache)")
    node_selector: NodeSelector | None = _role_node_selector("vLLM")
    tolerations: list[Toleration] | None = _role_tolerations("vLLM")


class TrainingJobs(Model):
    """Where the fine-tuning Jobs run (merged into spec.training beside the run configuration's hyperparameters)."""

    image: Image | None = Field(
        None, description="Training image (torch, transformers, peft); default: the selflengthen-training "
        "image beside spec.image (its repository name + '-training', the same registry and tag: what `make images` "
        "builds)")
    nodes: int = Field(1, ge=1, le=128, description="More than 1: an Indexed Job with torchrun rendezvous")
    processes_per_node: int = Field(1, ge=1, le=16, description="torchrun processes (and GPUs) per node")
    gpu_resource: str = Field("nvidia.com/gpu", pattern=RESOURCE_KEY)
    resources: Resources = Field(default_factory=Resources)
    shm_size: Quantity = Field("32Gi")
    rendezvous_port: int = Field(29500, ge=1024, le=65535)
    concurrent: bool = Field(
        False, description="Train the Generator and the Extender at the same time: two Jobs of nodes x "
        "processesPerNode GPUs each, so the cluster needs room for both (e.g. two nodes, or processesPerNode 4 on one "
        "8-GPU node); false: one after the other, each with all of them")
    node_selector: NodeSelector | None = _role_node_selector("training")
    tolerations: list[Toleration] | None = _role_tolerations("training")


class CpuJobs(Model):
    """The CPU stage Jobs (self-instruct, respond, extend, build-sft, evaluate, collect): HTTP to vLLM and S3."""

    resources: Resources = _resources({"cpu": "1", "memory": "2Gi"}, {"memory": "8Gi"}, "each CPU stage Job's pod")
    node_selector: NodeSelector | None = _role_node_selector("CPU stage Job")
    tolerations: list[Toleration] | None = _role_tolerations("CPU stage Job")


class StorageAccess(Model):
    """How pods reach the store (merged into spec.storage beside the run configuration's uri and endpointUrl)."""

    credentials_secret: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN, "
        "AWS_REGION); none: the pods' own identity (IRSA, workload identity)")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", min_length=1, max_length=253)
    secret_access_key_key: str = Field("AWS_SECRET_ACCESS_KEY", min_length=1, max_length=253)
    region: str | None = Field(None, min_length=1, max_length=64, description="AWS_REGION for the pods")


class Scheduling(Model):
    node_selector: NodeSelector = Field(
        default_factory=dict, description="nodeSelector of every pod (inference, training and cpuJobs may replace it)")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32,
        description="Tolerations of every pod (inference, training and cpuJobs may replace them)")
    priority_class_name: str | None = Field(None, pattern=DNS_SUBDOMAIN, max_length=253)
    queue_name: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=63,
        description="Kueue LocalQueue: Jobs are created suspended and admitted by Kueue (it becomes the label "
        "kueue.x-k8s.io/queue-name: at most 63 characters)")
    service_account_name: str | None = Field(None, pattern=DNS_SUBDOMAIN, max_length=253)
    image_pull_secrets: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]] = Field(
        default_factory=list, max_length=16)


class Retry(Model):
    max_attempts: int = Field(3, ge=1, le=9, description="Attempts per stage (the first included)")
    stages: dict[Annotated[str, Field(max_length=32)], Annotated[int, Field(ge=1, le=9)]] = Field(
        default_factory=dict, max_length=16,
        description="Per-stage attempt limits overriding maxAttempts (stage name -> attempts)")
    backoff_seconds: int = Field(30, ge=0, le=3600, description="Wait before the 2nd attempt; doubles after")
    max_backoff_seconds: int = Field(900, ge=0, le=86_400)

    def limit(self, stage: str) -> int:
        return self.stages.get(stage, self.max_attempts)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after `failures` failed attempts before the next one."""
        return float(min(self.backoff_seconds * 2 ** max(failures - 1, 0), self.max_backoff_seconds))


# Sized for the paper's setting (Qwen2-7B, 5,000 instructions, answers up to 16k tokens, one 8-GPU node) with a wide
# margin: a stage past its deadline is hung, not slow.
DEFAULT_STAGE_DEADLINES = {"self-instruct": 12 * 3600, "respond": 48 * 3600, "extend": 72 * 3600,
                           "build-sft": 2 * 3600, "train-generator": 72 * 3600, "train-extender": 72 * 3600,
                           "evaluate": 12 * 3600, "collect": 24 * 3600, "train-length-following": 72 * 3600,
                           "evaluate-length-following": 12 * 3600}


class Deadlines(Model):
    stages: dict[str, Annotated[int, Field(ge=60, le=30 * 86_400)]] = Field(
        default_factory=dict, max_length=len(DEFAULT_STAGE_DEADLINES),
        description="Seconds a stage's Job may run (its activeDeadlineSeconds; past it the attempt fails with "
        "DeadlineExceeded and is retried), per stage name, overriding the defaults: "
        + ", ".join(f"{k} {v // 3600}h" for k, v in DEFAULT_STAGE_DEADLINES.items()))
    stuck_seconds: int = Field(
        1800, ge=60, le=86_400,
        description="A pod stuck (ImagePullBackOff, ErrImagePull, CreateContainerConfigError, Unschedulable, or no "
        "pod created: a quota or admission refusal) shows as Degraded at once; after this long the run is Failed "
        "with that reason (30 min by default: time for a cluster autoscaler to add GPU nodes)")

    def stage(self, stage: str) -> int:
        return self.stages.get(stage, DEFAULT_STAGE_DEADLINES[stage])


class Retention(Model):
    artifacts: Literal["Retain", "Delete"] = Field(
        "Retain", description="On deletion of the run: keep the S3 artifacts or delete them")
    jobs: Literal["Retain", "Delete"] = Field(
        "Retain", description="When the run has finished: keep the finished Jobs (and their logs) or delete them")


class Security(Model):
    """How every pod of a run runs: never as root, no privilege escalation, no capabilities, seccomp
    RuntimeDefault; a read-only root filesystem with a writable /tmp (also $HOME) unless turned off for an image
    that must write elsewhere."""

    run_as_user: int = Field(10001, ge=1, le=2_147_483_647, description="UID (and GID) of every container; not 0")
    read_only_root_filesystem: bool = True


TRAINING_SUFFIX = "-training"


def training_image_beside(image: str) -> str | None:
    """`REGISTRY/NAME:TAG` -> `REGISTRY/NAME-training:TAG`, the training image `make images` builds beside the
    selflengthen image (an image already named *-training is itself); None for an image pinned by digest, whose
    sibling cannot be named."""
    if "@" in image:
        return None
    repo, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # no tag (a registry port is not one)
        repo, tag = image, ""
    if not repo.endswith(TRAINING_SUFFIX):
        repo += TRAINING_SUFFIX
    return repo + (f":{tag}" if tag else "")


class ClusterSpec(Model):
    """The cluster-only part of a SelfLengthenRun spec."""

    image: Image = Field(description="The selflengthen image: data, build-sft and evaluate Jobs")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    suspend: bool = Field(False, description="Stop starting work and suspend running Jobs; false resumes")
    inference: Inference = Field(default_factory=Inference)
    training: TrainingJobs = Field(default_factory=TrainingJobs)
    cpu_jobs: CpuJobs = Field(default_factory=CpuJobs)
    storage: StorageAccess = Field(default_factory=StorageAccess)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    retry: Retry = Field(default_factory=Retry)
    deadlines: Deadlines = Field(default_factory=Deadlines)
    retention: Retention = Field(default_factory=Retention)
    security: Security = Field(default_factory=Security)
    secret_env: list[SecretEnv] = Field(
        default_factory=list, max_length=32,
        description="Variables of the data, evaluate and collect Jobs taken from Secrets (API keys)")

    @property
    def training_image(self) -> str:
        """The image of the training Jobs: training.image, else the training image beside spec.image."""
        image = self.training.image or training_image_beside(self.image)
        if image is None:  # cross_field_errors refuses such a spec
            raise ValueError("training.image: required when spec.image is pinned by digest")
        return image


def cluster_fields(section: str | None = None) -> set[str]:
    """camelCase names of the cluster fields at the top of the spec, or inside a merged section."""
    model: type[BaseModel] = ClusterSpec
    if section is not None:
        model = ClusterSpec.model_fields[_snake(section)].annotation  # type: ignore[assignment]
    return {f.alias or name for name, f in model.model_fields.items()}


def config_fields() -> set[str]:
    return {f.alias or n for n, f in RunConfig.model_fields.items() if n not in EXCLUDED_CONFIG_FIELDS}


def merged_sections() -> set[str]:
    """Top-level keys that both the run configuration and the cluster part define (one object on the cluster)."""
    return cluster_fields() & config_fields()


def _snake(name: str) -> str:
    for n, f in ClusterSpec.model_fields.items():
        if (f.alias or n) == name:
            return n
    raise KeyError(name)


def split_spec(spec: dict) -> tuple[dict, dict]:
    """Split a spec (camelCase dict) into (run-configuration part, cluster part)."""
    cluster_keys, merged = cluster_fields(), merged_sections()
    config: dict = {}
    cluster: dict = {}
    for key, value in spec.items():
        if key in merged and isinstance(value, dict):
            inner = cluster_fields(key)
            cluster[key] = {k: v for k, v in value.items() if k in inner}
            config[key] = {k: v for k, v in value.items() if k not in inner}
        elif key in cluster_keys:
            cluster[key] = value
        else:
            config[key] = value
    return config, cluster


def parse_spec(name: str, spec: dict) -> tuple[RunConfig, ClusterSpec]:
    """Validate a SelfLengthenRun spec; ConfigError names each bad field by its path under `spec`."""
    if not isinstance(spec, dict):
        raise ConfigError("invalid SelfLengthenRun: spec must be a mapping")
    config_part, cluster_part = split_spec(spec)
    errors: list[str] = []
    for key in config_part:
        if key in {"name", "local"}:
            errors.append(f"{key}: unknown field (set by the operator)")
    models = config_part.get("models")
    if isinstance(models, dict):
        for key in ("endpoint", "apiKeyEnv"):
            if key in models:
                errors.append(f"models.{key}: unknown field (the operator serves the models)")
    config = cluster = None
    try:
        config = RunConfig.model_validate({**config_part, "name": name})
    except ValidationError as err:
        errors.extend(_format_errors(err).splitlines()[1:])
    try:
        cluster = ClusterSpec.model_validate(cluster_part)
    except ValidationError as err:
        errors.extend(_format_errors(err, ClusterSpec).splitlines()[1:])
    if not errors and config is not None and cluster is not None:
        errors.extend(cel_rule_errors(spec) + cross_field_errors(config, cluster))
    if errors:
        lines = [e.strip() for e in errors]
        raise ConfigError("invalid SelfLengthenRun spec:\n  " + "\n  ".join(f"spec.{e}" for e in lines))
    assert config is not None and cluster is not None
    return config, cluster


def cel_rule_errors(spec: dict) -> list[str]:
    """The CRD's own CEL rules (x-kubernetes-validations) run on a spec as the API server runs them on a create
    (transition rules need an old object: not here). The operator also acts where no admission checked the spec (a
    run applied before the CRD was, an API server without CEL): the rules are the CRD's, evaluated, never restated."""
    from .validation import spec_rule_errors  # validation reads the CRD, which is built from this module

    return spec_rule_errors(spec)


def cross_field_errors(config: RunConfig, cluster: ClusterSpec) -> list[str]:
    """The checks no CEL rule of the CRD makes (the pipeline's own flag parser, lengths a pattern cannot say, the
    Secret-fed variables, the training image's name)."""
    errors = []
    reserved = {OPTIONS[f]["dest"]: owner for f, owner in RESERVED_VLLM_SETTINGS.items()}
    problems = check_extra_args(cluster.inference.extra_args, reserved)
    if problems:
        errors.append(f"inference.extraArgs: must not repeat flags the operator sets, nor keys: {'; '.join(problems)}")
    if cluster.inference.model is not None:
        try:
            check_positional(cluster.inference.model)
        except ValueError as err:
            errors.append(f"inference.model: {err}")
    if cluster.training.image is None and training_image_beside(cluster.image) is None:
        errors.append("training.image: required when spec.image is pinned by digest (the training image beside it "
                      "cannot be named)")
    roles = (("scheduling", cluster.scheduling), ("inference", cluster.inference), ("training", cluster.training),
             ("cpuJobs", cluster.cpu_jobs))
    for where, section in roles:
        for key in section.node_selector or {}:  # the prefix's length, which the pattern cannot say
            errors.extend(f"{where}.nodeSelector.{key}: {m}" for m in k8sformat.qualified_name(key))
        for i, t in enumerate(section.tolerations or []):
            if t.key:
                errors.extend(f"{where}.tolerations.{i}.key: {m}" for m in k8sformat.qualified_name(t.key))
    judge = config.evaluate.judge
    secret_names = [e.name for e in cluster.secret_env]
    if judge.enabled and judge.api_key_env and judge.api_key_env not in secret_names:
        errors.append(f"evaluate.judge.apiKeyEnv: {judge.api_key_env} must come from a Secret: add it to secretEnv")
    reserved_env = sorted({"HOME", "SELFLENGTHEN_WORKDIR", "HF_HOME", "HF_TOKEN"} & set(secret_names)
                          | {n for n in secret_names if n.startswith("AWS_")})
    if reserved_env:
        errors.append(f"secretEnv: variables the operator sets itself ({', '.join(reserved_env)})")
    if len(set(secret_names)) != len(secret_names):
        errors.append("secretEnv: a variable is named twice")
    return errors


def may_overlap(cluster: ClusterSpec, earlier: tuple[int, str], later: tuple[int, str]) -> bool:
    """Whether step `later` may run while `earlier` (before it in run_steps) has not finished. The inputs of
    `later` never include `earlier`'s outputs in these cases, so the results are those of the plain order:
    - the evaluation of iteration k beside iteration k+1's data stages: the same server (model k) serves both, so
      the evaluation takes no serving start and no GPU time of its own;
    - with training.concurrent, train-extender beside train-generator (both read build-sft's sets only)."""
    (ke, se), (kl, sl) = earlier, later
    if se == EVAL_STAGE and sl in DATA_STAGES and kl == ke + 1:
        return True
    return cluster.training.concurrent and ke == kl and (se, sl) == TRAIN_STAGES[1:]


def runnable_steps(cluster: ClusterSpec, pending: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The steps to drive now: the first pending one, and each next pending one that may run beside every pending
    step before it (may_overlap), up to the first that may not."""
    out: list[tuple[int, str]] = []
    for i, step in enumerate(pending):
        if not all(may_overlap(cluster, earlier, step) for earlier in pending[:i]):
            break
        out.append(step)
    return out


def run_steps(config: RunConfig) -> list[tuple[int, str]]:
    """The (iteration, stage) steps of a run, in order: the operator's plan, shared by the state machine and the
    store observer."""
    return [(k, s) for k in range(1, config.iterations + 1) for s in iteration_stages(config, k)]
