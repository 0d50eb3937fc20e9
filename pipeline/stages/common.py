"""What the generating stages share: sharded concurrent processing, the client, rejection tallies."""

from __future__ import annotations

import asyncio
import itertools
import os
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator

from ..artifacts import StageArtifacts
from ..inference import InferenceClient, InferenceError, RoutedClient
from ..text import check_response, count_words, drop_short_mask
from . import StageContext, StageError


def make_client(ctx: StageContext, salt: str) -> InferenceClient | RoutedClient:
    """The stage's inference client: one for its endpoint, or (ctx.model_endpoints) one per endpoint, routed by
    model name."""
    endpoint = ctx.endpoint or ctx.config.models.endpoint
    if not endpoint:
        raise StageError("no inference endpoint: set models.endpoint or let the local runner start a server")
    api_key = ctx.api_key
    if api_key is None and ctx.config.models.api_key_env:
        api_key = os.environ.get(ctx.config.models.api_key_env)

    def client(url: str, *part: str) -> InferenceClient:
        return InferenceClient(url, ctx.config.client, api_key=api_key, seed=ctx.seed("client", salt, *part),
                               observe=ctx.metrics.client_observer(ctx.config.name, salt), alive=ctx.endpoint_gone,
                               budget=True)

    default = client(endpoint)
    if not ctx.model_endpoints:
        return default
    by_url = {endpoint: default}
    for url in sorted(set(ctx.model_endpoints.values())):
        by_url.setdefault(url, client(url, url))
    return RoutedClient(default, {name: by_url[url] for name, url in ctx.model_endpoints.items()})


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
    items are done. Shards already in the store are skipped (resume). Shards run concurrently: the next one starts
    whenever fewer than twice the client's concurrency items are in flight, so a shard waiting on a few slow items
    does not starve the server, and at most a bounded number are open, so memory stays flat however many items
    there are. A fatal inference error stops the stage (finished shards stay)."""
    done_shards = artifacts.work_done()
    shard_size = ctx.config.storage.shard_size
    target = 2 * ctx.config.client.most_in_flight  # items in flight wanted
    max_open = 4 * max(2, -(-target // shard_size))  # shards open at most (finished rows wait for their shard)
    finished = 0
    in_flight = 0  # items started and not finished, over the open shards
    open_shards = 0
    changed = asyncio.Event()  # an item or a shard finished: the loop may start the next shard

    async def one_shard(index: int, items: list[dict]) -> None:
        nonlocal finished, in_flight, open_shards
        pending = len(items)

        async def one_item(item: dict) -> list[dict]:
            nonlocal in_flight, pending
            try:
                return await handle(item)
            finally:
                in_flight -= 1
                pending -= 1
                changed.set()

        try:
            if before_shard:
                before_shard(index)
            results = await asyncio.gather(*(one_item(item) for item in items))
            artifacts.write_work(index, [row for rows in results for row in rows])
            finished += len(items)
            ctx.tick(artifacts.stage, finished, total)
        finally:
            in_flight -= pending  # items never started (before_shard failed)
            open_shards -= 1
            changed.set()

    # Shards in flight only: a finished one leaves the set (its error, if any, is kept), so starting a shard costs
    # O(1) instead of a scan of every shard started so far (O(shards^2) over a stage of millions of items).
    tasks: set[asyncio.Task] = set()
    errors: list[BaseException] = []

    def settle(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())
            changed.set()

    try:
        for index, items in enumerate(shards):
            if index in done_shards:
                finished += len(items)
                continue
            while (in_flight >= target or open_shards >= max_open) and not errors:
                changed.clear()
                await changed.wait()
            if errors:
                raise errors[0]
            in_flight += len(items)
            open_shards += 1
            task = asyncio.create_task(one_shard(index, items))
            tasks.add(task)
            task.add_done_callback(settle)
        ctx.tick(artifacts.stage, finished, total)
        if not errors:
            await asyncio.gather(*tasks)
        if errors:
            raise errors[0]
    except InferenceError as err:
        raise StageError(f"stage {artifacts.stage} of iteration {ctx.iteration} stopped: {err}") from err
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*list(tasks), return_exceptions=True)


def tries_at_once(config, streams: int, tries: int) -> int:
    """How many of an item's tries to run at once. A try's seed is its own and no try reads another's output, so
    they need not wait for each other; one after another, a stage of few items leaves most of the client's slots
    idle while its slowest item retries (make demo: 8 items in 16 slots, up to 8 requests in a row). `streams`:
    the stage's items times their independent branches (samples, attempts). With at least as many streams as
    slots, one at a time: speculation would only take slots from other items."""
    slots = config.client.concurrency
    return max(1, min(tries, slots // max(1, min(streams, slots))))


async def first_passing(
    tries: int, at_once: int, run: Callable[[int], Awaitable], final: Callable[[object], bool]
) -> tuple[list, int]:
    """The results of tries 0, 1, ... of one item, up to and including the first that is `final` (passed, or ended
    the item), or all of them: the same list as running them one after another; and how many tries were started
    beyond it. Up to `at_once` run at a time; those beyond the final one are cancelled (their requests aborted) or,
    if done already, discarded."""
    results: list = []
    started: list[asyncio.Future] = []
    try:
        while len(results) < tries:
            while len(started) < tries and len(started) - len(results) < at_once:
                started.append(asyncio.ensure_future(run(len(started))))
            results.append(await started[len(results)])
            if final(results[-1]):
                break
    finally:
        rest = started[len(results):]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
    return results, len(started) - len(results)


def finalize_with_drop_short(
    ctx: StageContext, artifacts: StageArtifacts, accepted: Callable[[dict], bool], text_key: str
) -> tuple[int, int]:
    """Write the accepted work rows as outputs, after the seeded drop_short if enabled. Two streaming passes:
    lengths first, then rows, so memory holds only the lengths. Returns (accepted, kept)."""
    # 4 bytes a length (an array, not a list of int objects): the one thing held per item
    lengths = array("i", (count_words(r[text_key]) for r in artifacts.iter_work() if accepted(r)))
    if ctx.config.filters.drop_short and lengths:
        mask = drop_short_mask(lengths, ctx.seed(artifacts.stage, "drop-short"))
    else:
        mask = [True] * len(lengths)
    keep = iter(mask)
    rows = (r for r in artifacts.iter_work() if accepted(r) and next(keep))
    kept = artifacts.write_outputs(rows, ctx.config.storage.shard_size)
    return len(lengths), kept


def work_totals(artifacts: StageArtifacts) -> tuple[int, dict[str, int], int]:
    """Requests made, tries rejected per reason, and tries started beyond an item's final one (first_passing) over
    a stage's work rows, in one streamed pass."""
    requests, rejected, discarded = 0, Counter(), 0
    for row in artifacts.iter_work():
        requests += row.get("requests", 0)
        rejected.update(row.get("rejections", {}))
        discarded += row.get("triesDiscarded", 0)
    return requests, dict(rejected), discarded


class Words:
    """Count, sum and maximum of word counts, added one row at a time: a manifest's averages without holding the
    rows (a stage's memory stays flat however many items it has)."""

    def __init__(self) -> None:
        self.count = self.total = self.max = 0

    def add(self, words: int) -> None:
        self.count += 1
        self.total += words
        self.max = max(self.max, words)

    @property
    def average(self) -> float:
        return round(self.total / self.count, 2) if self.count else 0.0


def tally(rows: Iterable[dict]) -> Counter:
    total: Counter = Counter()
    for row in rows:
        total.update(row.get("rejections", {}))
    return total


def average(values: list[int]) -> float:
    return round(sum(values) / len(values), 2) if values else 0.0
