"""Initial responses: the Generator answers each instruction respond.samplesPerInstruction times, each sample
retried until it passes the response checks; then drop_short over the whole set. With evaluate.heldoutItems the
same Generator also answers the held-out prompts (pipeline/heldout.py): its length before this iteration's training
(from iteration 2 on, the previous evaluate's answers of that same Generator, carried over)."""

from __future__ import annotations

import asyncio

from ..heldout import carried_over, measure_heldout_alongside
from ..inference import ItemRejected
from ..text import count_words
from . import StageContext
from .common import (
    Words,
    chunks,
    finalize_with_drop_short,
    first_passing,
    make_client,
    process_shards,
    reject_reason,
    tries_at_once,
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

    at_once = tries_at_once(cfg, total * samples, cfg.respond.max_retries)

    async with make_client(ctx, NAME) as client:

        async def one_try(item: dict, k: int, attempt: int) -> dict:
            try:
                gen = await client.chat(
                    cfg.models.generator, [{"role": "user", "content": item["instruction"]}], cfg.sampling,
                    max_tokens=cfg.respond.max_tokens, seed=ctx.seed(NAME, item["id"], k, attempt),
                )
            except ItemRejected as err:  # the same prompt would be refused again: the sample fails
                return {"reason": err.reason, "final": True}
            reason = reject_reason(ctx, gen.text)
            return {"reason": reason, "final": reason is None, "text": gen.text.strip()}

        async def sample(item: dict, k: int) -> dict:
            tries, discarded = await first_passing(cfg.respond.max_retries, at_once,
                                                   lambda attempt: one_try(item, k, attempt), lambda t: t["final"])
            rejections: dict[str, int] = {}
            for t in tries:
                if t["reason"]:
                    rejections[t["reason"]] = rejections.get(t["reason"], 0) + 1
            tally = {"rejections": rejections, "requests": len(tries),
                     **({"triesDiscarded": discarded} if discarded else {})}
            if tries[-1]["reason"]:
                return {"id": None, "instructionId": item["id"], **tally}
            text = tries[-1]["text"]
            return {"id": f"{item['id']}-s{k}", "instructionId": item["id"], "language": item["language"],
                    "instruction": item["instruction"], "response": text, "words": count_words(text), **tally}

        async def handle(item: dict) -> list[dict]:
            return list(await asyncio.gather(*(sample(item, k) for k in range(samples))))

        heldout = await measure_heldout_alongside(  # the Generator before this iteration's training
            process_shards(ctx, artifacts, chunks(upstream.read_outputs(), cfg.storage.shard_size), handle,
                           total=total), cfg, client, known=carried_over(ctx))

    passed, kept = finalize_with_drop_short(ctx, artifacts, lambda r: r["id"] is not None, "response")
    requests, rejected, discarded = work_totals(artifacts)
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
            "triesDiscarded": discarded,  # started beside an item's final try, then cancelled (first_passing)
        },
        "averageWords": words.average,
        "maxWords": words.max,
        **({"heldout": heldout} if heldout else {}),
    }
