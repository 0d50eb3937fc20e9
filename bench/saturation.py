"""Server saturation: one data iteration (self-instruct -> respond -> extend) against the simulated vLLM.

(a) ours: the real stage functions (`run_stage`) into a LocalStore, client concurrency C;
(b) the reference's driver model (bench/reference_driver.py): a fixed pool of C threads per stage, blocking
    requests, barriers, recursive retries; same prompts and seeds, so nearly the same tokens;
(c) the upper bound: the tokens (a) generated, decoded at the server's peak throughput (its best concurrency
    all along), from the simulated server's own model.
Rows: tokens/s (a)/(c) (goal >= 0.95) and wall time (b)/(a) (goal: clearly above 1, read as >= 1.10), both at
C = twice the server's saturation point; and (a) once more at the shipped default concurrency, and once with
adaptive concurrency (client.adaptiveConcurrency) started there, each against (c). The simulated server has a
bounded batch (max_num_seqs) and KV cache and exposes vLLM's /metrics, which the adaptive client follows.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from selflengthen.pipeline.config import RunConfig
from selflengthen.pipeline.stages import DATA_STAGES, StageContext, run_stage
from selflengthen.pipeline.store import LocalStore

from .common import Row
from .reference_driver import Reference
from .sim_engine import SimModel
from .sim_server import SimServer

# Full size: 800 instruction slots -> ~1,600 answers -> ~1,900 extension attempts, ~4,300 items and ~2.5 M
# generated tokens; 1 simulated second = 50 ms, so the server peaks at 50,000 tokens/s real.
# shipped_concurrency: the default client.concurrency (32) against the server's saturation point (64), in
# proportion at the quick size: ours is run once more there, so the row shows what an under-filled server costs.
# The KV cache holds ~200 of this workload's requests (prompt + answer, ~550 tokens), under max_num_seqs.
FULL = {"instructions": 800, "concurrency": 128, "shipped_concurrency": 32, "shard_size": 64,
        "model": SimModel(peak_tokens_per_s=2500, saturation=64, max_num_seqs=256, kv_cache_tokens=120_000,
                          time_scale=0.05)}
QUICK = {"instructions": 12, "concurrency": 8, "shipped_concurrency": 2, "shard_size": 4,
         "model": SimModel(peak_tokens_per_s=2500, saturation=4, max_num_seqs=16, kv_cache_tokens=8_000,
                           time_scale=0.002, respond_median_words=60)}


def run_config(name: str, endpoint: str, instructions: int, concurrency: int, shard_size: int,
               adaptive: bool = False) -> RunConfig:
    """The paper's defaults except for sizes: judge on, 2 samples, 2 attempts x 3 passes, all filters on."""
    return RunConfig.model_validate({
        "name": name,
        "iterations": 1,
        "seed": 0,
        "models": {"endpoint": endpoint},
        "sampling": {"maxTokens": 4096},
        "selfInstruct": {"instructionsPerIteration": instructions, "maxTokens": 96},
        "respond": {"maxTokens": 1024},
        "extend": {"maxTokens": 2048},
        "client": {"concurrency": concurrency, "adaptiveConcurrency": adaptive},
        "storage": {"uri": "file:///unused", "shardSize": shard_size},
    })


def _delta(after: dict, before: dict, wall: float, cpu: float) -> dict:
    """A stage's share of the server's counters: tokens, requests, mean requests admitted and decoding, and the
    client's CPU seconds (this process: the stage's event loop, or the reference's threads)."""
    return {"wall": wall, "clientCpu": cpu,
            "tokens": after["completionTokens"] - before["completionTokens"],
            "requests": after["requests"] - before["requests"],
            "meanAdmitted": (after["admittedArea"] - before["admittedArea"]) / wall if wall else 0.0,
            "meanDecoding": (after["decodingArea"] - before["decodingArea"]) / wall if wall else 0.0}


def run_ours(sim: SimServer, config: RunConfig, workdir: Path) -> dict:
    store = LocalStore(workdir)
    ctx = StageContext(config=config, iteration=1, store=store, endpoint=sim.endpoint)
    sim.reset()
    stages = {}
    start = time.perf_counter()
    before = sim.stats()
    for name in DATA_STAGES:
        t0, c0 = time.perf_counter(), time.process_time()
        manifest = run_stage(name, ctx)
        after = sim.stats()
        stages[name] = {**_delta(after, before, time.perf_counter() - t0, time.process_time() - c0),
                        "counts": manifest["counts"]}
        before = after
    wall = time.perf_counter() - start
    total = sim.stats()
    return {"wall": wall, "tokens": total["completionTokens"], "requests": total["requests"], "stages": stages,
            "server": total}


def run_reference(sim: SimServer, config: RunConfig, workers: int, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    ref = Reference(config, sim.endpoint, workers, workdir)
    sim.reset()
    stages = {}
    try:
        start = time.perf_counter()
        before = sim.stats()
        data = None
        for name, step in (("self-instruct", lambda _: ref.self_instruct()), ("respond", ref.respond),
                           ("extend", ref.extend)):
            t0, c0 = time.perf_counter(), time.process_time()
            data = step(data)
            after = sim.stats()
            stages[name] = {**_delta(after, before, time.perf_counter() - t0, time.process_time() - c0),
                            "accepted": len(data)}
            before = after
        wall = time.perf_counter() - start
    finally:
        ref.close()
    total = sim.stats()
    return {"wall": wall, "tokens": total["completionTokens"], "requests": total["requests"], "stages": stages,
            "server": total}


def run(quick: bool = False, **overrides) -> list[Row]:
    size = {**(QUICK if quick else FULL), **overrides}
    model: SimModel = size["model"]
    with tempfile.TemporaryDirectory(prefix="bench-saturation-") as tmp, SimServer(model) as sim:
        config = run_config("bench-saturation", sim.endpoint, size["instructions"], size["concurrency"],
                            size["shard_size"])
        ours = run_ours(sim, config, Path(tmp) / "ours")
        ref = run_reference(sim, config, size["concurrency"], Path(tmp) / "reference")
        shipped_config = run_config("bench-saturation", sim.endpoint, size["instructions"],
                                    size["shipped_concurrency"], size["shard_size"])
        shipped = run_ours(sim, shipped_config, Path(tmp) / "shipped")
        adaptive_config = run_config("bench-saturation", sim.endpoint, size["instructions"],
                                     size["shipped_concurrency"], size["shard_size"], adaptive=True)
        adaptive = run_ours(sim, adaptive_config, Path(tmp) / "adaptive")
    peak = model.peak_tokens_per_s / model.time_scale  # real tokens/s at the best concurrency
    for result in (ours, ref, shipped, adaptive):
        result["tokensPerSecond"] = result["tokens"] / result["wall"]
        result["efficiency"] = result["tokensPerSecond"] / peak  # against (c) for its own tokens
        for stage in result["stages"].values():
            stage["efficiency"] = round(stage["tokens"] / stage["wall"] / peak, 4) if stage["wall"] else None
    upper_wall = ours["tokens"] / peak
    details = {
        "size": {k: v for k, v in size.items() if k != "model"},
        "model": dataclasses.asdict(model),
        "peakTokensPerSecond": peak,
        "upperBoundWall": upper_wall,
        "ours": ours,
        "reference": ref,
        "shipped": shipped,
        "adaptive": adaptive,
    }
    n_items = size["instructions"]
    label = f"{n_items} slots, C={size['concurrency']}, sim peak {peak:,.0f} tok/s at >= {model.saturation}"
    return [
        Row("saturation: tokens/s, ours (a) / upper bound (c)", ours["tokensPerSecond"], peak,
            ours["tokensPerSecond"] / peak, ">= 0.95", ours["tokensPerSecond"] / peak >= 0.95, unit="tok/s",
            note=f"{label}; (c) = {ours['tokens']:,} tokens / peak = {upper_wall:.1f} s vs (a) {ours['wall']:.1f} s",
            details=details),
        Row("saturation: wall s, reference driver (b) / ours (a)", ours["wall"], ref["wall"],
            ref["wall"] / ours["wall"], ">= 1.10", ref["wall"] / ours["wall"] >= 1.10, unit="s",
            note=f"tokens (a) {ours['tokens']:,}, (b) {ref['tokens']:,}; (b) reaches "
                 f"{ref['efficiency']:.3f} of (c)"),
        Row(f"saturation: tokens/s at the shipped C={size['shipped_concurrency']}, ours / upper bound (c)",
            shipped["tokensPerSecond"], peak, shipped["efficiency"], ">= 0.95", shipped["efficiency"] >= 0.95,
            unit="tok/s", note=f"the server saturates at {model.saturation}; the rows above use "
                               f"C={size['concurrency']}; {shipped['tokens']:,} tokens in {shipped['wall']:.1f} s"),
        Row(f"saturation: tokens/s, adaptive from C={size['shipped_concurrency']}, ours / upper bound (c)",
            adaptive["tokensPerSecond"], peak, adaptive["efficiency"], ">= 0.95", adaptive["efficiency"] >= 0.95,
            unit="tok/s", note=f"client.adaptiveConcurrency following the server's /metrics (batch <= "
                               f"{model.max_num_seqs}, KV cache {model.kv_cache_tokens:,} tokens); mean admitted "
                               f"{adaptive['server']['meanAdmitted']:.0f}, decoding "
                               f"{adaptive['server']['meanDecoding']:.0f}; {adaptive['tokens']:,} tokens in "
                               f"{adaptive['wall']:.1f} s"),
    ]
