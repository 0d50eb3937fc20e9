"""Training at the paper's batch size: SFT tokens/s of our train stage vs TRL's SFTTrainer, the stock trainer users
pick, padding-free and packed, on the same tokens.

The data: `examples` single-turn conversations, built deterministically (seeded): instructions from the packaged
seed set, answers of prose whose length in words is drawn from a log-normal (median `median_words`, sigma
`sigma`: long-tailed, like real SFT sets, where a few long answers dominate the tokens); those over `cutoff`
tokens are left out, as the train stage does (it never cuts an answer). The model: a small Qwen2 built from a
config (random init, seeded; the tiny local model's tokenizer and chat template; nothing downloaded), CPU,
float32, LoRA r8 on all linear layers. Batch 1, as the paper and training.batchSize's default.

  * ours: the train stage's training, train_role() (what the train-generator stage runs) on a local store holding
    the set as build-sft output: its tokenization (loss on the answer only), LoRA setup, collator, length-grouped
    batches (training.groupByLength), gradient checkpointing as `auto` decides and per-step logging, checkpoint
    callbacks included.
  * paddingFree: TRL's SFTTrainer (trl, pinned in the dev extra) with padding_free=True on the same tokenized
    examples (input_ids and our labels: TRL uses a dataset's labels as they are), the same LoRA adapter (same seed
    and config), learning rate, schedule and epochs: the same optimizer steps on the same tokens. Gradient
    checkpointing as ours decided (TRL's default is on: the comparison is of the trainers, not of that setting).
  * packing: the same SFTTrainer with packing=True (best-fit decreasing into max_length = cutoff tokens, which TRL
    runs padding-free): the same tokens in fewer, longer rows, so fewer optimizer steps; its loss is reported, not
    expected equal.

One callback times every trainer.train() loop (on_train_begin to on_train_end). tokens/s counts real tokens: tokens
in the set x epochs, the same numerator for all (the Trainer's non-padding counter checks it). On the CPU the clock
is this process's CPU time with one torch thread: these machines are shared, and wall time swung by 3x between
neighbouring runs (the wall-time ratios are kept too). The runs go in `repeats` rounds with different seeds, the
order rotated per round; each ratio is the median of the rounds' ratios.

Loss, "the same curve within noise": what training achieved, the drop of the held-out loss (token-weighted mean
cross-entropy on the answer tokens of `heldout` unseen conversations from the same distribution) from the
untrained model's, ours / padding-free TRL: within 1 +/- max(2 x noise, 5%), noise being the relative seed-to-seed
spread (max - min over the seeds / mean) of either method's drop. The training-loss curves (token-weighted loss per
quarter of the tokens seen) are kept in the details and the note.

On a CUDA GPU (`cuda_row`, and bench/gpu.py): a 0.5B-class Qwen2 config (Qwen2.5-0.5B's shape: 24 layers, hidden
896, 14 heads, 2 KV heads, vocab 151,936; random init), bf16, the same three: wall tokens/s and
torch.cuda.max_memory_allocated of each. Skipped, with a note, without CUDA.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .common import Row
from .sim_text import prose

FULL = {"examples": 160, "epochs": 1, "batch_size": 1, "median_words": 90, "sigma": 0.9, "cutoff": 768,
        "heldout": 24, "repeats": 3, "lr": 3e-3, "threads": 1,
        "model": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 768}}
QUICK = {"examples": 12, "epochs": 1, "batch_size": 1, "median_words": 10, "sigma": 0.8, "cutoff": 160,
         "heldout": 4, "repeats": 1, "lr": 3e-3, "threads": 1,
         "model": {"hidden": 64, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 128}}
CUDA = {"examples": 512, "epochs": 1, "batch_size": 1, "median_words": 400, "sigma": 0.9, "cutoff": 4096,
        "heldout": 32, "repeats": 2, "lr": 2e-4,
        "model": {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151_936,
                  "rope_theta": 1_000_000.0, "max_positions": 32_768}}
GOAL = 0.95  # at batch 1 there is no padding to save: ours must cost no more than the stock trainer
BASELINES = ("paddingFree", "packing")
ROLE = "generator"
STAGE = "train-generator"


# -- data and model ---------------------------------------------------------------------------------------------------


def sft_rows(n: int, median_words: int, sigma: float, seed: int) -> list[dict]:
    """n conversations (seeded): a seed instruction, then an answer of log-normal length in words."""
    from selflengthen.pipeline.data import load_seed_instructions

    rng = random.Random(seed)
    instructions = [" ".join(row["prompt"].split()[:30]) for row in load_seed_instructions("en")]
    rows = []
    for i in range(n):
        words = max(4, round(rng.lognormvariate(math.log(median_words), sigma)))
        rows.append({"id": f"b{seed}-{i}", "language": "en", "messages": [
            {"role": "user", "content": rng.choice(instructions)},
            {"role": "assistant", "content": prose(rng, words)},
        ]})
    return rows


def build_model(out: Path, shape: dict, dtype: str = "float32", seed: int = 0) -> Path:
    """A Qwen2ForCausalLM of the given shape, random init (seeded), saved with the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from selflengthen.pipeline.tinymodel import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    config = Qwen2Config(
        vocab_size=shape.get("vocab", len(tokenizer)), hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
        max_position_embeddings=shape.get("max_positions", 4096), rope_theta=shape.get("rope_theta", 10_000.0),
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_ctx(root: Path, base: Path, size: dict, seed: int):
    from selflengthen.pipeline.config import RunConfig
    from selflengthen.pipeline.stages import StageContext
    from selflengthen.pipeline.store import LocalStore

    config = RunConfig.model_validate({
        "name": f"bench-{seed}", "seed": seed, "storage": {"uri": f"file://{root}/store"},
        "models": {"base": str(base)},
        "training": {"mode": "lora", "learningRate": size["lr"], "epochs": size["epochs"],
                     "batchSize": size["batch_size"], "cutoffTokens": size["cutoff"], "saveSteps": 10**6,
                     "keepCheckpoints": 1, "loggingSteps": 1, "groupByLength": True,
                     "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
    })
    return StageContext(config=config, iteration=1, store=LocalStore(root / "store"))


def write_sft(ctx, rows: list[dict]) -> None:
    from selflengthen.pipeline.stages.build_sft import sft_artifacts

    sft_artifacts(ctx, ROLE).write_outputs(rows, 64)
    ctx.artifacts("build-sft").finish({"counts": {}})


def encoded(ctx, tokenizer) -> tuple[list[dict], dict]:
    """The examples exactly as our stage reads them (same tokenization, mask and truncation)."""
    from selflengthen.pipeline.layout import sft_set_prefix
    from selflengthen.pipeline.training import load_examples

    prefix = sft_set_prefix(ctx.config.name, ctx.iteration, ROLE)
    return load_examples(ctx.store, prefix, tokenizer, ctx.config.training.cutoff_tokens)


# -- the two training paths -------------------------------------------------------------------------------------------


def _peak_memory_reset() -> None:
    import torch

    if torch.cuda.is_available():
        gc.collect()  # the other path's trainer (optimizer states, reference cycles) must not count here
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def clock():
    """A TrainerCallback timing trainer.train()'s loop, from on_train_begin to on_train_end: wall seconds and
    this process's CPU seconds (the figure that holds on a shared machine: run with one torch thread, it counts
    the work, not the waits for a core). The same callback times both paths."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self._start = (time.perf_counter(), time.process_time())

        def on_train_end(self, args, state, control, **kwargs):
            self.wall = time.perf_counter() - self._start[0]
            self.cpu = time.process_time() - self._start[1]

    return Clock()


def run_ours(ctx, workdir: Path) -> dict:
    """Our train stage's training (train_role, what the train-generator stage runs); its timing, tokens, losses."""
    from selflengthen.pipeline.layout import train_log_key
    from selflengthen.pipeline.store import read_jsonl
    from selflengthen.pipeline.training import local_dir, train_role

    _peak_memory_reset()
    timer = clock()
    manifest = train_role(ctx, ROLE, callbacks=[timer], workdir=workdir)
    peak = _peak_memory()
    history = list(read_jsonl(ctx.store, train_log_key(ctx.config.name, 1, ROLE)))
    return {"seconds": timer.wall, "cpuSeconds": timer.cpu, "stageTrainSeconds": manifest["trainSeconds"],
            "tokensSeen": manifest["tokensSeen"], "steps": manifest["steps"],
            "curve": [(e["tokensSeen"], e["loss"]) for e in history], "peakMemory": peak,
            "adapter": local_dir(ctx.config.name, 1, ROLE, workdir) / "model", "precision": manifest["precision"],
            "gradientCheckpointing": manifest["gradientCheckpointing"]["enabled"],
            "checkpointingDecision": manifest["gradientCheckpointing"]}


def run_trl(ctx, examples: list[dict], base: Path, out: Path, packing: bool, checkpointing: bool) -> dict:
    """TRL's SFTTrainer on our tokenized examples (input_ids and labels), padding-free or packed (BFD)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    t = ctx.config.training
    cuda = torch.cuda.is_available()
    seed = ctx.seed(STAGE) % 2**31  # the seed our stage trains with: the same initial adapter
    tokenizer = AutoTokenizer.from_pretrained(base)
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=t.batch_size, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, logging_strategy="steps",
        logging_steps=1, save_strategy="no", bf16=cuda, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding", seed=seed, data_seed=ctx.seed(STAGE, "data") % 2**31,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not cuda,
        # the examples are within the cutoff already (as our stage reads them); packing fills rows up to it
        max_length=t.cutoff_tokens if packing else None, padding_free=not packing, packing=packing,
        packing_strategy="bfd",
    )
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=t.lora.rank, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                             target_modules=t.lora.target_modules, task_type="CAUSAL_LM",
                                             bias="none"))
    data = Dataset.from_list([{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist()}
                              for e in examples])
    timer = clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    _peak_memory_reset()
    trainer.train()
    peak = _peak_memory()
    curve = [(e["num_input_tokens_seen"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {"seconds": timer.wall, "cpuSeconds": timer.cpu, "tokensSeen": trainer.state.num_input_tokens_seen,
            "steps": trainer.state.global_step, "curve": curve, "peakMemory": peak, "model": model,
            "gradientCheckpointing": checkpointing}


def heldout_loss(model, examples: list[dict]) -> float:
    """Token-weighted mean cross-entropy on the answer tokens, one example per forward pass (no padding)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.as_tensor(e["input_ids"], dtype=torch.long, device=device)[None]
            labels = torch.as_tensor(e["labels"], dtype=torch.long, device=device)[None]
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def load_ours(base: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.cuda()
    return PeftModel.from_pretrained(model, str(adapter))


def quarters(curve: list[tuple[int, float]]) -> list[float | None]:
    """Mean training loss in each quarter of the tokens seen, each step weighted by the tokens it took."""
    if not curve:
        return []
    total = curve[-1][0]
    sums, weights, prev = [0.0] * 4, [0] * 4, 0
    for seen, loss in curve:
        q = min(3, int(4 * (seen - 1) / max(total, 1)))
        sums[q] += loss * (seen - prev)
        weights[q] += seen - prev
        prev = seen
    return [round(s / w, 4) if w else None for s, w in zip(sums, weights)]


# -- the benchmark ----------------------------------------------------------------------------------------------------


def compare(size: dict, root: Path) -> dict:
    """`repeats` rounds of ours and each baseline on the same data and model, the order rotated."""
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    cpu_clock = bool(size.get("threads")) and not cuda  # the caller set the torch threads
    base = build_model(root / "model", size["model"], "bfloat16" if cuda else "float32")
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = sft_rows(size["examples"], size["median_words"], size["sigma"], seed=11)
    probe = make_ctx(root / "heldout", base, size, 0)
    write_sft(probe, sft_rows(size["heldout"], size["median_words"], size["sigma"], seed=12))
    held, _ = encoded(probe, tokenizer)
    pairs = []
    methods = ("ours", *BASELINES)
    for r in range(size["repeats"]):
        seed = 100 + r
        ctx = make_ctx(root / f"r{r}", base, size, seed)
        write_sft(ctx, rows)
        examples, counts = encoded(ctx, tokenizer)
        pair = {"seed": seed}
        # Rotated per round; round 0 starts with ours, whose gradient checkpointing decision (a function of the
        # model, the data and the device: the same every round) the baselines then use.
        order = methods[r % 3:] + methods[:r % 3]
        for which in order:
            if which == "ours":
                res = run_ours(ctx, root / f"r{r}" / "work")
                model = load_ours(base, res.pop("adapter"))
                checkpointing = res["gradientCheckpointing"]
            else:
                res = run_trl(ctx, examples, base, root / f"r{r}" / which, which == "packing", checkpointing)
                model = res.pop("model")
            res["heldoutLoss"] = round(heldout_loss(model, held), 5)
            res["tokens"] = counts["tokens"] * size["epochs"]
            res["wallTokensPerSecond"] = res["tokens"] / res["seconds"]
            res["cpuTokensPerSecond"] = res["tokens"] / res["cpuSeconds"]
            res["tokensPerSecond"] = res["cpuTokensPerSecond" if cpu_clock else "wallTokensPerSecond"]
            res["lossQuarters"] = quarters(res.pop("curve"))
            pair[which] = res
            del model
        pair["ratio"] = {b: pair["ours"]["tokensPerSecond"] / pair[b]["tokensPerSecond"] for b in BASELINES}
        pairs.append(pair)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    data = {"examples": len(examples), "tokens": counts["tokens"], "promptCut": counts["promptCut"],
            "droppedOverLength": counts["droppedOverLength"],
            "lengthP50": lengths[len(lengths) // 2], "lengthP90": lengths[int(len(lengths) * 0.9)],
            "lengthMax": lengths[-1], "lengthMean": round(sum(lengths) / len(lengths), 1)}
    return {"pairs": pairs, "data": data, "size": dict(size), "clock": "cpu" if cpu_clock else "wall",
            "untrainedHeldoutLoss":
            round(heldout_loss(load_plain(base), held), 5)}


def load_plain(base: Path):
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16 if cuda else torch.float32)
    return model.cuda() if cuda else model


def loss_verdict(pairs: list[dict], untrained: float, baseline: str = "paddingFree") -> dict:
    """What training achieved, per method: the drop of the held-out loss from the untrained model's. Same within
    noise: |drop ours / drop baseline - 1| <= max(2 x noise, 5%), noise being the larger relative seed-to-seed
    spread (max - min over the seeds, / mean) of the drop for either method."""
    ours = [untrained - p["ours"]["heldoutLoss"] for p in pairs]
    theirs = [untrained - p[baseline]["heldoutLoss"] for p in pairs]
    mean_ours, mean_theirs = statistics.mean(ours), statistics.mean(theirs)
    noise = 0.0
    if len(pairs) > 1:
        noise = max((max(ours) - min(ours)) / abs(mean_ours), (max(theirs) - min(theirs)) / abs(mean_theirs))
    ratio = mean_ours / mean_theirs
    tolerance = max(2 * noise, 0.05)
    return {"untrained": untrained, "dropOurs": mean_ours, "dropBaseline": mean_theirs, "ratio": ratio,
            "noise": noise, "tolerance": tolerance, "met": mean_theirs > 0 and abs(ratio - 1) <= tolerance,
            "heldoutOurs": [p["ours"]["heldoutLoss"] for p in pairs],
            "heldoutBaseline": [p[baseline]["heldoutLoss"] for p in pairs]}


@contextlib.contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _quiet():
    """The Trainer and our stage log every step at INFO: keep the benchmark's output to its table."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("selflengthen", "transformers", "peft", "accelerate")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _compare_in_tempdir(size: dict, prefix: str, threads: int | None = None) -> dict:
    """`compare` in a temporary directory removed afterwards, quietly, with `threads` torch threads if given."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with _quiet(), (_threads(threads) if threads else contextlib.nullcontext()):
            return compare(size, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _medians(pairs: list[dict], baseline: str) -> tuple[float, float, float]:
    """Median ratio, our median tokens/s and the baseline's, over the rounds."""
    return (statistics.median(p["ratio"][baseline] for p in pairs),
            statistics.median(p["ours"]["tokensPerSecond"] for p in pairs),
            statistics.median(p[baseline]["tokensPerSecond"] for p in pairs))


LABELS = {"paddingFree": "TRL SFTTrainer padding-free", "packing": "TRL SFTTrainer packing (BFD)"}


def cpu_rows(quick: bool) -> list[Row]:
    size = QUICK if quick else FULL
    result = _compare_in_tempdir(size, "bench-train-", threads=size["threads"])
    pairs = result["pairs"]
    d, s = result["data"], size["model"]
    shape = f"Qwen2 {s['layers']}x{s['hidden']} (random init, LoRA r8)"
    data = (f"{d['examples']} examples, {d['tokens']:,} tokens, lengths p50 {d['lengthP50']} / p90 "
            f"{d['lengthP90']} / max {d['lengthMax']} (log-normal words, cutoff {size['cutoff']})")
    threads = size["threads"] if result["clock"] == "cpu" else None
    steps = ", ".join(f"{m} {pairs[0][m]['steps']}" for m in ("ours", *BASELINES))
    out = []
    for baseline in BASELINES:
        ratio, ours_tps, base_tps = _medians(pairs, baseline)
        ratios = ", ".join(format(p["ratio"][baseline], ".2f") for p in pairs)
        wall = ", ".join(format(p["ours"]["wallTokensPerSecond"] / p[baseline]["wallTokensPerSecond"], ".2f")
                         for p in pairs)
        clock_note = (f"tok/s = real tokens per CPU-second of trainer.train(), {threads} torch thread (shared "
                      f"machine: CPU time counts the work, wall time the neighbours too; wall-time ratios {wall})"
                      if threads else "tok/s = real tokens per wall second of trainer.train()")
        note = (f"{shape}, CPU fp32, batch {size['batch_size']} (the paper's), {size['epochs']} epoch, optimizer "
                f"steps {steps}; {data}; {clock_note}; median of {len(pairs)} rounds, order rotated (ratios "
                f"{ratios}); gradient checkpointing {'on' if pairs[0]['ours']['gradientCheckpointing'] else 'off'} "
                "for all (ours decides, auto)")
        out.append(Row(f"training (batch 1): SFT tokens/s, our train stage / {LABELS[baseline]}", ours_tps,
                       base_tps, ratio, f">= {GOAL}", ratio >= GOAL, unit="tok/CPU-s" if threads else "tok/s",
                       note=note, details={"pairs": pairs, "data": d, "size": result["size"]}
                       if baseline == "paddingFree" else {"baseline": baseline}))
    verdict = loss_verdict(pairs, result["untrainedHeldoutLoss"])
    packed = loss_verdict(pairs, result["untrainedHeldoutLoss"], "packing")
    trained_ours, trained_base = statistics.mean(verdict["heldoutOurs"]), statistics.mean(verdict["heldoutBaseline"])
    curve = (f"held-out answer loss {verdict['untrained']:.4f} untrained -> ours {trained_ours:.4f}, TRL "
             f"padding-free {trained_base:.4f} (means over {len(pairs)} seeds); criterion |drop ours / drop "
             f"baseline - 1| <= max(2 x seed-to-seed spread {verdict['noise']:.3f}, 0.05) = "
             f"{verdict['tolerance']:.3f}; TRL packing (fewer, longer steps) drops {packed['dropBaseline']:.4f} "
             f"nats (ours / packing {packed['ratio']:.3f}); training loss per quarter of tokens seen, first seed: "
             + "; ".join(f"{m} {pairs[0][m]['lossQuarters']}" for m in ("ours", *BASELINES)))
    out.insert(1, Row("training (batch 1): held-out loss drop (untrained - trained), ours / TRL padding-free",
                      verdict["dropOurs"], verdict["dropBaseline"], verdict["ratio"],
                      f"1 +/- {verdict['tolerance']:.2f} (noise)", verdict["met"], unit="nats", note=curve,
                      details={"loss": verdict, "packing": packed,
                               "untrainedHeldoutLoss": result["untrainedHeldoutLoss"]}))
    return out


CUDA_NAME = "training (CUDA): bf16 tokens/s, 0.5B-class Qwen2, ours / TRL SFTTrainer padding-free"


def cuda_row(quick: bool) -> Row:
    import torch

    if not torch.cuda.is_available():
        return Row(CUDA_NAME, None, None, None, "-", None, status="skipped",
                   note="skipped: torch.cuda.is_available() is false on this machine (CPU only); on a CUDA GPU this "
                        "row trains a 0.5B-class Qwen2 (Qwen2.5-0.5B's shape, random init) in bf16 with our stage "
                        "and with TRL's SFTTrainer, and records tokens/s and torch.cuda.max_memory_allocated "
                        "(bench/gpu.py adds MFU)")
    size = dict(CUDA, repeats=1) if quick else CUDA
    if quick:
        size = {**size, "examples": 32, "median_words": 60, "cutoff": 512, "heldout": 4}
    result = _compare_in_tempdir(size, "bench-train-cuda-")
    pairs = result["pairs"]
    ratio, ours, base = _medians(pairs, "paddingFree")
    peak = {m: max(p[m]["peakMemory"] for p in pairs) / 2**30 for m in ("ours", *BASELINES)}
    d = result["data"]
    note = (f"{torch.cuda.get_device_name(0)}, bf16, LoRA r8, batch {size['batch_size']}, gradient checkpointing "
            f"{'on' if pairs[0]['ours']['gradientCheckpointing'] else 'off'} (auto); {d['examples']} examples, "
            f"{d['tokens']:,} tokens (p50 {d['lengthP50']}, max {d['lengthMax']}); peak memory "
            f"(torch.cuda.max_memory_allocated) " + ", ".join(f"{m} {v:.2f} GiB" for m, v in peak.items())
            + f"; ours / packing {_medians(pairs, 'packing')[0]:.3f}; held-out loss "
            f"{result['untrainedHeldoutLoss']:.4f} untrained -> "
            + ", ".join(f"{m} {pairs[0][m]['heldoutLoss']:.4f}" for m in ("ours", *BASELINES)))
    return Row(CUDA_NAME, ours, base, ratio, f">= {GOAL}", ratio >= GOAL, unit="tok/s", note=note,
               details={"pairs": pairs, "data": d, "peakMemoryGiB": peak})


def run(quick: bool = False) -> list[Row]:
    return [*cpu_rows(quick), cuda_row(quick)]
