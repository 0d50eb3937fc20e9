"""Scale: the filters and drop_short on up to 1,000,000 items, and the data stages' peak memory as items grow.

1. CPU time (process_time: the machines are shared) of check_response + count_words + drop_short_mask on n
   items (texts of 30-70 words from the simulated model, a realistic share of them flawed), n up to 1,000,000;
   the exponent of time ~ n^k is fitted by least squares on log-log (n log n reads as k ~ 1.0-1.1). The
   reference's O(n^2) drop_short (list.index in the sorted lengths) is timed on small n and fitted the same way.
   Both drop_shorts are also timed at the paper's stage size (10,000 lengths), measured, not extrapolated.
2. Peak RSS of the respond and extend stages (the real stage code: process_shards, store, finalize) on 10k, 50k
   and 200k input items, each run in a fresh subprocess (its VmHWM: peak RSS). The inference client is
   replaced by an in-process fake that answers at once with the simulated model's text (no HTTP, so 200k items
   take seconds, not hours); upstream artifacts are written beforehand by the parent. Flat means the peak at the
   largest size stays within 1.25x of the smallest.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selflengthen.pipeline.text import check_response, count_words, drop_short_mask

from .common import ROOT, Row
from .sim_engine import SimModel
from .sim_text import _answer, generate, prose

# stage_size: the paper's respond stage (5,000 instructions x 2 samples): drop_short there, both measured
FULL = {"filter_sizes": [125_000, 250_000, 500_000, 1_000_000], "reference_sizes": [2_000, 4_000, 8_000],
        "memory_sizes": [10_000, 50_000, 200_000], "stage_size": 10_000}
QUICK = {"filter_sizes": [2_000, 4_000, 8_000], "reference_sizes": [500, 1_000, 2_000],
         "memory_sizes": [500, 1_000, 2_000], "stage_size": 1_000}
FLAT = 1.25


def fit_exponent(ns: list[int], ts: list[float]) -> float:
    xs, ys = [math.log(n) for n in ns], [math.log(max(t, 1e-9)) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def text_pool(size: int = 4096, seed: int = 0) -> list[str]:
    rng, m = random.Random(seed), SimModel()
    return [_answer(rng, m, rng.randint(30, 70), 10_000)[0] for _ in range(size)]


def filter_pass(pool: list[str], n: int, seed: int = 0) -> dict:
    """check_response on every item, count_words on those that pass, then the seeded drop_short mask."""
    k = len(pool)
    w0, t0 = time.perf_counter(), time.process_time()
    lengths = []
    for i in range(n):
        text = pool[i % k]
        if check_response(text) is None:
            lengths.append(count_words(text))
    t1 = time.process_time()
    mask = drop_short_mask(lengths, seed)
    t2 = time.process_time()
    return {"n": n, "seconds": t2 - t0, "filterSeconds": t1 - t0, "dropShortSeconds": t2 - t1,
            "wallSeconds": time.perf_counter() - w0, "passed": len(lengths), "kept": sum(mask)}


def reference_drop_short_mask(lengths: list[int], seed: int) -> list[bool]:
    """The reference's formulation: rank from list.index in the sorted lengths (O(n^2))."""
    ordered = sorted(lengths)
    rng = random.Random(seed)
    n = len(lengths)
    return [rng.random() > 2 * (1 - ordered.index(x) / n) ** 3 for x in lengths]


def stage_drop_short(n: int, repeats: int = 3) -> Row:
    """drop_short on one stage's lengths at the paper's size (word counts of lognormal answers, median 1,200),
    ours and the reference's, each the best of `repeats` (CPU seconds), the same masks checked."""
    rng = random.Random(2)
    lengths = [max(1, int(rng.lognormvariate(math.log(1200), 0.5))) for _ in range(n)]
    best, masks = {}, {}
    for name, fn in (("ours", drop_short_mask), ("reference", reference_drop_short_mask)):
        times = []
        for _ in range(repeats):
            t = time.process_time()
            mask = fn(lengths, 0)
            times.append(time.process_time() - t)
        best[name], masks[name] = (min(times), sum(mask)), mask
    if masks["ours"] != masks["reference"]:  # the same items kept, or the timing compares different work
        raise RuntimeError(f"drop_short at n={n}: ours and the reference keep different items")
    ours, ref = best["ours"][0], best["reference"][0]
    return Row(f"scale: drop_short CPU s at the paper's stage size ({n:,} lengths), both measured", ours, ref,
               ref / max(ours, 1e-9), "-", None, unit="s",
               note=f"kept {best['ours'][1]:,} (ours) and {best['reference'][1]:,} (reference) of {n:,}",
               details={"n": n, "seconds": {k: v[0] for k, v in best.items()}})


def filters(sizes: list[int], reference_sizes: list[int]) -> tuple[list[Row], dict]:
    pool = text_pool()
    runs = [filter_pass(pool, n) for n in sizes]
    k_all = fit_exponent(sizes, [r["seconds"] for r in runs])
    k_drop = fit_exponent(sizes, [r["dropShortSeconds"] for r in runs])
    rng = random.Random(1)
    ref = []
    for n in reference_sizes:
        lengths = [rng.randint(20, 2000) for _ in range(n)]
        t = time.process_time()
        reference_drop_short_mask(lengths, 0)
        ref.append(time.process_time() - t)
    k_ref = fit_exponent(reference_sizes, ref)
    big = runs[-1]
    ref_big = ref[-1] * (big["passed"] / reference_sizes[-1]) ** k_ref
    details = {"runs": runs, "exponent": k_all, "dropShortExponent": k_drop,
               "reference": {"sizes": reference_sizes, "seconds": ref, "exponent": k_ref,
                             "extrapolatedSeconds": ref_big}}
    n_big = f"{big['n']:,}"
    rows = [
        Row(f"scale: filters+drop_short time exponent k (t ~ n^k, n up to {n_big})", k_all, k_ref, None,
            "<= 1.15", k_all <= 1.15,
            note=f"drop_short alone k={k_drop:.3f}; baseline = the reference's O(n^2) drop_short, "
                 f"fitted on n={reference_sizes[0]:,}..{reference_sizes[-1]:,}; filters+drop_short on {n_big} "
                 f"items: {big['seconds']:.1f} s CPU in all", details=details),
    ]
    return rows, details


# -- peak memory of the data stages -------------------------------------------------------------------------------


class FakeClient:
    """InferenceClient's chat() answered in-process by the simulated model (deterministic, instant)."""

    def __init__(self, model: SimModel):
        self.model = model

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        pass

    async def chat(self, model, messages, sampling, *, max_tokens=None, continue_final=False, seed=None):
        from selflengthen.pipeline.inference import Generation

        body = {"model": model, "messages": messages, "max_tokens": max_tokens or sampling.max_tokens, "seed": seed,
                "continue_final_message": continue_final}
        text, tokens, _, finish, _ = generate(self.model, body, b"")
        return Generation(text=text, finish_reason=finish, completion_tokens=tokens)


SIM_FOR_MEMORY = SimModel(respond_median_words=90)


def memory_config(name: str):
    from selflengthen.pipeline.config import RunConfig

    return RunConfig.model_validate({
        "name": name, "iterations": 1, "seed": 0,
        "models": {"endpoint": "http://fake.invalid/v1"},
        "respond": {"samplesPerInstruction": 1, "maxRetries": 2, "maxTokens": 1024},
        "extend": {"attempts": 1, "passes": 1, "maxRetries": 1, "maxTokens": 2048},
        "client": {"concurrency": 128},
        "storage": {"uri": "file:///unused", "shardSize": 64},
    })


def write_upstream(root: Path, stage: str, n: int) -> None:
    """The input of `stage` (the previous stage's outputs, manifest and _SUCCESS), written shard by shard."""
    from selflengthen.pipeline.artifacts import StageArtifacts
    from selflengthen.pipeline.store import LocalStore

    config = memory_config("bench-memory")
    upstream = {"respond": "self-instruct", "extend": "respond"}[stage]
    art = StageArtifacts(LocalStore(root), config.name, 1, upstream)
    rng = random.Random(n)
    answers = [prose(rng, rng.randint(60, 120)) for _ in range(512)] if stage == "extend" else []
    topics = [prose(rng, rng.randint(12, 30)) for _ in range(512)]

    def rows():
        for i in range(n):
            instruction = topics[i % 512].replace("\n\n", " ")
            if stage == "respond":
                yield {"id": f"i01-{i:07d}", "language": "en", "instruction": instruction,
                       "words": count_words(instruction)}
            else:
                text = answers[(i * 7) % 512]
                yield {"id": f"i01-{i:07d}-s0", "instructionId": f"i01-{i:07d}", "language": "en",
                       "instruction": instruction, "response": text, "words": count_words(text)}

    art.write_outputs(rows(), config.storage.shard_size)
    art.finish({"counts": {"accepted": n}})


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    return _status_mib("VmRSS") or 0.0


def peak_rss_mib() -> float:
    """This process's peak RSS since it exec'd: VmHWM. (ru_maxrss is no good in a child: Linux carries the
    parent's RSS at fork over exec into it, so a child of a big parent reports the parent's size.)"""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(stage: str, root: str) -> dict:
    """In a fresh process: run one stage on the prepared store; its peak RSS."""
    from selflengthen.pipeline.stages import StageContext, run_stage, stage_module
    from selflengthen.pipeline.store import LocalStore

    module = stage_module(stage)
    module.make_client = lambda ctx, salt: FakeClient(SIM_FOR_MEMORY)
    config = memory_config("bench-memory")
    ctx = StageContext(config=config, iteration=1, store=LocalStore(root), endpoint="http://fake.invalid/v1")
    before = rss_mib()
    t = time.perf_counter()
    manifest = run_stage(stage, ctx)
    return {"stage": stage, "seconds": time.perf_counter() - t, "rssBeforeMiB": before,
            "peakRssMiB": peak_rss_mib(), "counts": manifest["counts"]}


def measure(stage: str, n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-memory-{stage}-") as tmp:
        write_upstream(Path(tmp), stage, n)
        code = (f"import sys, json; sys.path.append({str(ROOT)!r}); from bench.scale import probe; "
                f"print(json.dumps(probe({stage!r}, {tmp!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {stage} n={n} failed:\n{proc.stderr[-3000:]}")
        return {"n": n, **json.loads(proc.stdout.strip().splitlines()[-1])}


def memory(sizes: list[int]) -> tuple[list[Row], dict]:
    rows, details = [], {}
    for stage in ("respond", "extend"):
        runs = [measure(stage, n) for n in sizes]
        details[stage] = runs
        small, big = runs[0], runs[-1]
        ratio = big["peakRssMiB"] / small["peakRssMiB"]
        per_item = (big["peakRssMiB"] - small["peakRssMiB"]) * 2**20 / (big["n"] - small["n"])
        rows.append(Row(
            f"scale: {stage} peak RSS MiB, {big['n']:,} vs {small['n']:,} items", big["peakRssMiB"],
            small["peakRssMiB"], ratio, f"<= {FLAT}", ratio <= FLAT, unit="MiB",
            note=f"growth {per_item:,.0f} B/item; peaks " + ", ".join(f"{r['n']:,}: {r['peakRssMiB']:.0f}"
                                                                      for r in runs),
            details={"runs": runs}))
    return rows, details


def run(quick: bool = False, **overrides) -> list[Row]:
    size = {**(QUICK if quick else FULL), **overrides}
    filter_rows, _ = filters(size["filter_sizes"], size["reference_sizes"])
    memory_rows, _ = memory(size["memory_sizes"])
    return filter_rows + [stage_drop_short(size["stage_size"])] + memory_rows
