"""Self-instruct: new instructions completed few-shot from a growing pool, judged, length-bounded, deduplicated.

Slot j of the iteration asks for one instruction in language languages[j % len(languages)], trying up to
selfInstruct.maxTries times. The pool holds the seed instructions plus every instruction accepted so far
(in earlier iterations and in this one), so later slots see the model's own instructions as examples.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter

from .. import prompts
from ..data import load_seed_instructions
from ..text import count_words
from . import StageContext, StageError
from .common import Words, chunks, make_client, process_shards, work_totals

NAME = "self-instruct"


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def load_pool(ctx: StageContext) -> dict[str, list[str]]:
    """Seeds plus the instructions accepted in earlier iterations and in finished shards of this one."""
    cfg = ctx.config
    try:
        pool = {lang: [r["prompt"].strip() for r in load_seed_instructions(lang, cfg.self_instruct.seed_file)]
                for lang in cfg.languages}
    except ValueError as err:  # a bad seed file: say which setting points at it
        raise StageError(f"{NAME}: {err} (selfInstruct.seedFile)") from None
    for iteration in range(1, ctx.iteration + 1):
        art = ctx.artifacts(NAME, iteration)
        if iteration < ctx.iteration and not art.done():  # outputs count only once their stage is done
            raise StageError(f"{NAME} of iteration {ctx.iteration} needs {NAME} of iteration {iteration} to be done "
                             f"first")
        rows = art.read_outputs() if iteration < ctx.iteration else (r for r in art.iter_work() if r.get("instruction"))
        for row in rows:
            pool.setdefault(row["language"], []).append(row["instruction"])
    return pool


def run(ctx: StageContext) -> dict:
    return asyncio.run(_run(ctx))


async def _run(ctx: StageContext) -> dict:
    cfg = ctx.config
    si = cfg.self_instruct
    artifacts = ctx.artifacts(NAME)
    pool = load_pool(ctx)
    seen = {_normal(text) for texts in pool.values() for text in texts}
    total = si.instructions_per_iteration
    slots = ({"slot": j, "language": cfg.languages[j % len(cfg.languages)]} for j in range(total))
    judge_tokens = 8

    async with make_client(ctx, NAME) as client:

        async def handle(slot: dict) -> list[dict]:
            lang, j = slot["language"], slot["slot"]
            rejections: dict[str, int] = {}
            requests = 0

            def reject(reason: str) -> None:
                rejections[reason] = rejections.get(reason, 0) + 1

            for attempt in range(si.max_tries):
                rng = random.Random(ctx.seed(NAME, j, attempt))
                examples = rng.sample(pool[lang], k=min(si.few_shot, len(pool[lang])))
                gen = await client.chat(
                    cfg.models.generator, prompts.self_instruct_messages(lang, examples), cfg.sampling,
                    max_tokens=si.max_tokens, continue_final=True, seed=rng.getrandbits(31),
                )
                requests += 1
                instruction = prompts.parse_instruction(gen.text)
                words = count_words(instruction)
                if not instruction.strip():
                    reject("empty")
                    continue
                if not si.min_words < words < si.max_words:
                    reject("length")
                    continue
                key = _normal(instruction)
                if key in seen:
                    reject("duplicate")
                    continue
                seen.add(key)  # claimed before the judge's await, so a concurrent slot cannot take it too
                if si.judge:
                    verdict = await client.chat(
                        cfg.models.generator,
                        [{"role": "user", "content": prompts.render(lang, "judge", instruction=instruction)}],
                        cfg.sampling, max_tokens=judge_tokens, seed=rng.getrandbits(31),
                    )
                    requests += 1
                    if not prompts.parse_judgement(verdict.text):
                        seen.discard(key)
                        reject("judge")
                        continue
                pool[lang].append(instruction)
                return [{"id": f"i{ctx.iteration:02d}-{j:07d}", "slot": j, "language": lang,
                         "instruction": instruction, "words": words, "rejections": rejections,
                         "requests": requests}]
            return [{"id": None, "slot": j, "language": lang, "instruction": None, "rejections": rejections,
                     "requests": requests}]

        shards = chunks(slots, cfg.storage.shard_size)
        await process_shards(ctx, artifacts, shards, handle, total=total)

    words, by_language = Words(), Counter()

    def accepted():
        for r in artifacts.iter_work():
            if r["instruction"]:
                words.add(r["words"])
                by_language[r["language"]] += 1
                yield {k: r[k] for k in ("id", "language", "instruction", "words")}

    count = artifacts.write_outputs(accepted(), cfg.storage.shard_size)
    requests, rejected = work_totals(artifacts)
    return {
        "counts": {
            "requested": total,
            "accepted": count,
            "failed": total - count,
            "requests": requests,
            "rejected": rejected,
        },
        "averageWords": words.average,
        "byLanguage": {lang: by_language[lang] for lang in cfg.languages},
    }
