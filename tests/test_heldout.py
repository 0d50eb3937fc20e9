"""The held-out measurement runs beside a stage's own requests (pipeline/heldout.py): its answers share the batch
with the stage's instead of a second round of decoding after it, and a failing stage cancels it. From iteration 2
on, respond carries the previous evaluate's answers over (the same Generator, the same prompts and cap)."""

from __future__ import annotations

import asyncio

import pytest
from chat_server import ChatServer

from selflengthen.pipeline.config import parse_config
from selflengthen.pipeline.data import load_heldout
from selflengthen.pipeline.heldout import measure_heldout_alongside
from selflengthen.pipeline.inference import Generation
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.store import LocalStore


class RecordingClient:
    """Answers every chat after `release` is set; records the prompts asked, in order, and how many were in flight
    at most (the stage's requests and the held-out ones on one client, as in respond and evaluate)."""

    def __init__(self):
        self.release = asyncio.Event()
        self.asked: list[str] = []
        self.in_flight = self.most_in_flight = 0

    async def chat(self, model, messages, sampling, *, max_tokens=None, seed=None):
        self.asked.append(messages[-1]["content"])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return Generation(text="one two three four", finish_reason="stop", completion_tokens=4)


def config(items: int):
    return parse_config({"name": "h", "languages": ["en"], "evaluate": {"heldoutItems": items}})


def test_heldout_prompts_are_asked_while_the_stage_still_waits_for_its_own():
    async def scenario():
        client = RecordingClient()

        async def stage_work():  # the stage's request, answered only once every held-out prompt is in flight
            asking = asyncio.ensure_future(client.chat("generator", [{"role": "user", "content": "item"}], None))
            while client.in_flight < 4:
                await asyncio.sleep(0)
            client.release.set()
            return await asking

        heldout = await asyncio.wait_for(measure_heldout_alongside(stage_work(), config(3), client), timeout=10)
        return client, heldout

    client, heldout = asyncio.run(scenario())
    assert client.most_in_flight == 4  # 1 stage request + 3 held-out prompts at once, not one round after the other
    assert client.asked.count("item") == 1 and len(client.asked) == 4
    assert heldout["items"] == 3 and heldout["averageWords"] == 4.0


def test_a_failing_stage_cancels_the_heldout_requests_and_raises_its_own_error():
    class StageFailed(RuntimeError):
        pass

    async def scenario():
        client = RecordingClient()  # never released: the held-out requests would wait for ever

        async def stage_work():
            while client.in_flight < 2:
                await asyncio.sleep(0)
            raise StageFailed("shard 3 could not be written")

        with pytest.raises(StageFailed, match="shard 3"):  # the stage's own error, not an ExceptionGroup
            await asyncio.wait_for(measure_heldout_alongside(stage_work(), config(2), client), timeout=10)
        await asyncio.sleep(0)
        return client

    assert asyncio.run(scenario()).in_flight == 0  # both held-out requests were cancelled


def test_without_heldout_prompts_only_the_stage_runs():
    async def scenario():
        client = RecordingClient()
        ran = []

        async def stage_work():
            ran.append(True)

        return await measure_heldout_alongside(stage_work(), config(0), client), ran, client.asked

    heldout, ran, asked = asyncio.run(scenario())
    assert heldout is None and ran == [True] and asked == []


# -- carried over: respond in iteration k takes the answers evaluate got in iteration k-1 --------------------------


def run_evaluate_then_respond(tmp_path, evaluate_cap: int, respond_cap: int) -> tuple[dict, dict, list[str]]:
    """evaluate of iteration 1 (held-out cap `evaluate_cap`), then respond of iteration 2 (cap `respond_cap`) on the
    strict scripted server; returns both manifests and the prompts iteration 2's respond asked."""
    prompts = {row["prompt"] for row in load_heldout(["en"])}
    with ChatServer(lambda body: f"Answer {body['seed'] % 97} has words. It ends here.") as server:
        def ctx(iteration: int, cap: int) -> StageContext:
            config = parse_config({
                "name": "carry", "iterations": 2, "seed": 3, "languages": ["en"],
                "respond": {"samplesPerInstruction": 1},
                "filters": {"enNgram": 0, "dropShort": False, "checkMeta": False},
                "evaluate": {"heldoutItems": 3, "heldoutMaxTokens": cap, "items": 1, "languages": ["en"],
                             "longbenchWrite": {"enabled": False}, "ruler": {"enabled": False}},
                "storage": {"uri": f"file://{tmp_path}/store"}})
            return StageContext(config=config, iteration=iteration, store=LocalStore(tmp_path / "store"),
                                endpoint=server.endpoint)

        first, second = ctx(1, evaluate_cap), ctx(2, respond_cap)
        first.artifacts("train-generator").finish({"counts": {}})
        evaluate = run_stage("evaluate", first)
        upstream = second.artifacts("self-instruct")
        upstream.write_outputs([{"id": "i0", "language": "en", "instruction": "Describe a river."}], 4)
        upstream.finish({"counts": {"accepted": 1}})
        asked_before = len(server.requests)
        respond = run_stage("respond", second)
        asked = [r["body"]["messages"][-1]["content"] for r in server.requests[asked_before:]]
    return evaluate, respond, [p for p in asked if p in prompts]


def test_respond_carries_the_previous_evaluates_heldout_answers_over_instead_of_asking_again(tmp_path):
    evaluate, respond, asked = run_evaluate_then_respond(tmp_path, 64, 64)
    assert asked == []  # the Generator trained in iteration 1 is not asked the held-out prompts a second time
    assert evaluate["heldout"]["items"] == 3 and evaluate["heldout"]["maxTokens"] == 64
    assert respond["heldout"] == {**evaluate["heldout"], "carriedFrom": "iteration 1 evaluate"}
    assert respond["counts"]["accepted"] == 1  # the stage's own work ran


def test_respond_asks_again_when_the_previous_evaluate_answered_with_another_cap(tmp_path):
    evaluate, respond, asked = run_evaluate_then_respond(tmp_path, 64, 48)
    assert len(asked) == 3 and "carriedFrom" not in respond["heldout"]
    assert respond["heldout"]["maxTokens"] == 48 and evaluate["heldout"]["maxTokens"] == 64
