"""Evaluation of the iteration's Generator on three benchmarks, in one stage:

  * LonGen (benchmark `longen`): evaluate.items queries (default all 240), each answer scored for following the
    query's length demand (pipeline/longen.py, the project's word count);
  * LongBench-Write (`longbench-write`, evaluate.longbenchWrite): LongWriter's length score S_l per item, overall,
    per language and per required-length bucket (pipeline/longbench.py, LongWriter's length count);
  * LongWrite-Ruler (`ruler`, evaluate.ruler): prompts asking for 1,000 to 30,000 words; the longest answer is the
    Generator's maximum output length (LongWriter's count).

The Generator is asked through the inference endpoint under models.generator: the orchestrator serves this
iteration's trained Generator there before running the stage. Outputs: per-item rows (part-*.jsonl, each with
its `benchmark`; LonGen rows: id, language, type, range, constraint, query, response, words, low, high, score,
finishReason, completionTokens; LongBench-Write rows: id, language, genre, required, prompt, response, words,
length, sl, bucket, ...; ruler rows: id, language, required, prompt, response, words, length, ...) and a manifest
with the LonGen scores (overall, per type, language and range), `longbenchWrite` and `ruler` sections.

With evaluate.judge.enabled an LLM judge (any OpenAI-compatible endpoint; the stage's own when judge.endpoint is
empty) also rates each LonGen answer's quality from 1 to 10 (judge.rubric: one score or the paper's seven
criteria, pipeline/judge.py): rows gain quality (None when no score could be read), judgeReply and judgeAttempts,
and the manifest a `quality` section; and each LongBench-Write answer on LongWriter's six dimensions (rows gain
sq and criteria, the manifest longbenchWrite.sq, and S = (S_l + S_q) / 2).
With evaluate.heldoutItems the Generator also answers the held-out prompts (pipeline/heldout.py): its length after
this iteration's training, to set against the one respond measured before it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from .. import judge as quality
from .. import longbench
from ..data import load_longbench_write, load_longen, load_longwrite_ruler
from ..heldout import measure_heldout_alongside
from ..inference import Generation, InferenceClient, ItemRejected
from ..longen import aggregate, score_response, select_items
from ..text import count_words
from . import StageContext, StageError
from .common import chunks, make_client, process_shards

NAME = "evaluate"
REQUIRES = ("train-generator",)


LONGEN, LONGBENCH_WRITE, RULER = "longen", "longbench-write", "ruler"


def items(ctx: StageContext) -> list[dict]:
    """The LonGen items asked (evaluate.items, evenly spread, after evaluate.languages)."""
    ev = ctx.config.evaluate
    rows = [{**row, "id": f"longen-{i:03d}", "benchmark": LONGEN} for i, row in enumerate(load_longen())]
    return select_items(rows, ev.items, ev.languages)


def longbench_items(ctx: StageContext) -> list[dict]:
    """The LongBench-Write and LongWrite-Ruler items asked, each with its language (detected from the prompt)."""
    ev = ctx.config.evaluate
    picked = []
    for enabled, count, prefix, benchmark, load in (
            (ev.longbench_write.enabled, ev.longbench_write.items, "lbw", LONGBENCH_WRITE, load_longbench_write),
            (ev.ruler.enabled, ev.ruler.items, "ruler", RULER, load_longwrite_ruler)):
        if enabled:
            rows = [{**row, "id": f"{prefix}-{i:03d}", "benchmark": benchmark, "language": longbench.language_of(row)}
                    for i, row in enumerate(load())]
            picked += select_items(rows, count, ev.languages)
    return picked


def run(ctx: StageContext) -> dict:
    ev = ctx.config.evaluate
    if not ev.enabled:
        return {"enabled": False, "counts": {"requested": 0, "accepted": 0}}
    return asyncio.run(evaluate_generator(ctx, NAME))


async def evaluate_generator(ctx: StageContext, stage: str) -> dict:
    """Ask the Generator served under models.generator every selected item; write the rows to `stage`'s artifacts
    and return the manifest (also the evaluation of the length-following model, under its own stage)."""
    cfg = ctx.config
    artifacts = ctx.artifacts(stage)
    selected = items(ctx) + longbench_items(ctx)

    judge = cfg.evaluate.judge

    async with make_client(ctx, stage) as client, contextlib.AsyncExitStack() as stack:
        judge_client = await stack.enter_async_context(judge_client_for(ctx, client)) if judge.enabled else None

        async def handle(item: dict) -> list[dict]:
            query = item.get("query") or item["prompt"]
            try:
                gen = await client.chat(cfg.models.generator, [{"role": "user", "content": query}], cfg.sampling,
                                        max_tokens=cfg.evaluate.max_tokens, seed=ctx.seed(NAME, item["id"]))
            except ItemRejected as err:  # scored as an empty answer, the reason kept; the others go on
                gen = Generation(text="", finish_reason=err.reason, completion_tokens=0)
            response = gen.text.strip()
            common = {"id": item["id"], "benchmark": item["benchmark"], "language": item["language"]}
            tail = {"finishReason": gen.finish_reason, "completionTokens": gen.completion_tokens}
            judge_seed = ctx.seed(NAME, "judge", item["id"])
            if item["benchmark"] == LONGEN:
                row = {**common, "type": item["type"], "range": item["range"], "constraint": item["constraint"],
                       "query": query, "response": response, **score_response(item, response), **tail}
                if judge_client is not None and response:
                    row.update(await quality.score_quality(judge_client, judge, item["language"], query, response,
                                                           judge_seed))
                return [row]
            row = {**common, "genre": item["type"], "required": item["length"], "prompt": query,
                   "response": response, "words": count_words(response),
                   "length": longbench.longwriter_length(response), **tail}
            if item["benchmark"] == LONGBENCH_WRITE:
                row.update(longbench.score_response(item, response))
                if judge_client is not None and response:
                    row.update(await quality.score_longbench(judge_client, judge, item["language"], query, response,
                                                             judge_seed))
            return [row]

        heldout = await measure_heldout_alongside(  # the Generator after this iteration's training
            process_shards(ctx, artifacts, chunks(selected, cfg.storage.shard_size), handle, total=len(selected)),
            cfg, client)

    rows = list(artifacts.iter_work())
    artifacts.write_outputs(rows, cfg.storage.shard_size)
    by_benchmark: dict[str, list[dict]] = {LONGEN: [], LONGBENCH_WRITE: [], RULER: []}
    for row in rows:
        by_benchmark[row.get("benchmark", LONGEN)].append(row)
    longen_rows = by_benchmark[LONGEN]
    scores = aggregate(longen_rows)
    manifest = {
        "enabled": True,
        "model": cfg.models.generator,
        "counts": {"requested": len(selected), "accepted": len(rows),
                   "truncated": sum(1 for r in rows if r.get("finishReason") == "length"),
                   "byBenchmark": {k: len(v) for k, v in by_benchmark.items() if v},
                   "rejected": dict(Counter(r["finishReason"] for r in rows
                                            if r.get("finishReason") in ("context", "refused")))},
        "scores": {k: scores[k] for k in ("overall", "byType", "byLanguage", "byRange")},
        "averageWords": scores["averageWords"],
        "maxWords": max((r["words"] for r in longen_rows), default=0),
        **({"quality": quality.aggregate_quality(longen_rows, judge.model, judge.rubric)} if judge.enabled else {}),
        **({"heldout": heldout} if heldout else {}),
    }
    if by_benchmark[LONGBENCH_WRITE]:
        lbw = longbench.aggregate(by_benchmark[LONGBENCH_WRITE])
        if judge.enabled:
            lbw["sq"] = quality.aggregate_sq(by_benchmark[LONGBENCH_WRITE], judge.model)
            sl, sq = lbw["sl"]["overall"], lbw["sq"]["overall"]
            lbw["s"] = round((sl + sq) / 2, 4) if sl is not None and sq is not None else None
        manifest["longbenchWrite"] = lbw
    if by_benchmark[RULER]:
        manifest["ruler"] = longbench.ruler_summary(by_benchmark[RULER])
    return manifest


@contextlib.asynccontextmanager
async def judge_client_for(ctx: StageContext, client: InferenceClient):
    """The judge's client: the stage's own when judge.endpoint is empty, else one for the judge's endpoint, with
    the key from the variable judge.apiKeyEnv names."""
    judge = ctx.config.evaluate.judge
    if not judge.endpoint:
        yield client
        return
    try:
        api_key = quality.judge_api_key(judge)
    except ValueError as err:
        raise StageError(f"stage {NAME}: {err}") from None
    async with InferenceClient(judge.endpoint, ctx.config.client, api_key=api_key, seed=ctx.seed("client", "judge"),
                               observe=ctx.metrics.client_observer(ctx.config.name, f"{NAME}-judge"),
                               budget=True) as judged:
        yield judged
