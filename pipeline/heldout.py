"""The Generator's own answer length on a fixed held-out prompt set (pipeline/data/heldout.jsonl: prompts no stage
trains on), measured before and after each iteration's training: `respond` asks the Generator it is given (the
previous iteration's, or the base model in iteration 1) and `evaluate` asks the one trained in this iteration.

Each prompt is asked once with a seed that depends on the run seed and the prompt only, not on the iteration, so
the two measurements differ by the model alone. "Before iteration k+1" is "after iteration k": respond then carries
evaluate's answers over (carried_over) rather than asking the same model the same prompts again, whose answers
would differ by batching alone. The result goes into the stage's manifest (no rows: these answers are never
training data) and from there into the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable

from .data import load_heldout
from .inference import InferenceClient
from .text import count_words


def heldout_prompts(config) -> list[dict]:
    """The first evaluate.heldoutItems held-out prompts in the run's languages."""
    return load_heldout(config.languages)[: config.evaluate.heldout_items]


def heldout_cap(config) -> int:
    """The held-out answers' token cap: evaluate.heldoutMaxTokens, else sampling.maxTokens."""
    return config.evaluate.heldout_max_tokens or config.sampling.max_tokens


def heldout_seed(config, prompt_id: str) -> int:
    text = f"{config.seed}/heldout/{prompt_id}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


async def measure_heldout(config, client: InferenceClient) -> dict | None:
    """Ask the Generator every held-out prompt; the words of its answers (None when heldoutItems is 0)."""
    prompts = heldout_prompts(config)
    if not prompts:
        return None
    cap = heldout_cap(config)

    async def ask(row: dict) -> dict:
        gen = await client.chat(config.models.generator, [{"role": "user", "content": row["prompt"]}],
                                config.sampling, max_tokens=cap,
                                seed=heldout_seed(config, row["id"]))
        text = gen.text.strip()
        return {"id": row["id"], "words": count_words(text), "truncated": gen.finish_reason == "length",
                "start": text[:160]}

    answers = await asyncio.gather(*(ask(row) for row in prompts))
    words = [a["words"] for a in answers]
    return {"model": config.models.generator, "items": len(answers), "averageWords": round(sum(words) / len(words), 1),
            "maxWords": max(words), "truncated": sum(a["truncated"] for a in answers), "maxTokens": cap,
            "answers": answers}


def carried_over(ctx) -> dict | None:
    """The held-out answers of the previous iteration's evaluate, when they are this respond's measurement: respond
    in iteration k serves the Generator trained in iteration k-1, the one that evaluate asked, so with the same
    prompts and the same cap they are the same measurement. None in iteration 1, without that evaluate (disabled,
    or a run from before `maxTokens` was recorded), or when the prompts or the cap differ."""
    if ctx.iteration < 2:
        return None
    previous = ctx.artifacts("evaluate", ctx.iteration - 1)
    if not previous.done():
        return None
    heldout = previous.manifest().get("heldout")
    config = ctx.config
    if not heldout or heldout.get("maxTokens") != heldout_cap(config) \
            or [a["id"] for a in heldout["answers"]] != [row["id"] for row in heldout_prompts(config)]:
        return None
    return {**heldout, "carriedFrom": f"iteration {ctx.iteration - 1} evaluate"}


async def measure_heldout_alongside(work: Awaitable, config, client: InferenceClient,
                                    known: dict | None = None) -> dict | None:
    """measure_heldout together with `work`, the stage's own requests on the same client: the held-out answers
    take batch slots the stage leaves idle (its items are few, or retried one after another) instead of a second
    round of decoding after it. If `work` fails, the held-out requests are cancelled and its error raised. With
    `known` (answers carried over, see carried_over) only `work` runs and `known` is the measurement."""
    if known is not None:
        await work
        return known
    heldout = asyncio.ensure_future(measure_heldout(config, client))
    try:
        await work
    except BaseException:
        heldout.cancel()
        with contextlib.suppress(BaseException):
            await heldout
        raise
    return await heldout
