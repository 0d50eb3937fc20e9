"""Every request is budgeted against the server's context; a request that cannot fit, or that the server refuses
(HTTP 400), rejects its one item with a counted reason and the stage goes on (issue 17). The scripted chat server
is as strict as vLLM: 400 whenever prompt + max_tokens exceeds its context."""

import asyncio
import random

import pytest
from chat_server import ChatServer, Refused, count_tokens, prompt_tokens

from selflengthen.pipeline.config import Client, Sampling, parse_config
from selflengthen.pipeline.inference import ContextExceeded, InferenceClient, InferenceError, ItemRejected
from selflengthen.pipeline.report import build_report, render_markdown
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.store import LocalStore

FAST = Client(concurrency=4, request_timeout_seconds=5, max_attempts=2, backoff_seconds=0.01, deadline_seconds=5)
WORDS = ("river stone light morning garden letter window market winter music story bridge forest lantern harbor "
         "meadow valley candle thunder silver ocean mountain village orchard journey").split()


def prose(seed: int, words: int) -> str:
    """`words` words in sentences of ten, paragraphs of three sentences; deterministic in the seed."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(max(1, words // 10))]
    return "\n\n".join(" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3))


def run(coro):
    return asyncio.run(coro)


def test_max_tokens_is_cut_to_what_the_context_leaves():
    text = prose(1, 100)
    messages = [{"role": "user", "content": text}]
    with ChatServer(lambda body: prose(2, 400), context=400) as server:
        async def ask(budget: bool):
            async with InferenceClient(server.endpoint, FAST, budget=budget) as client:
                return await client.chat("generator", messages, Sampling(max_tokens=16384))

        with pytest.raises(ItemRejected, match="cannot be greater than max_model_len"):
            run(ask(budget=False))  # what the pipeline did before: the strict server refuses it
        gen = run(ask(budget=True))
        sent = server.bodies("generator")[-1]
    room = 400 - prompt_tokens(sent)
    assert sent["max_tokens"] == room > 0
    assert gen.finish_reason == "length" and gen.completion_tokens == room


def test_configured_max_tokens_wins_when_it_fits_without_asking_the_tokenizer_each_time():
    with ChatServer(lambda body: "Short.", context=4096) as server:
        async def ask():
            async with InferenceClient(server.endpoint, FAST, budget=True) as client:
                for _ in range(5):
                    await client.chat("generator", [{"role": "user", "content": "Write."}], Sampling(max_tokens=64))
        run(ask())
        assert [b["max_tokens"] for b in server.bodies("generator")] == [64] * 5
        # one count of the chat template's own tokens, then the safe bound decides
        assert sum(1 for r in server.requests if r["path"] == "/tokenize") == 1


def test_a_prompt_over_the_context_is_rejected_without_being_sent():
    with ChatServer(lambda body: "Never.", context=128) as server:
        async def ask():
            async with InferenceClient(server.endpoint, FAST, budget=True) as client:
                await client.chat("generator", [{"role": "user", "content": prose(3, 200)}], Sampling())
        with pytest.raises(ContextExceeded) as info:
            run(ask())
        assert info.value.reason == "context" and info.value.context == 128 and info.value.prompt_tokens > 128
        assert server.chats() == []


def test_a_lora_adapter_takes_its_base_models_context():
    async def contexts(cards):
        class Fixed(InferenceClient):
            async def get(self, path):
                return {"data": cards}
        async with Fixed("http://127.0.0.1:9/v1", FAST) as client:
            return [await client.context_length(m) for m in ("base", "generator", "other")]

    cards = [{"id": "base", "max_model_len": 2048}, {"id": "generator", "parent": "base"}]
    assert run(contexts(cards)) == [2048, 2048, 2048]
    assert run(contexts([{"id": "a"}])) == [None, None, None]  # an OpenAI-style list: no budget


def test_a_streak_of_refusals_is_a_configuration_error():
    def refuse(body):
        raise Refused("top_k must be -1 or at least 1")

    with ChatServer(refuse) as server:
        async def ask():
            async with InferenceClient(server.endpoint, FAST, budget=True) as client:
                for i in range(InferenceClient.REFUSED_STREAK_LIMIT):
                    try:
                        await client.chat("generator", [{"role": "user", "content": f"q{i}"}], Sampling())
                    except ItemRejected as err:
                        assert err.reason == "refused" and i < InferenceClient.REFUSED_STREAK_LIMIT - 1
        with pytest.raises(InferenceError, match="refused the last 50 requests") as info:
            run(ask())
        assert not isinstance(info.value, ItemRejected)


# -- stages -----------------------------------------------------------------------------------------------------


def stage_ctx(tmp_path, endpoint: str, **overrides) -> StageContext:
    config = parse_config({
        "name": "ctx", "iterations": 1, "seed": 7,
        "filters": {"enNgram": 0, "dropShort": False},
        "client": {"concurrency": 4, "deadlineSeconds": 10, "backoffSeconds": 0.01},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 4},
        **overrides,
    })
    return StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "store"), endpoint=endpoint)


def extender(body: dict) -> str:
    """Enriches what it is given 1.5x (the former part), or continues a forced prefix with as much again."""
    seed = body["seed"]
    user = body["messages"][0]["content"]
    answer = user.rsplit("Answer:\n", 1)[-1]
    if body.get("continue_final_message"):
        return "\n\n" + prose(seed, count_tokens(answer))
    return prose(seed, int(count_tokens(answer) * 1.5))


def test_extend_near_the_context_limit_runs_to_the_end_rejecting_what_cannot_fit(tmp_path):
    context = 1200
    with ChatServer(extender, context=context) as server:
        ctx = stage_ctx(tmp_path, server.endpoint, extend={"attempts": 1, "passes": 3, "maxRetries": 2})
        sizes = [40, 60, 90, 250, 400, 700, 1200, 1500]  # words; the last ones approach and pass the context
        rows = [{"id": f"r{i}", "instructionId": f"i{i}", "language": "en", "instruction": "Write about rivers.",
                 "response": prose(i, n), "words": n} for i, n in enumerate(sizes)]
        respond = ctx.artifacts("respond")
        respond.write_outputs(rows, 4)
        respond.finish({"counts": {"accepted": len(rows)}})
        manifest = run_stage("extend", ctx)
        chats = server.chats()
        assert server.refusals == []  # no request was ever over the context
        for r in chats:
            assert prompt_tokens(r["body"]) + r["body"]["max_tokens"] <= context

    counts = manifest["counts"]
    assert ctx.artifacts("extend").done()
    assert counts["rejected"]["context"] >= 3  # the largest texts: no room even for a first pass
    assert counts["contextLimited"] >= 3
    assert 0 < counts["accepted"] < len(sizes)
    extended = {r["responseId"]: r for r in ctx.artifacts("extend").read_outputs()}
    assert {"r0", "r1"} <= set(extended) and "r7" not in extended
    # an attempt that has no room from the start is not retried: no request was made for it
    assert not [r for r in chats if "Answer:\n" + rows[7]["response"] in r["body"]["messages"][0]["content"]]

    report = build_report(ctx.store, ctx.config, 1)
    assert report["contextRejected"] == {"extend": counts["rejected"]["context"]}
    assert "did not fit the server's context" in render_markdown(report)


def test_respond_rejects_a_refused_item_and_goes_on(tmp_path):
    def generator(body):
        if "forbidden" in body["messages"][0]["content"]:
            raise Refused("prompt rejected by the server's guard")
        return prose(body["seed"], 60)

    with ChatServer(generator) as server:
        ctx = stage_ctx(tmp_path, server.endpoint, respond={"samplesPerInstruction": 2, "maxRetries": 3})
        rows = [{"id": f"i{i}", "language": "en", "instruction": f"Write essay {i}" + (" forbidden" if i == 2 else ""),
                 "words": 3} for i in range(6)]
        si = ctx.artifacts("self-instruct")
        si.write_outputs(rows, 4)
        si.finish({"counts": {"accepted": len(rows)}})
        manifest = run_stage("respond", ctx)
        assert len(server.refusals) == 2  # one per sample of the refused item, never retried
    assert manifest["counts"]["rejected"] == {"refused": 2}
    assert manifest["counts"]["accepted"] == 10
    assert {r["instructionId"] for r in ctx.artifacts("respond").read_outputs()} == {"i0", "i1", "i3", "i4", "i5"}
