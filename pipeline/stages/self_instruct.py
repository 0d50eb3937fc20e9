"""Self-instruct: new instructions completed few-shot from a growing pool, judged, length-bounded, deduplicated.

Slot j of the iteration asks for one instruction in language languages[j % len(languages)], trying up to
selfInstruct.maxTries times. The pool holds the seed instructions plus every instruction accepted so far
(in earlier iterations and in this one), so later slots see the model's own instructions as examples; every
prompt shows at least one seed, so the pool cannot drift away from them.

The base model (served as BASE_MODEL_NAME) writes and judges the instructions in every iteration, as in the
reference. A completion stops at the label of the next item (a stop string) within selfInstruct.maxTokens, and the
instruction is kept whole, over several lines if it has them. Rejected, each with its reason counted: empty,
truncated (cut at maxTokens), length (word bounds), states-length ("in 300 words": its SFT answer would be 1.2x
longer and teach the Generator to ignore length demands), duplicate, near-duplicate (rapidfuzz ratio >=
selfInstruct.maxSimilarity to an instruction in the pool), judge, context, refused.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter

from .. import prompts
from ..config import BASE_MODEL_NAME
from ..data import load_seed_instructions
from ..dedup import NearDuplicates
from ..inference import ItemRejected
from ..longen import has_own_length
from ..text import count_words
from . import StageContext, StageError
from .common import Words, chunks, make_client, process_shards, work_totals

NAME = "self-instruct"


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def load_pool(ctx: StageContext) -> dict[str, list[str]]:
    """Seeds (first) plus the instructions accepted in earlier iterations and in finished shards of this one."""
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
    seeds = {lang: len(load_seed_instructions(lang, si.seed_file)) for lang in pool if lang in cfg.languages}
    seen = {_normal(text) for texts in pool.values() for text in texts}
    near = {lang: NearDuplicates(si.max_similarity, [_normal(text) for text in texts]) for lang, texts in pool.items()}
    total = si.instructions_per_iteration
    slots = ({"slot": j, "language": cfg.languages[j % len(cfg.languages)]} for j in range(total))
    judge_tokens = 8
    model = BASE_MODEL_NAME

    def few_shot(rng: random.Random, lang: str) -> list[str]:
        """selfInstruct.fewShot examples: one seed, the others from the whole pool, in a random order."""
        texts, n_seeds = pool[lang], seeds.get(lang, 0)
        k = min(si.few_shot, len(texts))
        if not n_seeds:
            return rng.sample(texts, k=k)
        first = rng.randrange(n_seeds)
        others = [i + (i >= first) for i in rng.sample(range(len(texts) - 1), k=k - 1)]
        picked = [texts[i] for i in [first, *others]]
        rng.shuffle(picked)
        return picked


    async with make_client(ctx, NAME) as client:

        async def handle(slot: dict) -> list[dict]:
            lang, j = slot["language"], slot["slot"]
            rejections: dict[str, int] = {}
            requests = 0

            def reject(reason: str) -> None:
                rejections[reason] = rejections.get(reason, 0) + 1

            for attempt in range(si.max_tries):
                rng = random.Random(ctx.seed(NAME, j, attempt))
                examples = few_shot(rng, lang)
                sampling = cfg.sampling.model_copy(
                    update={"stop": [*cfg.sampling.stop, *prompts.instruction_stops(lang, len(examples))]})
                requests += 1
                try:
                    gen = await client.chat(
                        model, prompts.self_instruct_messages(lang, examples), sampling,
                        max_tokens=si.max_tokens, continue_final=True, seed=rng.getrandbits(31),
                    )
                except ItemRejected as err:  # e.g. long examples over the context: other examples next try
                    reject(err.reason)
                    continue
                instruction = prompts.parse_instruction(gen.text)
                words = count_words(instruction)
                if not instruction.strip():
                    reject("empty")
                    continue
                if gen.finish_reason == "length" and not prompts.lists_next_item(gen.text):
                    reject("truncated")  # cut at maxTokens before the next item: not a whole instruction
                    continue
                if not si.min_words < words < si.max_words:
                    reject("length")
                    continue
                if has_own_length(instruction):
                    reject("states-length")
                    continue
                key = _normal(instruction)
                if key in seen:
                    reject("duplicate")
                    continue
                if si.max_similarity < 1 and near[lang].find(key) is not None:
                    reject("near-duplicate")
                    continue
                # claimed before the judge's await, so a concurrent slot cannot take it too
                seen.add(key)
                near[lang].add(key)
                if si.judge:
                    requests += 1
                    try:
                        verdict = await client.chat(
                            model,
                            [{"role": "user", "content": prompts.render(lang, "judge", instruction=instruction)}],
                            cfg.sampling, max_tokens=judge_tokens, seed=rng.getrandbits(31),
                        )
                    except ItemRejected as err:
                        verdict = None
                        reject(err.reason)
                    if verdict is None or not prompts.parse_judgement(verdict.text):
                        seen.discard(key)
                        near[lang].remove(key)
                        if verdict is not None:
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
    requests, rejected, _ = work_totals(artifacts)
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
