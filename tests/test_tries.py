"""An item's tries run side by side when the stage leaves the client's slots idle (pipeline/stages/common.py:
first_passing, tries_at_once): the same rows as one try after another, at the latency of one try instead of a chain
of them. Respond and extend on the strict scripted chat server, with few items (tries at once) and many (one at a
time)."""

from __future__ import annotations

import asyncio
import random

import pytest
from chat_server import ChatServer, count_tokens

from selflengthen.pipeline.config import parse_config
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.stages.common import first_passing, tries_at_once
from selflengthen.pipeline.store import LocalStore

WORDS = "river stone light morning garden letter window market winter music story bridge forest lantern".split()


def prose(seed: int, words: int) -> str:
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(max(1, words // 10))]
    return "\n\n".join(" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3))


# -- first_passing ----------------------------------------------------------------------------------------------


def test_tries_run_at_once_and_the_results_are_those_of_one_after_another():
    async def scenario(at_once: int):
        running = most = 0
        cancelled: list[int] = []

        async def run(k: int) -> int:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                await asyncio.sleep(0.01 * (4 - k))  # later tries finish first: the order must not follow them
                return k
            except asyncio.CancelledError:
                cancelled.append(k)
                raise
            finally:
                running -= 1

        results, discarded = await first_passing(4, at_once, run, lambda k: k == 1)
        return results, discarded, most, cancelled

    assert asyncio.run(scenario(1)) == ([0, 1], 0, 1, [])
    results, discarded, most, cancelled = asyncio.run(scenario(3))
    # tries 2 and 3 started as 0 and 1 left the three slots; cancelled at try 1, or discarded if already done
    assert results == [0, 1] and most == 3 and discarded == 2 and set(cancelled) <= {2, 3}


def test_no_final_try_gives_every_result_and_an_error_stops_the_rest():
    async def all_tries():
        return await first_passing(3, 2, lambda k: asyncio.sleep(0, k), lambda k: False)

    assert asyncio.run(all_tries()) == ([0, 1, 2], 0)

    async def failing():
        left_running: list[asyncio.Task] = []

        async def run(k: int):
            if k == 0:
                await asyncio.sleep(0.01)
                raise RuntimeError("server gone")
            left_running.append(asyncio.current_task())
            await asyncio.sleep(30)

        with pytest.raises(RuntimeError, match="server gone"):
            await first_passing(3, 3, run, lambda k: False)
        return left_running

    assert all(t.done() for t in asyncio.run(failing()))


def test_tries_at_once_only_fills_slots_the_items_leave_idle():
    config = parse_config({"name": "t", "client": {"concurrency": 16}})
    assert tries_at_once(config, streams=8, tries=2) == 2  # make demo's extend: 8 items, 16 slots
    assert tries_at_once(config, streams=5, tries=2) == 2
    assert tries_at_once(config, streams=5, tries=5) == 3
    assert tries_at_once(config, streams=10, tries=2) == 1  # 20 would queue behind other items' first tries
    assert tries_at_once(config, streams=10_000, tries=3) == 1  # a cluster run: one at a time, nothing wasted
    assert tries_at_once(config, streams=0, tries=3) == 3


# -- the stages -------------------------------------------------------------------------------------------------


def generator(body: dict) -> str:
    """An answer that ends mid-sentence for five seeds in six (rejected as 'ending'), whole otherwise."""
    text = prose(body["seed"], 60)
    return text.rstrip(".") + " and then" if body["seed"] % 6 else text


def extender(body: dict) -> str:
    """Enriches the first half 1.5x; continues a forced prefix with as much again, or (odd seeds) with nothing."""
    answer = body["messages"][0]["content"].rsplit("Answer:\n", 1)[-1]
    if body.get("continue_final_message"):
        return "" if body["seed"] % 2 else "\n\n" + prose(body["seed"], count_tokens(answer))
    return prose(body["seed"], int(count_tokens(answer) * 1.5))


def stage_ctx(tmp_path, endpoint: str, concurrency: int) -> StageContext:
    config = parse_config({
        "name": "tries", "iterations": 1, "seed": 5,
        "filters": {"enNgram": 0, "dropShort": False, "checkMeta": False},
        "respond": {"maxRetries": 3},
        "extend": {"attempts": 1, "passes": 2, "maxRetries": 3},
        "client": {"concurrency": concurrency, "deadlineSeconds": 10, "backoffSeconds": 0.01},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 4},
    })
    return StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "store"), endpoint=endpoint)


def run_respond_and_extend(tmp_path, concurrency: int) -> tuple[dict, dict, list[dict], list[dict]]:
    with ChatServer(lambda body: extender(body) if body["model"] == "extender" else generator(body)) as server:
        ctx = stage_ctx(tmp_path, server.endpoint, concurrency)
        instructions = [{"id": f"i{i}", "language": "en", "instruction": f"Describe river number {i}."}
                        for i in range(8)]
        upstream = ctx.artifacts("self-instruct")
        upstream.write_outputs(instructions, 4)
        upstream.finish({"counts": {"accepted": len(instructions)}})
        respond, extend = run_stage("respond", ctx), run_stage("extend", ctx)
        rows = [list(ctx.artifacts(stage).iter_work()) for stage in ("respond", "extend")]
    return respond, extend, *rows


def without(rows: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != key} for row in rows]


def test_respond_and_extend_keep_the_same_rows_with_tries_at_once(tmp_path):
    # 8 items: with 4 slots one try at a time; with 32 slots the three tries of an item at once.
    one_by_one = run_respond_and_extend(tmp_path / "one", 4)
    at_once = run_respond_and_extend(tmp_path / "at-once", 32)
    for serial, parallel in zip(one_by_one[2:], at_once[2:], strict=True):
        assert without(parallel, "triesDiscarded") == serial
        assert all("triesDiscarded" not in row for row in serial)
    for serial, parallel in zip(one_by_one[:2], at_once[:2], strict=True):
        assert serial["counts"]["triesDiscarded"] == 0
        assert {**parallel["counts"], "triesDiscarded": 0} == serial["counts"]
    respond, extend = at_once[:2]
    # the scripts reject some tries and pass others: some items passed before their last try, beside which the
    # later ones had started and were discarded (their requests are not counted as made by the row)
    assert respond["counts"]["rejected"]["ending"] > 0 and 0 < respond["counts"]["accepted"] < 16  # 2 samples each
    assert respond["counts"]["triesDiscarded"] > 0
    assert extend["counts"]["rejected"].get("no-growth", 0) > 0 and extend["counts"]["accepted"] > 0
    assert extend["counts"]["triesDiscarded"] > 0
