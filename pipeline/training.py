"""Supervised fine-tuning of the Generator and the Extender (docs/method.md), on transformers + peft.

One function, `train_role(ctx, role)`, trains one role of one iteration on that iteration's build-sft set:

  * LoRA on all linear layers (training.lora) or full fine-tuning (training.mode);
  * each conversation is rendered with the tokenizer's own chat template; the loss is taken on the assistant
    turns only (labels -100 elsewhere), see `encode_conversation`;
  * bf16 on CUDA, float32 on CPU (bf16 when asked and the CPU has it); gradient checkpointing only when the step
    would not fit the device without it (training.gradientCheckpointing auto, pipeline/train_memory.py);
    length-grouped batches;
  * iteration k > 1 starts from the iteration k-1 adapter (or full weights) of the same role, read from the store;
  * distributed when launched under torchrun / accelerate: the HF Trainer does the data parallelism, rank 0 alone
    writes to the store, ranks meet at torch collectives (never at files);
  * every checkpoint goes to the store as it is saved; a restarted stage downloads the newest complete one and
    resumes from it (global step, optimizer, scheduler and RNG states included);
  * loss, learning rate, tokens/s and samples/s are logged per logging step (and kept in train-log.jsonl);
  * the final adapter (or full model, with its tokenizer) goes to the store, with a manifest.

The length-following stage (after the last iteration, stages/train_length_following.py) trains the pseudo-role
`length-following` the same way: the last iteration's Generator continued on collect's length-demand data mixed
with that iteration's Generator set (lengthFollowing.generatorSetFraction of it), under <run>/train-length-following/.

Its store keys (the checkpoints, the model, train-log.jsonl) are pipeline/layout.py's.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .layout import (
    CHECKPOINT,
    LENGTH_FOLLOWING,
    PART,
    ROLES,
    checkpoint_prefix,
    checkpoints_prefix,
    collect_prefix,
    model_prefix,
    sft_set_prefix,
    train_log_key,
)
from .layout import training_stage as stage_name
from .models import resolve_model
from .store import Store, dumps_jsonl, read_jsonl
from .treestore import delete_tree, download_tree, tree_complete, tree_manifest, upload_tree

log = logging.getLogger("selflengthen.train")
# the names of the roles' models, for the modules that serve them (the runner) and the tests
__all__ = ["LENGTH_FOLLOWING", "ROLES", "TrainingError", "fetch_trained_model", "model_prefix", "stored_checkpoints",
           "train_role", "train_stage"]
IGNORE_INDEX = -100


class TrainingError(RuntimeError):
    pass


# -- what a role reads and writes in the store (the keys: pipeline/layout.py) ---------------------------------------


def init_prefix(run: str, iteration: int, role: str) -> str | None:
    """The model a role's training continues from: the same role's of the iteration before (None in iteration 1:
    the base model); the length-following model continues from the Generator of its iteration (the last)."""
    if role == LENGTH_FOLLOWING:
        return model_prefix(run, iteration, "generator")
    return model_prefix(run, iteration - 1, role) if iteration > 1 else None


def data_sources(config: RunConfig, iteration: int, role: str) -> list[tuple[str, float]]:
    """(store prefix of part-*.jsonl SFT rows, share of its rows kept) that a role trains on."""
    run = config.name
    if role == LENGTH_FOLLOWING:
        return [(collect_prefix(run), 1.0),
                (sft_set_prefix(run, iteration, "generator"), config.length_following.generator_set_fraction)]
    return [(sft_set_prefix(run, iteration, role), 1.0)]


def stored_checkpoints(store: Store, run: str, iteration: int, role: str) -> list[int]:
    """Steps of the complete checkpoints in the store, ascending."""
    keys = store.list(checkpoints_prefix(run, iteration, role))
    return sorted(int(m.group(1)) for k in keys if (m := CHECKPOINT.search("/" + k)))


def workdir_root() -> Path:
    return Path(os.environ.get("SELFLENGTHEN_WORKDIR", ".selflengthen"))


def local_dir(run: str, iteration: int, role: str, workdir: Path | None = None) -> Path:
    if role == LENGTH_FOLLOWING:
        return (workdir or workdir_root()) / "train" / run / role
    return (workdir or workdir_root()) / "train" / run / f"iter-{iteration:02d}" / role


# -- trained models, for serving ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    path: Path  # local directory: a peft adapter (mode lora) or a whole model with its tokenizer (mode full)
    mode: str  # "lora" | "full"
    base: str  # the base model reference the adapter applies to (config models.base), resolved to a local path
    uri: str  # where it lives in the store


def fetch_trained_model(
    config: RunConfig, store: Store, iteration: int, role: str, workdir: Path | None = None
) -> TrainedModel:
    """A local copy of the model trained for `role` in `iteration` (downloaded once; reused while unchanged).
    For LoRA it is the adapter directory (serve with vLLM --enable-lora --lora-modules NAME=PATH over `base`);
    for full fine-tuning it is the whole model directory (serve it as the model)."""
    prefix = model_prefix(config.name, iteration, role)
    if not tree_complete(store, prefix):
        raise TrainingError(f"no trained {role} model for iteration {iteration} at {store.uri}/{prefix}")
    meta = tree_manifest(store, prefix)
    dest = (workdir or workdir_root()) / "models" / config.name / f"iter-{iteration:02d}" / role
    path = download_tree(store, prefix, dest)
    mode = meta.get("mode", "lora")
    base = resolve_model(config.models.base) if mode == "lora" else str(path)
    return TrainedModel(path=path, mode=mode, base=base, uri=f"{store.uri}/{prefix}")


# -- data -------------------------------------------------------------------------------------------------------------


def encode_conversation(tokenizer, messages: list[dict], cutoff: int | None = None) -> dict | None:
    """Token ids of the conversation rendered by the tokenizer's chat template, and labels that equal the ids on
    the assistant turns (their content and the template's end-of-turn after it) and IGNORE_INDEX elsewhere.

    Each assistant turn spans from the end of the rendering of the messages before it with the generation prompt
    to the end of the rendering that includes it; character offsets map those spans onto tokens, so a token merge
    across the boundary cannot shift the mask. With `cutoff`, fit_cutoff applies (the answer is never cut); None
    when the conversation has no label or does not fit. `prompt_span` is the token range of the content of the
    user turn before the first answer: the part fit_cutoff may shorten."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise TrainingError("the chat template does not render conversations prefix by prefix; cannot mask")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, _end) in enumerate(offsets):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    # the user content before the first answer, located in the rendering (its last occurrence before the answer)
    first = spans[0][0]
    users = [m for m in messages[: next(i for i, m in enumerate(messages) if m["role"] == "assistant")]
             if m["role"] == "user" and m.get("content")]
    span = (0, 0)
    if users:
        start = full.rfind(users[-1]["content"], 0, first)
        if start >= 0:
            end = start + len(users[-1]["content"])
            inside = [t for t, (a, _b) in enumerate(offsets) if start <= a < end]
            span = (inside[0], inside[-1] + 1) if inside else (0, 0)
    ex = {"input_ids": ids, "labels": labels, "prompt_span": span}
    return fit_cutoff(ex, cutoff)[0] if cutoff else ex


def fit_cutoff(ex: dict, cutoff: int) -> tuple[dict | None, str]:
    """An example of at most `cutoff` tokens whose answer is whole (with its end-of-turn): the reference's
    truncation cut the longest answers, the very examples the method exists for. Returns (example, outcome):
    "fits"; "prompt-cut", the end of the user content removed (for the Extender set, the end of the initial
    answer it is shown; one content token at least is kept); "dropped" (None) when even that cannot fit."""
    ids, labels = ex["input_ids"], ex["labels"]
    excess = len(ids) - cutoff
    if excess <= 0:
        return ex, "fits"
    a, b = ex.get("prompt_span", (0, 0))
    if b - a - excess < 1:
        return None, "dropped"
    keep = lambda seq: list(seq[: b - excess]) + list(seq[b:])  # noqa: E731
    return {"input_ids": keep(ids), "labels": keep(labels), "prompt_span": (a, b - excess)}, "prompt-cut"


def load_examples(store: Store, prefix: str, tokenizer, cutoff: int,
                  keep=None) -> tuple[list[dict], dict]:
    """Tokenized examples from the part-*.jsonl files right under prefix (not a stage's work/ shards), with
    counts: skipped (no answer), over `cutoff` with the prompt cut (promptCut), over it even so and left out
    (droppedOverLength); no answer is cut. keep(row) picks the rows used (default: all)."""
    import numpy as np

    keys = [k for k in store.list(prefix) if PART.fullmatch(k[len(prefix) + 1:])]
    examples, rows, skipped = [], 0, 0
    outcomes = {"fits": 0, "prompt-cut": 0, "dropped": 0}
    for key in keys:
        for row in read_jsonl(store, key):
            if keep is not None and not keep(row):
                continue
            rows += 1
            ex = encode_conversation(tokenizer, row["messages"], None)
            if ex is None:
                skipped += 1
                continue
            ex, outcome = fit_cutoff(ex, cutoff)
            outcomes[outcome] += 1
            if ex is None:
                continue
            # int32 arrays, not lists of Python ints: a 60M-token set then takes ~0.5 GB per rank, not ~4 GB
            examples.append({"input_ids": np.asarray(ex["input_ids"], dtype=np.int32),
                             "labels": np.asarray(ex["labels"], dtype=np.int32)})
    tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, {"rows": rows, "examples": len(examples), "skipped": skipped,
                      "promptCut": outcomes["prompt-cut"], "droppedOverLength": outcomes["dropped"],
                      "tokens": tokens}


class PadCollator:
    """Right-pads a batch: pad id for inputs, 0 for the attention mask, IGNORE_INDEX for labels."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict]):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        width = -(-width // self.multiple_of) * self.multiple_of
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- callbacks --------------------------------------------------------------------------------------------------------


def _callbacks():
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Per logging step: loss, learning rate, grad norm, tokens/s and samples/s (over the logging interval)."""

        def __init__(self, history: list[dict], tick=None, observe=None):
            self.history = history
            self.tick = tick
            self.observe = observe
            self._last = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            if self.tick and state.is_world_process_zero:
                self.tick(state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs or self._last is None:
                return
            now = time.perf_counter()
            t0, step0, tokens0 = self._last
            dt = max(now - t0, 1e-9)
            steps = state.global_step - step0
            samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            entry = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "learningRate": logs.get("learning_rate"),
                "gradNorm": logs.get("grad_norm"),
                "tokensPerSecond": round((state.num_input_tokens_seen - tokens0) / dt, 1),
                "samplesPerSecond": round(samples / dt, 3),
                "tokensSeen": state.num_input_tokens_seen,
                "time": time.time(),
            }
            self._last = (now, state.global_step, state.num_input_tokens_seen)
            if state.is_world_process_zero:
                self.history.append(entry)
                if self.observe:
                    self.observe(entry, state.max_steps)
                log.info("step %d/%d loss %.4f lr %.3g %.0f tok/s %.2f samples/s", state.global_step,
                         state.max_steps, entry["loss"], entry["learningRate"] or 0.0, entry["tokensPerSecond"],
                         entry["samplesPerSecond"])

    class StoreCheckpoints(TrainerCallback):
        """Uploads each saved checkpoint to the store (rank 0, after every rank has written its part), keeps the
        newest `keep` there, and skips the Trainer's own end-of-training checkpoint (the final model follows)."""

        def __init__(self, store: Store, run: str, iteration: int, role: str, keep: int, dist, on_upload=None):
            self.store, self.run, self.iteration, self.role = store, run, iteration, role
            self.keep, self.dist, self.on_upload = keep, dist, on_upload

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

        def on_save(self, args, state, control, **kwargs):
            self.dist.wait_for_everyone()  # every rank has written its files (RNG states, optimizer shards)
            if state.is_world_process_zero:
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                prefix = checkpoint_prefix(self.run, self.iteration, self.role, state.global_step)
                started = time.perf_counter()
                upload_tree(self.store, local, prefix, meta={"step": state.global_step})
                log.info("checkpoint %d uploaded to %s/%s in %.1fs", state.global_step, self.store.uri, prefix,
                         time.perf_counter() - started)
                steps = stored_checkpoints(self.store, self.run, self.iteration, self.role)
                for old in steps[: max(0, len(steps) - self.keep)]:
                    delete_tree(self.store, checkpoint_prefix(self.run, self.iteration, self.role, old))
                if self.on_upload:
                    self.on_upload()
            return control

    return StepLog, StoreCheckpoints


def _metrics_observer(ctx, role: str):
    """Feeds the training series of the Prometheus metrics from each logged step."""
    m = getattr(ctx, "metrics", None)
    if m is None:
        return None
    labels = {"run": ctx.config.name, "iteration": str(ctx.iteration), "role": role}

    def observe(entry: dict, max_steps: int) -> None:
        m.train_step.labels(**labels).set(entry["step"])
        m.train_steps.labels(**labels).set(max_steps)
        m.train_loss.labels(**labels).set(entry["loss"])
        m.train_lr.labels(**labels).set(entry["learningRate"] or 0.0)
        m.train_tokens_rate.labels(**labels).set(entry["tokensPerSecond"])
        m.train_samples_rate.labels(**labels).set(entry["samplesPerSecond"])
        m.train_epoch.labels(**labels).set(entry["epoch"])

    return observe


# -- the trainer ------------------------------------------------------------------------------------------------------


def _precision(config: RunConfig) -> tuple[bool, str]:
    import torch

    cuda = torch.cuda.is_available()
    precision = config.training.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision == "bf16" and not cuda and not _cpu_has_bf16():
        log.warning("training.precision bf16 on a CPU without bfloat16 instructions: training in float32")
        precision = "fp32"
    return cuda, precision


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 / AMX, through oneDNN): then an explicit
    training.precision bf16 is kept on the CPU too (auto stays float32 there)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _load_model(config: RunConfig, base: str, previous: Path | None, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    t = config.training
    # LoRA: frozen base weights in bf16, adapter weights in float32 (peft's default). Full: float32 master weights
    # with bf16 autocast (or whatever DeepSpeed makes of them).
    dtype = torch.bfloat16 if precision == "bf16" and t.mode == "lora" else torch.float32
    if t.mode == "full":
        model = AutoModelForCausalLM.from_pretrained(str(previous or base), dtype=dtype)
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
        if previous is not None:
            model = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
        else:
            lora = LoraConfig(
                r=t.lora.rank, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                target_modules=t.lora.target_modules, task_type="CAUSAL_LM", bias="none",
            )
            model = get_peft_model(model, lora)
    model.config.use_cache = False
    return model


def _checkpointing(t, model, examples: list[dict], precision: str, cuda: bool, world_size: int):
    """training.gradientCheckpointing decided for this model and data: under auto, on only when the longest batch
    (batchSize of the longest examples, padded to a multiple of 8 on CUDA) would not fit this device without it."""
    import torch

    from . import train_memory

    longest = max(len(e["input_ids"]) for e in examples)
    tokens = t.batch_size * (-(-longest // 8) * 8 if cuda else longest)
    device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if cuda else None
    return train_memory.decide(t.gradient_checkpointing, train_memory.ModelShape.of(model), tokens, t.mode,
                               precision, device_bytes, train_memory.zero_stage(t.deepspeed), world_size)


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Destroy the process group while the interpreter is still whole: left to interpreter finalization, gloo's
    worker threads can abort the process (SIGABRT, "terminate called without an active exception") after a
    successful training. Once a process, after its last collective."""
    import atexit

    def destroy() -> None:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            td.destroy_process_group()

    atexit.register(destroy)


def _lora_summary(model) -> dict | None:
    """The adapter's actual LoRA settings (in iteration k > 1 they are those of the adapter continued)."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None:
        return None
    targets = peft_config.target_modules
    return {"rank": peft_config.r, "alpha": peft_config.lora_alpha, "dropout": peft_config.lora_dropout,
            "targetModules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def epoch_losses(history: list[dict]) -> list[float]:
    """The mean logged loss of each epoch, in order (a logged step at epoch 1.0 ends the first one)."""
    by_epoch: dict[int, list[float]] = {}
    for entry in history:
        by_epoch.setdefault(max(1, math.ceil(entry["epoch"] - 1e-6)), []).append(entry["loss"])
    return [round(sum(v) / len(v), 4) for _, v in sorted(by_epoch.items())]


def train_stage(ctx, role: str) -> dict:
    """A training stage's run(): `train_role`, its failures raised as the StageError orchestrators catch."""
    from .stages import StageError

    try:
        return train_role(ctx, role)
    except TrainingError as err:
        raise StageError(str(err)) from err


def train_role(ctx, role: str, *, callbacks: list | tuple = (), workdir: Path | None = None) -> dict:
    """Train `role` for ctx.iteration on build-sft/<role>; returns the stage manifest (the same on every rank).

    Resumes from the newest complete checkpoint in the store; when the final model is already in the store
    (a crash after its upload) returns its recorded manifest without training again."""
    from accelerate import PartialState
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its loading bars would break the run's own progress lines

    config: RunConfig = ctx.config
    store: Store = ctx.store
    run, iteration, t = config.name, ctx.iteration, config.training
    stage = stage_name(role)
    final_prefix = model_prefix(run, iteration, role)
    if tree_complete(store, final_prefix):
        log.info("%s of iteration %d: final model already in the store", stage, iteration)
        return tree_manifest(store, final_prefix)["training"]

    prev_prefix = init_prefix(run, iteration, role)
    if prev_prefix is not None and not tree_complete(store, prev_prefix):
        source = (f"the generator of iteration {iteration}" if role == LENGTH_FOLLOWING
                  else f"the {role} of iteration {iteration - 1}")
        raise TrainingError(f"{stage} of iteration {iteration} continues from {source}, which is not in the store "
                            f"({store.uri}/{prev_prefix})")
    sources = data_sources(config, iteration, role)

    cuda, precision = _precision(config)
    here = local_dir(run, iteration, role, workdir)
    ckpt_dir, final_dir = here / "checkpoints", here / "model"
    resume_steps = stored_checkpoints(store, run, iteration, role)
    resume_step = resume_steps[-1] if resume_steps else None
    previous = here / "previous" if prev_prefix is not None else None
    # TrainingArguments joins the process group of a torchrun / accelerate launch (or makes a single process).
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.keep_checkpoints,
        bf16=precision == "bf16",
        gradient_checkpointing=False,  # decided below, once the model and the data are known
        gradient_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        seed=ctx.seed(stage) % 2**31,
        data_seed=ctx.seed(stage, "data") % 2**31,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_timeout=t.ddp_timeout_seconds,
        ddp_find_unused_parameters=False,
        deepspeed=t.deepspeed,
    )
    _ = args.device  # sets up the process group (torchrun / accelerate env) or a single process
    dist = PartialState()  # the state TrainingArguments set up
    if dist.num_processes > 1:
        _destroy_process_group_at_exit()

    # The local main process of each node prepares the node's files; the others wait at a collective.
    with args.main_process_first(local=True, desc="preparing local files"):
        if dist.is_local_main_process:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            shutil.rmtree(final_dir, ignore_errors=True)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                download_tree(store, checkpoint_prefix(run, iteration, role, resume_step),
                              ckpt_dir / f"checkpoint-{resume_step}")
            if previous is not None:
                download_tree(store, prev_prefix, previous)
        base = resolve_model(config.models.base)

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise TrainingError(f"the tokenizer of {config.models.base} has no chat template")
    examples, data_counts = [], {"rows": 0, "examples": 0, "skipped": 0, "promptCut": 0,
                                  "droppedOverLength": 0, "tokens": 0}
    by_source = {}
    for source, share in sources:
        keep = None if share >= 1 else (lambda row, s=source, f=share: ctx.seed(stage, s, row.get("id")) % 10**6
                                        < f * 10**6)  # a seeded share of the rows, the same on every rank
        found, counts = load_examples(store, source, tokenizer, t.cutoff_tokens, keep)
        examples += found
        data_counts = {k: data_counts[k] + counts[k] for k in data_counts}
        by_source[source] = counts["examples"]
    if not examples:
        raise TrainingError(f"{stage} of iteration {iteration}: no training examples under "
                            + " or ".join(f"{store.uri}/{s}" for s, _ in sources))

    from transformers import set_seed

    set_seed(args.seed)  # the LoRA initialisation is drawn from it: reruns start from the same adapter
    model = _load_model(config, base, previous, precision)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    checkpointing = _checkpointing(t, model, examples, precision, cuda, args.world_size)
    args.gradient_checkpointing = checkpointing.enabled

    history: list[dict] = []
    log_key = train_log_key(run, iteration, role)
    if resume_step is not None and store.exists(log_key):
        history = [e for e in read_jsonl(store, log_key) if e["step"] <= resume_step]

    def upload_log() -> None:
        store.write(log_key, dumps_jsonl(history))

    StepLog, StoreCheckpoints = _callbacks()
    tick = lambda done, total: ctx.tick(stage, done, total)  # noqa: E731
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=PadCollator(tokenizer.pad_token_id, 8 if cuda else 1),
        processing_class=tokenizer,
        callbacks=[StepLog(history, tick, _metrics_observer(ctx, role)),
                   StoreCheckpoints(store, run, iteration, role, t.keep_checkpoints, dist, upload_log),
                   *callbacks],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # StepLog logs each step (print() would bypass logging)
    resume_from = str(ckpt_dir / f"checkpoint-{resume_step}") if resume_step is not None else None
    log.info("%s of iteration %d: %d examples (%d tokens), mode %s, %s, %d trainable of %d parameters, gradient "
             "checkpointing %s (%s)%s", stage, iteration, len(examples), data_counts["tokens"], t.mode, precision,
             trainable, total_params, "on" if checkpointing.enabled else "off", checkpointing.reason,
             f", resuming at step {resume_step}" if resume_step is not None else "")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    trainer.save_model(str(final_dir))  # every rank: DeepSpeed ZeRO-3 gathers the weights here

    state = trainer.state
    losses = [e["loss"] for e in history]
    manifest = {
        "role": role,
        "mode": t.mode,
        "precision": precision,
        "baseModel": config.models.base,
        "initFrom": f"{store.uri}/{prev_prefix}" if prev_prefix is not None else config.models.base,
        "modelUri": f"{store.uri}/{final_prefix}",
        "modelKey": final_prefix,
        "counts": {"requested": data_counts["rows"], "accepted": data_counts["examples"], **data_counts},
        **({"examplesBySource": by_source} if len(sources) > 1 else {}),
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "resumedFromStep": resume_step,
        "finalLoss": losses[-1] if losses else None,
        "firstLoss": losses[0] if losses else None,
        # One logged step is one batch (noisy at batch 1); the mean per epoch is what says whether it learns.
        "epochLosses": epoch_losses(history),
        "trainLoss": result.training_loss,
        "trainableParams": trainable,
        "totalParams": total_params,
        "tokensSeen": state.num_input_tokens_seen,
        "trainSeconds": round(seconds, 3),
        "worldSize": args.world_size,
        "device": "cuda" if cuda else "cpu",
        "gradientCheckpointing": checkpointing.summary(),
        "lora": _lora_summary(model),
    }
    dist.wait_for_everyone()
    if dist.is_main_process:
        upload_log()
        upload_tree(store, final_dir, final_prefix, meta={"mode": t.mode, "role": role, "iteration": iteration,
                                                          "training": manifest})
        for step in stored_checkpoints(store, run, iteration, role):  # the final model supersedes them
            delete_tree(store, checkpoint_prefix(run, iteration, role, step))
        log.info("%s of iteration %d: %d steps in %.1fs, final loss %s, model at %s", stage, iteration,
                 state.global_step, seconds, manifest["finalLoss"], manifest["modelUri"])
    dist.wait_for_everyone()
    if dist.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        manifest = broadcast_object_list([manifest], from_process=0)[0]
    return manifest
