"""GPU rows (issue 20), for a machine with a CUDA GPU; never run by `make bench` or CI.

    python bench/gpu.py [--dry-run] [--only vllm training] [--out bench/results] [--concurrencies 32 64 128 256]

Needs the `gpu` extra (CUDA vLLM), `train` and `dev` (TRL) installed, and one GPU (the first). Nothing is
downloaded: both models are 0.5B-class Qwen2 configs (Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 heads, 2
KV heads, vocab 151,936) built here with random weights and the tiny local model's tokenizer and chat template.
Random weights write nonsense, but every request asks for a fixed number of tokens (`ignore_eos`), so the work,
and the throughput, is that of a real model of that shape.

  * vllm: one vLLM server on the GPU (bf16). The extend workload: the pipeline's extend prompt over an answer of
    log-normal length (median `answer_words` words, as an extend stage's inputs), `output_len` tokens out, the
    pipeline's sampling parameters and a seed per request. vLLM's own benchmark client (`vllm bench serve`'s
    benchmark(), max_concurrency C) at each of `--concurrencies`: its best is the baseline. Ours
    (InferenceClient, the path the stages take) at that best concurrency and at the shipped client.concurrency
    (32). Rows: generated tokens/s per GPU, ours / vllm bench serve at its best (goal >= 0.95).
  * training: bench/training.py's comparison at the CUDA size (ours = the train stage with
    gradientCheckpointing auto, TRL's SFTTrainer padding-free and packed; same tokens, batch 1, LoRA r8, bf16):
    tokens/s, peak memory (torch.cuda.max_memory_allocated, beside pipeline/train_memory.py's estimate), and MFU
    = tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s. FLOPs per token: 2N forward and 2N backward
    through the activations (LoRA's weight gradients are negligible; 2N more for full fine-tuning's), plus the
    causal attention's 2 L h s forward, x3 with its backward, s the mean example length; a recomputed
    (checkpointed) forward is not counted (MFU, not hardware FLOPs utilisation).

Writes <out>/gpu-<date>-<host>.json (rows, details, the machine and the GPU). `--dry-run` prints the plan (what
would run, with which sizes and where the results would go) and touches neither CUDA nor vLLM: the test suite
runs only that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench.common import Row, machine, table  # noqa: E402

PARTS = ("vllm", "training")
SHIPPED_CONCURRENCY = 32  # client.concurrency's default
QWEN2_05B = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151_936,
             "rope_theta": 1_000_000.0, "max_positions": 32_768}
VLLM = {"requests": 512, "answer_words": 900, "sigma": 0.5, "output_len": 1024, "max_model_len": 8192}
# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets, SXM parts); others need --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
GOAL = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU rows of issue 20: vLLM tokens/s per GPU on the extend "
                                                 "workload, training tokens/s and MFU")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only (no CUDA, no vLLM)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="vllm bench serve's max_concurrency values; its best is the baseline")
    parser.add_argument("--requests", type=int, default=VLLM["requests"])
    parser.add_argument("--output-len", type=int, default=VLLM["output_len"])
    parser.add_argument("--answer-words", type=int, default=VLLM["answer_words"])
    parser.add_argument("--max-model-len", type=int, default=VLLM["max_model_len"])
    parser.add_argument("--train-examples", type=int, default=None, help="default: bench/training.py's CUDA size")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's peak dense bf16 TFLOP/s (default: from its name, for " +
                             ", ".join(PEAK_TFLOPS) + ")")
    args = parser.parse_args(argv)
    for name in ("requests", "output_len", "answer_words", "max_model_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: a positive number wanted")
    if any(c < 1 for c in args.concurrencies):
        parser.error("--concurrencies: positive numbers wanted")
    if args.train_examples is not None and args.train_examples < 1:
        parser.error("--train-examples: a positive number wanted")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error("--peak-tflops: a positive number wanted")
    return args


def plan(args: argparse.Namespace) -> dict:
    """What a run does, from the arguments alone."""
    from bench import training

    steps = []
    if "vllm" in args.only:
        steps.append({"part": "vllm", "model": "Qwen2 0.5B-class config, random init, bf16", "serve":
                      {"maxModelLen": args.max_model_len},
                      "workload": {"requests": args.requests, "answerWords": args.answer_words,
                                   "outputLen": args.output_len, "prompt": "pipeline/prompts/en/extend.txt"},
                      "baseline": {"client": "vllm bench serve (vllm.benchmarks.serve.benchmark)",
                                   "concurrencies": sorted(set(args.concurrencies))},
                      "ours": {"client": "InferenceClient", "concurrencies": ["best of the baseline's",
                                                                               SHIPPED_CONCURRENCY]}})
    if "training" in args.only:
        size = _training_size(args)
        steps.append({"part": "training", "model": "Qwen2 0.5B-class config, random init, bf16, LoRA r8",
                      "size": {k: size[k] for k in ("examples", "batch_size", "median_words", "cutoff", "repeats")},
                      "methods": ["ours (train stage, gradientCheckpointing auto)", *training.BASELINES],
                      "mfu": "tokens/s x FLOPs per token / peak bf16 FLOP/s"})
    date = dt.date.today().isoformat()
    return {"steps": steps, "out": str(args.out / f"gpu-{date}-<host>.json"), "needs": "one CUDA GPU; the gpu, "
            "train and dev extras"}


def _training_size(args: argparse.Namespace) -> dict:
    from bench import training

    size = dict(training.CUDA)
    if args.train_examples is not None:
        size["examples"] = args.train_examples
    return size


# -- vLLM ------------------------------------------------------------------------------------------------------------


def extend_requests(n: int, answer_words: int, sigma: float, output_len: int, seed: int = 7) -> list[dict]:
    """The extend stage's requests: its prompt over a seed instruction and an answer of log-normal length."""
    from string import Template

    from bench.sim_text import prose
    from bench.vllm_client import MODEL
    from selflengthen.pipeline.config import Sampling
    from selflengthen.pipeline.data import load_seed_instructions

    template = Template((ROOT / "pipeline" / "prompts" / "en" / "extend.txt").read_text())
    instructions = [row["prompt"] for row in load_seed_instructions("en")]
    rng, s = random.Random(seed), Sampling()
    out = []
    for i in range(n):
        words = max(50, round(rng.lognormvariate(math.log(answer_words), sigma)))
        prompt = template.substitute(instruction=rng.choice(instructions), response=prose(rng, words))
        out.append({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": s.temperature,
                    "top_p": s.top_p, "top_k": s.top_k, "repetition_penalty": s.repetition_penalty,
                    "max_tokens": output_len, "seed": 1000 + i, "ignore_eos": True})
    return out


def vllm_rows(args: argparse.Namespace, root: Path) -> list[Row]:
    from bench import training
    from bench.vllm_client import MODEL, run_ours, run_theirs
    from selflengthen.pipeline.serving import VLLMServer

    model = training.build_model(root / "serve-model", {**QWEN2_05B, "max_positions": args.max_model_len},
                                 "bfloat16")
    requests = extend_requests(args.requests, args.answer_words, VLLM["sigma"], args.output_len)
    with VLLMServer(str(model), served_names=[MODEL], max_model_len=args.max_model_len, dtype="bfloat16",
                    startup_timeout=1200) as server:
        endpoint = server.endpoint
        warm = requests[: min(len(requests), 64)]
        asyncio.run(run_theirs(endpoint, warm, 64))
        asyncio.run(run_ours(endpoint, warm, 64))
        theirs = {c: asyncio.run(run_theirs(endpoint, requests, c)) for c in sorted(set(args.concurrencies))}
        best = max(theirs, key=lambda c: theirs[c]["throughput"])
        ours = {c: asyncio.run(run_ours(endpoint, requests, c)) for c in sorted({best, SHIPPED_CONCURRENCY})}
        again = asyncio.run(run_theirs(endpoint, requests, best))  # the baseline once more: the drift of the run
    base = statistics.mean([theirs[best]["throughput"], again["throughput"]])
    sweep = ", ".join(f"C={c}: {r['throughput']:,.0f}" for c, r in theirs.items())
    note = (f"one GPU, vLLM bf16, 0.5B-class Qwen2 (random init), {len(requests)} extend requests (answers of "
            f"~{args.answer_words} words, {args.output_len} tokens out, ignore_eos); vllm bench serve tok/s by "
            f"concurrency {sweep}; its best C={best}, measured twice ({theirs[best]['throughput']:,.0f}, "
            f"{again['throughput']:,.0f}), the mean is the baseline")
    details = {"theirs": theirs, "theirsAgain": again, "ours": ours, "best": best}
    rows = [Row(f"GPU vLLM: extend tokens/s per GPU, ours at C={best} / vllm bench serve at its best (C={best})",
                ours[best]["throughput"], base, ours[best]["throughput"] / base, f">= {GOAL}",
                ours[best]["throughput"] / base >= GOAL, unit="tok/s", note=note, details=details)]
    if best != SHIPPED_CONCURRENCY:
        shipped = ours[SHIPPED_CONCURRENCY]["throughput"]
        rows.append(Row(f"GPU vLLM: extend tokens/s per GPU, ours at the shipped C={SHIPPED_CONCURRENCY} / vllm "
                        f"bench serve at its best (C={best})", shipped, base, shipped / base, f">= {GOAL}",
                        shipped / base >= GOAL, unit="tok/s", note=note))
    return rows


# -- training --------------------------------------------------------------------------------------------------------


def flops_per_token(shape: dict, mean_length: float, mode: str = "lora") -> float:
    """Model FLOPs per trained token (see the module's docstring)."""
    h, layers, kv = shape["hidden"], shape["layers"], shape["kv_heads"] * shape["hidden"] // shape["heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate"]  # q, o; k, v; gate, up, down
    n = layers * per_layer + h * shape["vocab"]  # the (tied) LM head counts as a matmul
    dense = (4 if mode == "lora" else 6) * n
    attention = 3 * 2 * layers * h * mean_length
    return dense + attention


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def training_rows(args: argparse.Namespace, root: Path) -> list[Row]:
    import torch

    from bench import training

    size = _training_size(args)
    with training._quiet():
        result = training.compare(size, root / "training")
    pairs, d = result["pairs"], result["data"]
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name, args.peak_tflops)
    fpt = flops_per_token(size["model"], d["lengthMean"])
    rows = []
    for method in ("ours", *training.BASELINES):
        tps = statistics.median(p[method]["wallTokensPerSecond"] for p in pairs)
        mem = max(p[method]["peakMemory"] for p in pairs) / 2**30
        mfu = tps * fpt / peak if peak else None
        rows.append({"method": method, "tokensPerSecond": tps, "peakMemoryGiB": mem, "mfu": mfu,
                     "gradientCheckpointing": pairs[0][method]["gradientCheckpointing"],
                     "heldoutLoss": [p[method]["heldoutLoss"] for p in pairs]})
    by = {r["method"]: r for r in rows}
    decision = pairs[0]["ours"].get("checkpointingDecision", {})
    note = (f"{name}, bf16, LoRA r8, batch 1, {d['examples']} examples, {d['tokens']:,} tokens (mean "
            f"{d['lengthMean']}, max {d['lengthMax']}); {fpt / 1e9:.2f} GFLOPs per token; peak bf16 "
            f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; " + "; ".join(
                f"{r['method']} {r['tokensPerSecond']:,.0f} tok/s, MFU "
                f"{'-' if r['mfu'] is None else format(r['mfu'], '.3f')}, peak {r['peakMemoryGiB']:.2f} GiB, "
                f"checkpointing {'on' if r['gradientCheckpointing'] else 'off'}" for r in rows)
            + f"; train_memory estimate for ours: {decision}")
    out = []
    for baseline in training.BASELINES:
        ratio = by["ours"]["tokensPerSecond"] / by[baseline]["tokensPerSecond"]
        out.append(Row(f"GPU training: tokens/s, ours / {training.LABELS[baseline]}", by["ours"]["tokensPerSecond"],
                       by[baseline]["tokensPerSecond"], ratio, f">= {GOAL}", ratio >= GOAL, unit="tok/s", note=note,
                       details={"methods": rows, "pairs": pairs, "data": d, "flopsPerToken": fpt,
                                "peakFlops": peak} if baseline == "paddingFree" else {}))
    if by["ours"]["mfu"] is not None:
        out.append(Row("GPU training: MFU, ours / TRL SFTTrainer padding-free", by["ours"]["mfu"],
                       by["paddingFree"]["mfu"], by["ours"]["mfu"] / by["paddingFree"]["mfu"], "-", None, note=note))
    return out


# -- main ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print(json.dumps(plan(args), indent=2))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is false); --dry-run shows the plan",
              file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    rows: list[Row] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for part, fn in (("vllm", vllm_rows), ("training", training_rows)):
            if part not in args.only:
                continue
            try:
                rows += fn(args, Path(tmp))
            except Exception as err:  # one part failing keeps the other's rows
                failed = True
                rows.append(Row(f"GPU {part}", None, None, None, "-", None, status="error", note=repr(err)[:2000]))
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    info = {"startedAt": started.isoformat(), "seconds": time.perf_counter() - t0, "machine": machine(),
            "gpu": {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                    "memoryGiB": torch.cuda.get_device_properties(0).total_memory / 2**30},
            "plan": plan(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{started.strftime('%Y-%m-%d')}-{info['machine']['host']}.json"
    path.write_text(json.dumps({**info, "rows": [r.to_dict() for r in rows]}, indent=2, default=str) + "\n")
    print(table(rows))
    print(f"\nwritten {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
