"""Long texts at scale (issue 17), against the simulated vLLM:

- long context: an extend workload whose texts approach and pass the server's context (maxModelLen), with the
  paper's maxTokens (16,384, half of its 32,768 context, scaled down here with the context); the stage must run
  to the end with the requests that cannot fit rejected per item and counted (reason `context`), and the strict
  server (400 whenever prompt + max_tokens exceeds its context) must never have to refuse one;
- self-instruct tokens: tokens the server generates per accepted instruction (completions and judge answers),
  ours (a stop string at the next item's label, selfInstruct.maxTokens 1024, the base model) vs before (the
  reference's way, bench/reference_driver.py: no stop, sampling.maxTokens 16,384, the first line kept), against a
  simulated model that, like a chat model asked for a list, goes on listing requests until stopped.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from pathlib import Path

from selflengthen.pipeline.config import RunConfig
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.store import LocalStore

from .common import Row
from .reference_driver import Reference
from .sim_engine import SimModel
from .sim_server import SimServer
from .sim_text import prose

LONG_FULL = {"items": 400, "context": 8192, "concurrency": 64}
LONG_QUICK = {"items": 12, "context": 1024, "concurrency": 8}


def long_context(quick: bool) -> Row:
    size = LONG_QUICK if quick else LONG_FULL
    context = size["context"]
    model = SimModel(max_model_len=context, time_scale=0.0005, bad_rate=0.0, saturation=16)
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp, SimServer(model) as sim:
        config = RunConfig.model_validate({
            "name": "bench-long", "iterations": 1, "seed": 0, "models": {"endpoint": sim.endpoint},
            "sampling": {"maxTokens": context // 2},
            "extend": {"attempts": 2, "passes": 3},
            "client": {"concurrency": size["concurrency"]},
            "storage": {"uri": "file:///unused", "shardSize": 16},
        })
        ctx = StageContext(config=config, iteration=1, store=LocalStore(Path(tmp)), endpoint=sim.endpoint)
        rng = random.Random(0)
        # initial texts log-uniform from 100 words to 1.3x the context: many grow past it within three passes
        rows = []
        for i in range(size["items"]):
            words = int(math.exp(rng.uniform(math.log(100), math.log(1.3 * context))))
            rows.append({"id": f"r{i:05d}", "instructionId": f"i{i:05d}", "language": "en",
                         "instruction": "Write a long essay about the history of rivers.",
                         "response": prose(rng, words), "words": words})
        respond = ctx.artifacts("respond")
        respond.write_outputs(rows, 16)
        respond.finish({"counts": {"accepted": len(rows)}})
        sim.reset()
        start = time.perf_counter()
        manifest = run_stage("extend", ctx)
        wall = time.perf_counter() - start
        server = sim.stats()
        finished = ctx.artifacts("extend").done()
    counts = manifest["counts"]
    attempts = counts["requested"]
    accounted = counts["passed"] + counts["failed"]  # every attempt ended accepted or with its reasons counted
    share = accounted / attempts if finished else 0.0
    over = counts["rejected"].get("context", 0)
    met = finished and share == 1.0 and server["refused"] == 0 and over > 0 and counts["accepted"] > 0
    return Row(f"long context: extend near maxModelLen {context:,} (maxTokens {context // 2:,}), attempts finished",
               share, None, None, "1.0, over-budget requests rejected and counted, 0 refused by the server", met,
               note=f"{size['items']} texts of 100 to {int(1.3 * context):,} words: {counts['accepted']} extended, "
                    f"{over} requests over the context rejected ({counts['contextLimited']} attempts stopped at "
                    f"the limit), {server['refused']} answered 400, {wall:.1f} s",
               details={"size": size, "model": dataclasses.asdict(model), "counts": counts, "server": server,
                        "wall": wall})


SI_FULL = {"instructions": 200, "concurrency": 64}
SI_QUICK = {"instructions": 8, "concurrency": 8}


def self_instruct_tokens(quick: bool) -> Row:
    size = SI_QUICK if quick else SI_FULL
    model = SimModel(instruction_runs_on=True, time_scale=0.0002, saturation=16)

    def config(endpoint: str, **self_instruct) -> RunConfig:
        return RunConfig.model_validate({
            "name": "bench-si", "iterations": 1, "seed": 0, "models": {"endpoint": endpoint},
            "sampling": {"maxTokens": 16384},
            "selfInstruct": {"instructionsPerIteration": size["instructions"], **self_instruct},
            "client": {"concurrency": size["concurrency"]},
            "storage": {"uri": "file:///unused", "shardSize": 16},
        })

    with tempfile.TemporaryDirectory(prefix="bench-si-") as tmp, SimServer(model) as sim:
        ctx = StageContext(config=config(sim.endpoint), iteration=1, store=LocalStore(Path(tmp) / "ours"),
                           endpoint=sim.endpoint)
        sim.reset()
        manifest = run_stage("self-instruct", ctx)
        ours_server = sim.stats()
        (Path(tmp) / "before").mkdir()
        # before: what the stage did until now, the reference's way: no stop, maxTokens = sampling's 16,384
        ref = Reference(config(sim.endpoint, maxTokens=16384), sim.endpoint, size["concurrency"], Path(tmp) / "before")
        sim.reset()
        try:
            before_accepted = len(ref.self_instruct())
        finally:
            ref.close()
        before_server = sim.stats()
    ours = ours_server["completionTokens"] / max(1, manifest["counts"]["accepted"])
    before = before_server["completionTokens"] / max(1, before_accepted)
    ratio = before / ours if ours else None
    return Row("self-instruct: generated tokens per accepted instruction, before / ours", ours, before, ratio,
               ">= 10", ratio is not None and ratio >= 10, unit="tok",
               note=f"{size['instructions']} slots against a model that keeps listing requests: ours "
                    f"{ours_server['completionTokens']:,} tokens for {manifest['counts']['accepted']} accepted "
                    f"(rejected tries {manifest['counts']['rejected']}), before {before_server['completionTokens']:,} "
                    f"tokens for {before_accepted}",
               details={"size": size, "ours": {"counts": manifest["counts"], "server": ours_server},
                        "before": {"accepted": before_accepted, "server": before_server}})


def run(quick: bool = False) -> list[Row]:
    return [long_context(quick), self_instruct_tokens(quick)]
