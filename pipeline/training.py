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

Its store keys (the checkpoints, the model, train-log.jsonl) are pipeline/layout.py's; the data encoding is
training_data.py, the collator training_collator.py, the callbacks training_callbacks.py, the TrainingArguments
training_args.py (TrainerSettings), the stored checkpoints and models trained_models.py.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from pathlib import Path

from .config import RunConfig
from .layout import (
    LENGTH_FOLLOWING,
    ROLES,
    checkpoint_prefix,
    collect_prefix,
    model_prefix,
    sft_set_prefix,
    train_log_key,
)
from .layout import training_stage as stage_name
from .models import resolve_model
from .store import Store, dumps_jsonl, read_jsonl
from .trained_models import TrainedModel, fetch_trained_model, stored_checkpoints, workdir_root
from .training_args import TrainerSettings
from .training_args import precision as resolve_precision
from .training_callbacks import callback_classes, metrics_observer
from .training_collator import PadCollator
from .training_data import IGNORE_INDEX, TrainingError, encode_conversation, fit_cutoff, load_examples
from .training_recompute import Recompute
from .treestore import delete_tree, download_tree, tree_complete, tree_manifest, upload_tree

log = logging.getLogger("selflengthen.train")
# The training stages' names in one place for those who call them (the runner, bench, the tests); each concern has
# its module: training_data (encoding), training_collator, training_callbacks, training_args (TrainingArguments),
# trained_models (the store's checkpoints and models), layout (the keys).
__all__ = ["IGNORE_INDEX", "LENGTH_FOLLOWING", "ROLES", "PadCollator", "TrainedModel", "TrainingError",
           "encode_conversation", "fetch_trained_model", "fit_cutoff", "load_examples", "model_prefix",
           "stored_checkpoints", "train_role", "train_stage"]


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


def local_dir(run: str, iteration: int, role: str, workdir: Path | None = None) -> Path:
    if role == LENGTH_FOLLOWING:
        return (workdir or workdir_root()) / "train" / run / role
    return (workdir or workdir_root()) / "train" / run / f"iter-{iteration:02d}" / role


# -- the trainer ------------------------------------------------------------------------------------------------------


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
    """training.gradientCheckpointing decided for this model and data: under auto, what each batch recomputes
    (training_recompute.Recompute), the longest batch (batchSize of the longest examples, padded to a multiple of
    8 on CUDA) the most."""
    import torch

    from . import train_memory

    longest = max(len(e["input_ids"]) for e in examples)
    tokens = t.batch_size * (-(-longest // 8) * 8 if cuda else longest)
    device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if cuda else None
    return train_memory.decide(t.gradient_checkpointing, train_memory.ModelShape.of(model), tokens, t.mode,
                               precision, device_bytes, train_memory.zero_stage(t.deepspeed), world_size,
                               t.loss_chunk_tokens)


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


def _training_examples(ctx, stage: str, tokenizer, sources: list[tuple[str, float]]) -> tuple[list, dict, dict]:
    """The examples of every source (a seeded share of each, the same on every rank), their summed counts, and the
    examples by source."""
    store, iteration, cutoff = ctx.store, ctx.iteration, ctx.config.training.cutoff_tokens
    examples, data_counts = [], {"rows": 0, "examples": 0, "skipped": 0, "promptCut": 0,
                                  "droppedOverLength": 0, "tokens": 0}
    by_source = {}
    for source, share in sources:
        keep = None if share >= 1 else (lambda row, s=source, f=share: ctx.seed(stage, s, row.get("id")) % 10**6
                                        < f * 10**6)  # a seeded share of the rows, the same on every rank
        found, counts = load_examples(store, source, tokenizer, cutoff, keep)
        examples += found
        data_counts = {k: data_counts[k] + counts[k] for k in data_counts}
        by_source[source] = counts["examples"]
    if not examples:
        raise TrainingError(f"{stage} of iteration {iteration}: no training examples under "
                            + " or ".join(f"{store.uri}/{s}" for s, _ in sources))
    return examples, data_counts, by_source


def train_role(ctx, role: str, *, callbacks: list | tuple = (), workdir: Path | None = None) -> dict:
    """Train `role` for ctx.iteration on build-sft/<role>; returns the stage manifest (the same on every rank).

    Resumes from the newest complete checkpoint in the store; when the final model is already in the store
    (a crash after its upload) returns its recorded manifest without training again."""
    from accelerate import PartialState
    from transformers import AutoTokenizer, Trainer
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

    cuda, precision = resolve_precision(config)
    here = local_dir(run, iteration, role, workdir)
    ckpt_dir, final_dir = here / "checkpoints", here / "model"
    resume_steps = stored_checkpoints(store, run, iteration, role)
    resume_step = resume_steps[-1] if resume_steps else None
    previous = here / "previous" if prev_prefix is not None else None
    args = TrainerSettings.of(t, output_dir=str(ckpt_dir), precision=precision, cuda=cuda, seed=ctx.seed(stage),
                              data_seed=ctx.seed(stage, "data")).arguments()
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
    examples, data_counts, by_source = _training_examples(ctx, stage, tokenizer, sources)
    from transformers import set_seed

    set_seed(args.seed)  # the LoRA initialisation is drawn from it: reruns start from the same adapter
    model = _load_model(config, base, previous, precision)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    checkpointing = _checkpointing(t, model, examples, precision, cuda, args.world_size)
    recompute = Recompute(model, checkpointing)
    # per layer and per batch where the model has the switch (transformers' decoder layers), else all or nothing
    args.gradient_checkpointing = checkpointing.enabled and not recompute.per_layer

    history: list[dict] = []
    log_key = train_log_key(run, iteration, role)
    if resume_step is not None and store.exists(log_key):
        history = [e for e in read_jsonl(store, log_key) if e["step"] <= resume_step]

    def upload_log() -> None:
        store.write(log_key, dumps_jsonl(history))

    StepLog, StoreCheckpoints = callback_classes()
    tick = lambda done, total: ctx.tick(stage, done, total)  # noqa: E731
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=PadCollator(tokenizer.pad_token_id, 8 if cuda else 1),
        processing_class=tokenizer,
        callbacks=[StepLog(history, tick, metrics_observer(ctx, role)),
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
        "gradientCheckpointing": {**checkpointing.summary(), "forwards": recompute.summary()},
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
