"""What the generating stages share: sharded concurrent processing, the client, rejection tallies."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator

from ..artifacts import StageArtifacts
from ..inference import InferenceClient, InferenceError
from ..text import check_response, count_words, drop_short_mask
from . import StageContext, StageError


def make_client(ctx: StageContext, salt: str) -> InferenceClient:
    endpoint = ctx.endpoint or ctx.config.models.endpoint
    if not endpoint:
        raise StageError("no inference endpoint: set models.endpoint or let the local runner start a server")
    api_key = ctx.api_key
    if api_key is None and ctx.config.models.api_key_env:
        api_key = os.environ.get(ctx.config.models.api_key_env)
    return InferenceClient(endpoint, ctx.config.client, api_key=api_key, seed=ctx.seed("client", salt),
                           observe=ctx.metrics.client_observer(ctx.config.name, salt), alive=ctx.endpoint_gone)


def chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def reject_reason(ctx: StageContext, text: str) -> str | None:
    """The configured response checks; None when the text passes."""
    f = ctx.config.filters
    reason = check_response(text, check_ending=f.check_ending, check_meta=f.check_meta, en_ngram=f.en_ngram,
                            zh_ngram=f.zh_ngram)
    if reason is None and count_words(text) < f.min_words:
        return "length"
    return reason


async def process_shards(
    ctx: StageContext,
    artifacts: StageArtifacts,
    shards: Iterable[list[dict]],
    handle: Callable[[dict], Awaitable[list[dict]]],
    *,
    total: int,
    before_shard: Callable[[int], None] | None = None,
) -> None:
    """Run `handle` on every item of every input shard not yet done; write each work shard when all of its
    items are done. Shards already in the store are skipped (resume). Shards run concurrently, a bounded number
    at a time so that memory stays flat however many items there are. A fatal inference error stops the stage
    (finished shards stay)."""
    done_shards = artifacts.work_done()
    window = max(2, -(-2 * ctx.config.client.concurrency // ctx.config.storage.shard_size))
    slots = asyncio.Semaphore(window)
    finished = 0

    async def one_shard(index: int, items: list[dict]) -> None:
        nonlocal finished
        try:
            if before_shard:
                before_shard(index)
            results = await asyncio.gather(*(handle(item) for item in items))
            artifacts.write_work(index, [row for rows in results for row in rows])
            finished += len(items)
            ctx.tick(artifacts.stage, finished, total)
        finally:
            slots.release()

    tasks: list[asyncio.Task] = []
    try:
        for index, items in enumerate(shards):
            if index in done_shards:
                finished += len(items)
                continue
            await slots.acquire()
            failed = [t for t in tasks if t.done() and t.exception()]
            if failed:
                raise failed[0].exception()
            tasks.append(asyncio.create_task(one_shard(index, items)))
        ctx.tick(artifacts.stage, finished, total)
        await asyncio.gather(*tasks)
    except InferenceError as err:
        raise StageError(f"stage {artifacts.stage} of iteration {ctx.iteration} stopped: {err}") from err
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def finalize_with_drop_short(
    ctx: StageContext, artifacts: StageArtifacts, accepted: Callable[[dict], bool], text_key: str
) -> tuple[int, int]:
    """Write the accepted work rows as outputs, after the seeded drop_short if enabled. Two streaming passes:
    lengths first, then rows, so memory holds only the lengths. Returns (accepted, kept)."""
    lengths = [count_words(r[text_key]) for r in artifacts.iter_work() if accepted(r)]
    if ctx.config.filters.drop_short and lengths:
        mask = drop_short_mask(lengths, ctx.seed(artifacts.stage, "drop-short"))
    else:
        mask = [True] * len(lengths)
    keep = iter(mask)
    rows = (r for r in artifacts.iter_work() if accepted(r) and next(keep))
    kept = artifacts.write_outputs(rows, ctx.config.storage.shard_size)
    return len(lengths), kept


def tally(rows: Iterable[dict]) -> Counter:
    total: Counter = Counter()
    for row in rows:
        total.update(row.get("rejections", {}))
    return total


def average(values: list[int]) -> float:
    return round(sum(values) / len(values), 2) if values else 0.0
