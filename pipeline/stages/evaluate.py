"""LonGen evaluation of the iteration's Generator: it answers evaluate.items LonGen queries (default all 240),
and each answer is scored for following the query's length demand (pipeline/longen.py).

The Generator is asked through the inference endpoint under models.generator: the orchestrator serves this
iteration's trained Generator there before running the stage. Outputs: per-item rows (part-*.jsonl: id,
language, type, range, constraint, query, response, words, low, high, score, finishReason, completionTokens) and
a manifest with the scores (overall, per type, language and range) and the average words.
"""

from __future__ import annotations

import asyncio

from ..data import load_longen
from ..longen import aggregate, score_response, select_items
from . import StageContext
from .common import chunks, make_client, process_shards

NAME = "evaluate"
REQUIRES = ("train-generator",)


def items(ctx: StageContext) -> list[dict]:
    ev = ctx.config.evaluate
    rows = [{**row, "id": f"longen-{i:03d}"} for i, row in enumerate(load_longen())]
    return select_items(rows, ev.items, ev.languages)


def run(ctx: StageContext) -> dict:
    ev = ctx.config.evaluate
    if not ev.enabled:
        return {"enabled": False, "counts": {"requested": 0, "accepted": 0}}
    return asyncio.run(_run(ctx))


async def _run(ctx: StageContext) -> dict:
    cfg = ctx.config
    artifacts = ctx.artifacts(NAME)
    selected = items(ctx)

    async with make_client(ctx, NAME) as client:

        async def handle(item: dict) -> list[dict]:
            gen = await client.chat(cfg.models.generator, [{"role": "user", "content": item["query"]}], cfg.sampling,
                                    max_tokens=cfg.evaluate.max_tokens, seed=ctx.seed(NAME, item["id"]))
            response = gen.text.strip()
            return [{"id": item["id"], "language": item["language"], "type": item["type"], "range": item["range"],
                     "constraint": item["constraint"], "query": item["query"], "response": response,
                     **score_response(item, response), "finishReason": gen.finish_reason,
                     "completionTokens": gen.completion_tokens}]

        await process_shards(ctx, artifacts, chunks(selected, cfg.storage.shard_size), handle, total=len(selected))

    rows = list(artifacts.iter_work())
    artifacts.write_outputs(rows, cfg.storage.shard_size)
    scores = aggregate(rows)
    return {
        "enabled": True,
        "model": cfg.models.generator,
        "counts": {"requested": len(selected), "accepted": len(rows),
                   "truncated": sum(1 for r in rows if r.get("finishReason") == "length")},
        "scores": {k: scores[k] for k in ("overall", "byType", "byLanguage", "byRange")},
        "averageWords": scores["averageWords"],
        "maxWords": max((r["words"] for r in rows), default=0),
    }
