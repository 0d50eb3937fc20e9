"""The collect stage: length demands that are true of the response they are attached to (every type, every
phrasing, English and Chinese), and the stage end to end against a deterministic local chat server."""

from __future__ import annotations

import hashlib
import random

import pytest
from chat_server import ChatServer

from selflengthen.pipeline import prompts
from selflengthen.pipeline.config import parse_config
from selflengthen.pipeline.data import load_seed_instructions
from selflengthen.pipeline.longen import (
    KINDS,
    LengthDemand,
    demand_holds,
    has_own_length,
    parse_length_demand,
    true_demand,
)
from selflengthen.pipeline.stages import StageContext, StageError, run_stage
from selflengthen.pipeline.stages.collect import instruction_pool, phrase_demand
from selflengthen.pipeline.store import LocalStore, dumps_jsonl
from selflengthen.pipeline.text import count_words

WORD_COUNTS = [*range(10, 400), *random.Random(4).sample(range(400, 120_000), 300)]


def demand_of(text: str) -> LengthDemand | None:
    return parse_length_demand(text)


@pytest.mark.parametrize("kind", KINDS)
def test_true_demand_holds_literally_and_in_the_longen_window(kind):
    for words in WORD_COUNTS:
        demand = true_demand(words, kind)
        a, b = demand.window()
        assert a <= words <= b, (kind, words, demand)
        if kind == "above":
            assert words > demand.low
        elif kind == "below":
            assert words < demand.low
        elif kind == "range":
            assert demand.low <= words <= demand.high and demand.low < demand.high
        assert demand.low == int(demand.low) > 0  # whole, round numbers


def test_true_demand_refuses_too_short_responses_and_unknown_kinds():
    with pytest.raises(ValueError, match="words 9: 10 or more"):
        true_demand(9, "about")
    with pytest.raises(ValueError, match="kind 'exactly'"):
        true_demand(100, "exactly")


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_phrasing_parses_back_to_its_demand(lang, kind):
    """Each template of the language says exactly the demand it was given, whatever the numbers, after any
    instruction (the seeds without a demand of their own), so the demand is true of its response."""
    templates = prompts.length_demands(lang)[kind]
    assert len(templates) >= 3  # varied phrasing
    seeds = [r["prompt"] for r in load_seed_instructions(lang) if not has_own_length(r["prompt"])]
    rng = random.Random(f"{lang}-{kind}")
    for words in WORD_COUNTS:
        demand = true_demand(words, kind)
        n = str(int(demand.low))
        m = str(int(demand.high)) if demand.high else ""
        for template in templates:
            text = template.substitute(instruction=rng.choice(seeds), n=n, m=m)
            assert demand_of(text) == demand, (text[-120:], demand)
            assert demand_holds(demand_of(text), words)


def test_both_languages_have_all_four_types():
    for lang in ("en", "zh"):
        assert set(prompts.length_demands(lang)) == set(KINDS)


# -- the stage ------------------------------------------------------------------------------------------------

EN_WORDS = ("river stone light morning garden letter window market winter music story bridge forest lantern "
            "harbor meadow valley candle thunder silver ocean mountain village orchard journey").split()
ZH_CHARS = "山水风云花草树木日月星光春夏秋冬江河湖海城乡人家书画诗歌田园"


def text_for(seed: int, n: int, zh: bool) -> str:
    """n words (or 字) in paragraphs of about ten, deterministic in the seed, without repeated n-grams."""
    rng = random.Random(seed)
    tokens = [rng.choice(ZH_CHARS) if zh else rng.choice(EN_WORDS) for _ in range(n)]
    paragraphs = [tokens[i:i + 10] for i in range(0, n, 10)]
    if zh:
        return "\n\n".join("".join(p) + "。" for p in paragraphs)
    return "\n\n".join(" ".join(p) + "." for p in paragraphs)


def reply(body: dict) -> str:
    seed = body.get("seed") or int(hashlib.sha256(str(body["messages"]).encode()).hexdigest()[:8], 16)
    zh = any("\u4e00" <= ch <= "\u9fff" for ch in body["messages"][0]["content"])
    if body["model"] == "generator":
        if "lighthouse" in body["messages"][0]["content"]:
            return text_for(seed, 8, zh)  # too short (< collect.minWords) to carry a demand
        return text_for(seed, 10 + seed % 50, zh)
    if body.get("continue_final_message"):
        return "\n\n" + text_for(seed, 30, zh)
    return text_for(seed, 25, zh)


def collect_ctx(tmp_path, endpoint: str, **collect) -> StageContext:
    config = parse_config({
        "name": "col", "iterations": 1, "seed": 5, "languages": ["en", "zh"],
        "filters": {"checkEnding": False, "checkMeta": False, "enNgram": 0, "zhNgram": 0},
        "client": {"concurrency": 4, "deadlineSeconds": 10, "backoffSeconds": 0.01},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 8},
        "collect": {"enabled": True, "items": 48, **collect},
    })
    ctx = StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "store"), endpoint=endpoint)
    for stage in ("train-generator", "train-extender"):
        ctx.artifacts(stage).finish({})
    return ctx


@pytest.fixture
def server():
    with ChatServer(reply) as s:
        yield s


def test_collect_exports_true_demands_in_sft_format(tmp_path, server):
    ctx = collect_ctx(tmp_path, server.endpoint)
    manifest = run_stage("collect", ctx)
    artifacts = ctx.artifacts("collect")
    assert artifacts.prefix == "col/collect" and manifest["output"] == "col/collect/"
    rows = list(artifacts.read_outputs())
    assert rows and manifest["counts"]["accepted"] == len(rows)
    seen = set()
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        words = count_words(assistant["content"])
        demand = demand_of(user["content"])
        assert demand == LengthDemand(row["demand"]["type"], row["demand"]["low"], row["demand"]["high"])
        assert demand_holds(demand, words) and row["words"] == words
        assert any("\u4e00" <= c <= "\u9fff" for c in user["content"]) == (row["language"] == "zh")
        seen.add((row["language"], demand.kind))
    assert seen == {(lang, kind) for lang in ("en", "zh") for kind in KINDS}
    assert sum(manifest["byType"].values()) == len(rows) == sum(manifest["byLanguage"].values())
    assert manifest["counts"]["extended"] == sum(r["extended"] for r in rows) > 0
    assert manifest["averageWords"] > manifest["averageWordsInitial"]
    # Generator answers, then the Extender: one micro-iteration (two requests) per answer.
    assert len(server.bodies("extender")) == 2 * len(server.bodies("generator"))
    assert manifest["counts"]["requests"] == len(server.chats())
    # Done: run again, nothing asked.
    asked = len(server.chats())
    assert run_stage("collect", ctx) == manifest and len(server.chats()) == asked


def test_collect_without_extension_and_from_self_instruct(tmp_path, server):
    ctx = collect_ctx(tmp_path, server.endpoint, extend=False, languages=["en"], demandTypes=["below"], items=12)
    own = ["Write a story about a lighthouse keeper who finds a message in a bottle.",
           "Describe a city at night in 300 words.",  # demands a length itself: never used
           "Write a letter from a sailor to his family at home."]
    si = ctx.artifacts("self-instruct")
    rows = [{"id": f"i{i}", "language": "en", "instruction": text, "words": count_words(text)}
            for i, text in enumerate(own)]
    ctx.store.write(si.key("part-00000.jsonl"), dumps_jsonl(rows))
    si.finish({"counts": {"requested": 3, "accepted": 3}})
    assert set(instruction_pool(ctx, "en")) == {own[0], own[2]}
    manifest = run_stage("collect", ctx)
    rows = list(ctx.artifacts("collect").read_outputs())
    assert not server.bodies("extender") and manifest["counts"]["extended"] == 0
    assert manifest["byType"] == {"below": len(rows)}
    # The answers to the lighthouse, too short for a demand (under collect.minWords, unextended), are dropped.
    assert manifest["counts"]["rejected"]["short"] == manifest["counts"]["failed"] == 12 - len(rows) == 6
    for row in rows:
        user = row["messages"][0]["content"]
        assert own[2] in user
        assert count_words(row["messages"][1]["content"]) < demand_of(user).low


def test_phrase_demand_is_seeded(tmp_path):
    ctx = collect_ctx(tmp_path, "http://127.0.0.1:9/v1")
    demand = true_demand(150, "range")
    texts = {phrase_demand(ctx, f"c{i}", "en", "Write a poem.", demand) for i in range(40)}
    assert len(texts) > 1  # varied phrasing ...
    assert phrase_demand(ctx, "c1", "en", "Write a poem.", demand) == phrase_demand(ctx, "c1", "en", "Write a poem.",
                                                                                     demand)  # ... reproducibly


def test_collect_runs_after_the_last_iteration_only(tmp_path):
    ctx = collect_ctx(tmp_path, "http://127.0.0.1:9/v1")
    config = ctx.config.model_copy(update={"iterations": 2})
    early = StageContext(config=config, iteration=1, store=ctx.store, endpoint=ctx.endpoint)
    with pytest.raises(StageError, match="--iteration 2 wanted"):
        run_stage("collect", early)


def test_disabled_collect_does_nothing(tmp_path):
    ctx = collect_ctx(tmp_path, "http://127.0.0.1:9/v1")
    ctx.config = ctx.config.model_copy(update={"collect": ctx.config.collect.model_copy(update={"enabled": False})})
    assert run_stage("collect", ctx)["enabled"] is False


def test_collect_draws_every_iterations_pairs_with_true_demands(tmp_path, server):
    """Each iteration's kept (initial, extended) pairs join the final models' answers, each text with its own true
    demand; an instruction that demands a length itself and a language not collected are left out."""
    ctx = collect_ctx(tmp_path, server.endpoint, items=8, languages=["en"])
    ctx.config = ctx.config.model_copy(update={"iterations": 2})
    ctx.iteration = 2
    for stage in ("train-generator", "train-extender"):
        ctx.artifacts(stage).finish({})
    made = {}
    for k in (1, 2):
        rows = [{"id": f"r{k}{i}-a0", "responseId": f"r{k}{i}", "language": "en",
                 "instruction": f"Write a story about winter number {i}.", "initial": text_for(k * 10 + i, 20, False),
                 "extended": text_for(k * 100 + i, 40 + 10 * k, False), "initialWords": 20, "words": 40 + 10 * k}
                for i in range(3)]
        rows.append({**rows[0], "id": f"own{k}", "instruction": "Describe a city at night in 300 words."})
        rows.append({**rows[1], "id": f"zh{k}", "language": "zh"})
        extend = ctx.artifacts("extend", iteration=k)
        ctx.store.write(extend.key("part-00000.jsonl"), dumps_jsonl(rows))
        extend.finish({"counts": {"accepted": len(rows)}})
        made[k] = rows
    manifest = run_stage("collect", ctx)
    rows = list(ctx.artifacts("collect").read_outputs())
    earlier = [r for r in rows if r["source"] != "final"]
    assert {r["source"] for r in rows} == {"final", "iteration-1", "iteration-2"}
    assert len(earlier) == 2 * 2 * 3 == manifest["counts"]["fromIterations"]  # 2 iterations x 3 rows x 2 texts
    assert manifest["counts"]["iterationsLeftOut"] == {"own-length": 4}  # zh is not collected: never a candidate
    assert manifest["bySource"] == {"final": manifest["counts"]["final"], "iteration-1": 6, "iteration-2": 6}
    assert manifest["counts"]["accepted"] == len(rows) == manifest["counts"]["final"] + 12
    texts = {(r["source"], r["messages"][1]["content"]) for r in earlier}
    for k, extend_rows in made.items():
        for row in extend_rows[:3]:
            assert (f"iteration-{k}", row["initial"]) in texts and (f"iteration-{k}", row["extended"]) in texts
    for row in earlier:
        user, assistant = row["messages"]
        demand = demand_of(user["content"])
        assert demand_holds(demand, count_words(assistant["content"])) and row["language"] == "en"
        assert row["extended"] == (count_words(assistant["content"]) > 20)
        assert "300 words" not in user["content"]
    # resumed: the same rows
    assert run_stage("collect", ctx) == manifest
