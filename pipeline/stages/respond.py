"""Initial responses: the Generator answers each instruction respond.samplesPerInstruction times, each sample
retried until it passes the response checks; then drop_short over the whole set. With evaluate.heldoutItems the
same Generator also answers the held-out prompts (pipeline/heldout.py): its length before this iteration's training."""

from __future__ import annotations

import asyncio

from ..heldout import measure_heldout_alongside
from ..inference import ItemRejected
from ..text import count_words
from . import StageContext
from .common import (
    Words,
    chunks,
    finalize_with_drop_short,
    make_client,
    process_shards,
    reject_reason,
    work_totals,
)

NAME = "respond"
REQUIRES = ("self-instruct",)


def run(ctx: StageContext) -> dict:
    return asyncio.run(_run(ctx))


async def _run(ctx: StageContext) -> dict:
    cfg = ctx.config
    artifacts = ctx.artifacts(NAME)
    upstream = ctx.artifacts("self-instruct")
    total = upstream.manifest()["counts"]["accepted"]
    samples = cfg.respond.samples_per_instruction

    async with make_client(ctx, NAME) as client:

        async def sample(item: dict, k: int) -> dict:
            rejections: dict[str, int] = {}
            for attempt in range(cfg.respond.max_retries):
                try:
                    gen = await client.chat(
                        cfg.models.generator, [{"role": "user", "content": item["instruction"]}], cfg.sampling,
                        max_tokens=cfg.respond.max_tokens, seed=ctx.seed(NAME, item["id"], k, attempt),
                    )
                except ItemRejected as err:  # the same prompt would be refused again: the sample fails
                    rejections[err.reason] = rejections.get(err.reason, 0) + 1
                    return {"id": None, "instructionId": item["id"], "rejections": rejections,
                            "requests": attempt + 1}
                reason = reject_reason(ctx, gen.text)
                if reason is None:
                    text = gen.text.strip()
                    return {"id": f"{item['id']}-s{k}", "instructionId": item["id"], "language": item["language"],
                            "instruction": item["instruction"], "response": text, "words": count_words(text),
                            "rejections": rejections, "requests": attempt + 1}
                rejections[reason] = rejections.get(reason, 0) + 1
            return {"id": None, "instructionId": item["id"], "rejections": rejections,
                    "requests": cfg.respond.max_retries}

        async def handle(item: dict) -> list[dict]:
            return list(await asyncio.gather(*(sample(item, k) for k in range(samples))))

        heldout = await measure_heldout_alongside(  # the Generator before this iteration's training
            process_shards(ctx, artifacts, chunks(upstream.read_outputs(), cfg.storage.shard_size), handle,
                           total=total), cfg, client)

    passed, kept = finalize_with_drop_short(ctx, artifacts, lambda r: r["id"] is not None, "response")
    requests, rejected = work_totals(artifacts)
    words = Words()
    for row in artifacts.read_outputs():
        words.add(row["words"])
    return {
        "counts": {
            "instructions": total,
            "requested": total * samples,
            "passed": passed,
            "failed": total * samples - passed,
            "droppedShort": passed - kept,
            "accepted": kept,
            "requests": requests,
            "rejected": rejected,
        },
        "averageWords": words.average,
        "maxWords": words.max,
        **({"heldout": heldout} if heldout else {}),
    }
