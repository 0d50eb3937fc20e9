"""Extension by micro-iterations: the Extender lengthens each initial response.

One pass over the current text (a micro-iteration of the method; docs/method.md):
  1. split it into paragraphs; the Extender enriches the first half (a chat request: extend prompt);
  2. keep the first extend.keepFraction of the enriched part's paragraphs;
  3. ask the Extender to extend the whole text, with the kept part forced as the start of its answer
     (vLLM's continue_final_message), so it continues from there;
  4. the candidate (kept part + continuation) replaces the current text if it passes the checks and is longer.
After extend.passes passes an attempt counts only if the text grew more than extend.minGrowth times; otherwise
the attempt is retried (extend.maxRetries). extend.attempts extended versions are made per response; then
drop_short over the whole extended set.
"""

from __future__ import annotations

import asyncio
import math

from .. import prompts
from ..inference import ItemRejected
from ..text import count_words, split_paragraphs
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

NAME = "extend"
REQUIRES = ("respond",)


def first_half(text: str) -> str:
    paragraphs, sep = split_paragraphs(text)
    return sep.join(paragraphs[: max(1, math.ceil(len(paragraphs) / 2))])


def kept_part(text: str, fraction: float) -> str:
    paragraphs, sep = split_paragraphs(text)
    return sep.join(paragraphs[: max(1, math.floor(len(paragraphs) * fraction))]) if paragraphs else ""


def run(ctx: StageContext) -> dict:
    return asyncio.run(_run(ctx))


async def _run(ctx: StageContext) -> dict:
    cfg = ctx.config
    ext = cfg.extend
    artifacts = ctx.artifacts(NAME)
    upstream = ctx.artifacts("respond")
    total = upstream.manifest()["counts"]["accepted"]
    model = cfg.models.extender

    at_once = tries_at_once(cfg, total * ext.attempts, ext.max_retries)

    async with make_client(ctx, NAME) as client:

        async def one_pass(item: dict, current: str, seed: int, reject) -> tuple[str, bool]:
            """(the new current text, whether the text has reached the server's context: no further pass fits)."""
            lang, instruction = item["language"], item["instruction"]
            try:
                former = await client.chat(
                    model, [{"role": "user", "content": prompts.render(lang, "extend", instruction=instruction,
                                                                       response=first_half(current))}],
                    cfg.sampling, max_tokens=ext.max_tokens, seed=seed,
                )
                prefix = kept_part(former.text, ext.keep_fraction)
                if not prefix:
                    reject("empty")
                    return current, False
                latter = await client.chat(
                    model,
                    [{"role": "user", "content": prompts.render(lang, "extend", instruction=instruction,
                                                                response=current)},
                     {"role": "assistant", "content": prefix}],
                    cfg.sampling, max_tokens=ext.max_tokens, continue_final=True, seed=seed + 1,
                )
            except ItemRejected as err:  # over the context (or refused): this text can grow no further here
                reject(err.reason)
                return current, True
            candidate = (prefix + latter.text).strip()
            reason = reject_reason(ctx, candidate)
            if reason is None and count_words(candidate) <= count_words(current):
                reason = "no-growth"
            if reason:
                reject(reason)
                return current, False
            return candidate, False

        async def one_try(item: dict, a: int, retry: int) -> dict:
            """extend.passes passes from the initial text: the try passes when the text grew enough."""
            rejections: dict[str, int] = {}

            def reject(reason: str) -> None:
                rejections[reason] = rejections.get(reason, 0) + 1

            initial = item["response"]
            current, requests, limited = initial, 0, False  # limited: a pass stopped at the context limit
            for p in range(ext.passes):
                current, limited = await one_pass(item, current, ctx.seed(NAME, item["id"], a, retry, p), reject)
                requests += 2
                if limited:
                    break
            words = count_words(current)
            passed = words > ext.min_growth * count_words(initial)
            if not passed:
                reject("growth")
            # the initial text itself leaves no room: retrying cannot help
            return {"text": current, "words": words, "passed": passed, "hopeless": limited and current == initial,
                    "rejections": rejections, "requests": requests, "limited": limited}

        async def attempt(item: dict, a: int) -> dict:
            tries, discarded = await first_passing(ext.max_retries, at_once, lambda retry: one_try(item, a, retry),
                                                   lambda t: t["passed"] or t["hopeless"])
            rejections: dict[str, int] = {}
            for t in tries:
                for reason, n in t["rejections"].items():
                    rejections[reason] = rejections.get(reason, 0) + n
            tally = {"rejections": rejections, "requests": sum(t["requests"] for t in tries),
                     "contextLimited": any(t["limited"] for t in tries),
                     **({"triesDiscarded": discarded} if discarded else {})}
            last = tries[-1]
            if not last["passed"]:
                return {"id": None, "responseId": item["id"], **tally}
            return {"id": f"{item['id']}-a{a}", "responseId": item["id"], "language": item["language"],
                    "instruction": item["instruction"], "initial": item["response"], "extended": last["text"],
                    "initialWords": count_words(item["response"]), "words": last["words"], **tally}

        async def handle(item: dict) -> list[dict]:
            return list(await asyncio.gather(*(attempt(item, a) for a in range(ext.attempts))))

        await process_shards(ctx, artifacts, chunks(upstream.read_outputs(), cfg.storage.shard_size), handle,
                             total=total)

    passed, kept = finalize_with_drop_short(ctx, artifacts, lambda r: r["id"] is not None, "extended")
    requests, rejected, discarded = work_totals(artifacts)
    limited = sum(1 for r in artifacts.iter_work() if r.get("contextLimited"))
    initial, extended = Words(), Words()
    for row in artifacts.read_outputs():
        initial.add(row["initialWords"])
        extended.add(row["words"])
    return {
        "counts": {
            "responses": total,
            "requested": total * ext.attempts,
            "passed": passed,
            "failed": total * ext.attempts - passed,
            "droppedShort": passed - kept,
            "accepted": kept,
            "requests": requests,
            "rejected": rejected,
            "triesDiscarded": discarded,  # started beside an item's final try, then cancelled (first_passing)
            "contextLimited": limited,  # attempts whose text reached the server's context
        },
        "averageWordsInitial": initial.average,
        "averageWords": extended.average,
        "maxWords": extended.max,
        "growth": round(extended.total / max(1, initial.total), 3),
    }
