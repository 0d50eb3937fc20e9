"""LonGen evaluation of the iteration's Generator: it answers evaluate.items LonGen queries (default all 240),
and each answer is scored for following the query's length demand (pipeline/longen.py).

The Generator is asked through the inference endpoint under models.generator: the orchestrator serves this
iteration's trained Generator there before running the stage. Outputs: per-item rows (part-*.jsonl: id,
language, type, range, constraint, query, response, words, low, high, score, finishReason, completionTokens) and
a manifest with the scores (overall, per type, language and range) and the average words.

With evaluate.judge.enabled an LLM judge (any OpenAI-compatible endpoint; the stage's own when judge.endpoint is
empty) also rates each answer's quality from 1 to 10 (pipeline/judge.py): rows gain quality (None when no score
could be read), judgeReply and judgeAttempts, and the manifest a `quality` section (mean, per type, counts).
With evaluate.heldoutItems the Generator also answers the held-out prompts (pipeline/heldout.py): its length after
this iteration's training, to set against the one respond measured before it.
"""

from __future__ import annotations

import asyncio
import contextlib

from .. import judge as quality
from ..data import load_longen
from ..heldout import measure_heldout
from ..inference import InferenceClient
from ..longen import aggregate, score_response, select_items
from . import StageContext, StageError
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

    judge = cfg.evaluate.judge

    async with make_client(ctx, NAME) as client, contextlib.AsyncExitStack() as stack:
        judge_client = await stack.enter_async_context(judge_client_for(ctx, client)) if judge.enabled else None

        async def handle(item: dict) -> list[dict]:
            gen = await client.chat(cfg.models.generator, [{"role": "user", "content": item["query"]}], cfg.sampling,
                                    max_tokens=cfg.evaluate.max_tokens, seed=ctx.seed(NAME, item["id"]))
            response = gen.text.strip()
            row = {"id": item["id"], "language": item["language"], "type": item["type"], "range": item["range"],
                   "constraint": item["constraint"], "query": item["query"], "response": response,
                   **score_response(item, response), "finishReason": gen.finish_reason,
                   "completionTokens": gen.completion_tokens}
            if judge_client is not None:
                row.update(await quality.score(judge_client, judge, item["language"], item["query"], response,
                                               ctx.seed(NAME, "judge", item["id"])))
            return [row]

        await process_shards(ctx, artifacts, chunks(selected, cfg.storage.shard_size), handle, total=len(selected))
        heldout = await measure_heldout(cfg, client)  # the Generator after this iteration's training

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
        **({"quality": quality.aggregate_quality(rows, judge.model)} if judge.enabled else {}),
        **({"heldout": heldout} if heldout else {}),
    }


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
                               observe=ctx.metrics.client_observer(ctx.config.name, f"{NAME}-judge")) as judged:
        yield judged
