"""Collect, the method's optional last step (docs/method.md): (instruction, long response) pairs from every
iteration and from the final models, each instruction given a length demand that its response meets, exported as
SFT data (the length-following stage trains on it).

Run once, after the last iteration (`selflengthen stage collect --iteration N`, N = iterations): the Generator of
iteration N answers collect.items instructions (the last iteration's self-instruct outputs, or the seeds), each
answer retried until it passes the response checks and, with collect.extend, extended once by the Extender (one
micro-iteration of the extend stage). Each kept answer of W words gets a demand of one of collect.demandTypes,
its numbers derived from W so that it holds (longen.true_demand), phrased by a seeded pick among the templates in
prompts/<lang>/length_demands.txt, and checked by parsing it back (longen.parse_length_demand).

With collect.fromIterations (default) the pairs each iteration already made join them, as the reference collects
them: every kept extend row of iterations 1..N gives two, (instruction, initial answer) and (instruction, extended
answer), each with its own true demand (no request is made for them; `source` says where a row comes from).

Layout: <run>/collect/work/part-*.jsonl (resume), <run>/collect/part-*.jsonl (rows {id, language, messages:
[user, assistant], demand, words, extended, source}: the messages format of build-sft), manifest.json, _SUCCESS.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

from .. import prompts
from ..data import load_seed_instructions
from ..inference import ItemRejected
from ..longen import LengthDemand, has_own_length, parse_length_demand, true_demand
from ..text import count_words
from . import StageContext, StageError
from .common import average, chunks, make_client, process_shards, reject_reason, tally
from .extend import first_half, kept_part

NAME = "collect"
REQUIRES = ("train-generator", "train-extender")
def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def phrase_demand(ctx: StageContext, item_id: str, lang: str, instruction: str,
                  demand: LengthDemand) -> str | None:
    """The instruction with the demand written in, in a seeded pick of the language's phrasings; the first one
    (from the pick on) that parses back to exactly this demand, so nothing in the instruction can change what it
    says. None when none does."""
    templates = prompts.length_demands(lang).get(demand.kind) or ()
    start = ctx.seed(NAME, item_id, "phrasing") % max(1, len(templates))
    values = {"instruction": instruction.strip(), "n": _number(demand.low),
              "m": _number(demand.high) if demand.high is not None else ""}
    for i in range(len(templates)):
        text = templates[(start + i) % len(templates)].substitute(values)
        if parse_length_demand(text) == demand:
            return text
    return None


def instruction_pool(ctx: StageContext, lang: str) -> list[str]:
    """The instructions of a language to answer, in a seeded order: the last iteration's self-instruct outputs
    (collect.source self-instruct) or, where there are none, the seeds. Instructions that already demand a
    length are left out: the added demand must be the only one."""
    cfg = ctx.config
    texts: list[str] = []
    if cfg.collect.source == "self-instruct" and ctx.artifacts("self-instruct").done():
        texts = [r["instruction"] for r in ctx.artifacts("self-instruct").read_outputs() if r["language"] == lang]
    if not texts:
        try:
            texts = [r["prompt"] for r in load_seed_instructions(lang, cfg.self_instruct.seed_file)]
        except ValueError as err:
            raise StageError(f"{NAME}: {err} (selfInstruct.seedFile)") from None
    unique = dict.fromkeys(t.strip() for t in texts if t.strip() and not has_own_length(t))
    return sorted(unique, key=lambda t: ctx.seed(NAME, "order", lang, t))


def with_demand(ctx: StageContext, item_id: str, lang: str, instruction: str, text: str) -> dict | None:
    """The SFT row of (instruction, text) with a true length demand of a seeded kind written into the instruction;
    None when the text is too short for one or no phrasing says it exactly."""
    col = ctx.config.collect
    words = count_words(text)
    if words < col.min_words:
        return None
    kind = col.demand_types[ctx.seed(NAME, item_id, "type") % len(col.demand_types)]
    demand = true_demand(words, kind)
    user = phrase_demand(ctx, item_id, lang, instruction, demand)
    if user is None:
        return None
    return {"id": item_id, "language": lang, "messages": [{"role": "user", "content": user},
                                                          {"role": "assistant", "content": text}],
            "demand": {"type": demand.kind, "low": demand.low, "high": demand.high}, "words": words}


def iteration_pairs(ctx: StageContext, tally_: Counter) -> Iterator[dict]:
    """The (instruction, initial) and (instruction, extended) pairs of every iteration's kept extend rows, with
    true demands, in the collect languages; instructions that demand a length of their own are left out.
    tally_ counts the candidates and why some were left out."""
    cfg = ctx.config
    languages = set(cfg.collect.languages or cfg.languages)
    for k in range(1, cfg.iterations + 1):
        extend = ctx.artifacts("extend", iteration=k)
        if not extend.done():
            continue
        for row in extend.read_outputs():
            lang = row.get("language")
            if lang not in languages:
                continue
            for which, text, extended in (("initial", row["initial"], False), ("extended", row["extended"], True)):
                tally_["candidates"] += 1
                if has_own_length(row["instruction"]):
                    tally_["own-length"] += 1
                    continue
                out = with_demand(ctx, f"i{k:02d}-{row['id']}-{which}", lang, row["instruction"], text.strip())
                if out is None:
                    tally_["short-or-demand"] += 1
                    continue
                yield {**out, "extended": extended, "source": f"iteration-{k}"}


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    if not cfg.collect.enabled:
        return {"enabled": False, "counts": {"requested": 0, "accepted": 0}}
    if ctx.iteration != cfg.iterations:
        raise StageError(f"stage {NAME} runs after the last iteration: --iteration {cfg.iterations} wanted, "
                         f"not {ctx.iteration}")
    return asyncio.run(_run(ctx))


async def _run(ctx: StageContext) -> dict:
    cfg = ctx.config
    col, ext = cfg.collect, cfg.extend
    artifacts = ctx.artifacts(NAME)
    languages = col.languages or cfg.languages
    pools = {lang: instruction_pool(ctx, lang) for lang in languages}
    empty = [lang for lang, pool in pools.items() if not pool]
    if empty:
        raise StageError(f"stage {NAME}: no instructions without a length demand in {', '.join(empty)} "
                         f"(collect.languages, selfInstruct.seedFile)")
    slots = []
    for j in range(col.items):
        lang = languages[j % len(languages)]
        pool = pools[lang]
        slots.append({"id": f"c{j:07d}", "language": lang, "instruction": pool[(j // len(languages)) % len(pool)]})

    async with make_client(ctx, NAME) as client:

        async def extend_once(item: dict, text: str, reject) -> tuple[str | None, int]:
            """One micro-iteration of the extend stage: the enriched first half, continued to the end. Returns
            (the longer text or None, requests made)."""
            lang, instruction, seed = item["language"], item["instruction"], ctx.seed(NAME, item["id"], "extend")
            try:
                former = await client.chat(
                    cfg.models.extender,
                    [{"role": "user", "content": prompts.render(lang, "extend", instruction=instruction,
                                                                response=first_half(text))}],
                    cfg.sampling, max_tokens=ext.max_tokens, seed=seed)
            except ItemRejected as err:
                reject(f"extend-{err.reason}")
                return None, 1
            prefix = kept_part(former.text, ext.keep_fraction)
            if not prefix:
                reject("extend-empty")
                return None, 1
            try:
                latter = await client.chat(
                    cfg.models.extender,
                    [{"role": "user", "content": prompts.render(lang, "extend", instruction=instruction,
                                                                response=text)},
                     {"role": "assistant", "content": prefix}],
                    cfg.sampling, max_tokens=ext.max_tokens, continue_final=True, seed=seed + 1)
            except ItemRejected as err:
                reject(f"extend-{err.reason}")
                return None, 2
            candidate = (prefix + latter.text).strip()
            reason = reject_reason(ctx, candidate)
            if reason is None and count_words(candidate) <= count_words(text):
                reason = "no-growth"
            if reason:
                reject(f"extend-{reason}")
                return None, 2
            return candidate, 2

        async def handle(item: dict) -> list[dict]:
            rejections: dict[str, int] = {}
            requests = 0

            def reject(reason: str) -> None:
                rejections[reason] = rejections.get(reason, 0) + 1

            def failed() -> list[dict]:
                return [{"id": None, "slotId": item["id"], "rejections": rejections, "requests": requests}]

            response = None
            for attempt in range(col.max_retries):
                requests += 1
                try:
                    gen = await client.chat(
                        cfg.models.generator, [{"role": "user", "content": item["instruction"]}], cfg.sampling,
                        max_tokens=col.max_tokens, seed=ctx.seed(NAME, item["id"], attempt))
                except ItemRejected as err:  # the same prompt would be refused again
                    reject(err.reason)
                    return failed()
                reason = reject_reason(ctx, gen.text)
                if reason is None:
                    response = gen.text.strip()
                    break
                reject(reason)
            if response is None:
                return failed()
            initial_words = count_words(response)
            extended = None
            if col.extend:
                extended, made = await extend_once(item, response, reject)
                requests += made
            text = extended or response
            words = count_words(text)
            if words < col.min_words:
                reject("short")
                return failed()
            kind = col.demand_types[ctx.seed(NAME, item["id"], "type") % len(col.demand_types)]
            demand = true_demand(words, kind)
            user = phrase_demand(ctx, item["id"], item["language"], item["instruction"], demand)
            if user is None:
                reject("demand")
                return failed()
            return [{"id": item["id"], "language": item["language"], "instruction": item["instruction"],
                     "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": text}],
                     "demand": {"type": demand.kind, "low": demand.low, "high": demand.high},
                     "words": words, "initialWords": initial_words, "extended": extended is not None,
                     "rejections": rejections, "requests": requests}]

        await process_shards(ctx, artifacts, chunks(slots, cfg.storage.shard_size), handle, total=len(slots))

    keys = ("id", "language", "messages", "demand", "words", "extended", "source")
    work = list(artifacts.iter_work())
    kept = [{**r, "source": "final"} for r in work if r["id"]]
    from_iterations: Counter = Counter()
    earlier = list(iteration_pairs(ctx, from_iterations)) if col.from_iterations else []
    everything = kept + earlier
    accepted = artifacts.write_outputs(({k: r[k] for k in keys} for r in everything), cfg.storage.shard_size)
    return {
        "enabled": True,
        "models": {"generator": cfg.models.generator, "extender": cfg.models.extender if col.extend else None},
        "counts": {
            "requested": len(slots) + from_iterations["candidates"],
            "accepted": accepted,
            "failed": len(slots) - len(kept),
            "extended": sum(1 for r in everything if r["extended"]),
            "requests": sum(r["requests"] for r in work),
            "rejected": dict(tally(work)),
            "final": len(kept),
            "fromIterations": len(earlier),
            "iterationsLeftOut": {k: v for k, v in from_iterations.items() if k != "candidates"},
        },
        "bySource": dict(Counter(r["source"] for r in everything)),
        "byType": dict(Counter(r["demand"]["type"] for r in everything)),
        "byLanguage": dict(Counter(r["language"] for r in everything)),
        "averageWordsInitial": average([r["initialWords"] for r in kept]),
        "averageWords": average([r["words"] for r in everything]),
        "maxWords": max((r["words"] for r in everything), default=0),
        "output": f"{artifacts.prefix}/",
    }
