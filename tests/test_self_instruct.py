"""Self-instruct against the scripted chat server (issue 17): completions stop at the end of the instruction,
multi-line instructions stay whole, instructions that state their own length or nearly repeat the pool are
rejected with their reasons, every prompt shows a seed, and the base model writes and judges in every iteration."""

import re

import pytest
from chat_server import ChatServer

from selflengthen.pipeline import prompts
from selflengthen.pipeline.config import BASE_MODEL_NAME, ConfigError, parse_config
from selflengthen.pipeline.data import load_seed_instructions
from selflengthen.pipeline.longen import has_own_length
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.store import LocalStore

SEEDS = [r["prompt"].strip() for r in load_seed_instructions("en")]
TOPICS = ("rivers lighthouses glaciers bridges orchards deserts harbors comets forests bells markets canals "
          "volcanoes libraries monasteries tides").split()
JUDGE_HEAD = prompts.render("en", "judge", instruction="\x00").split("\x00")[0][:40]


def instruction(seed: int, n: int) -> str:
    """What the model writes as item n (deterministic in the request's seed)."""
    topic, other = TOPICS[(seed + n) % len(TOPICS)], TOPICS[(seed // 7 + 3 * n) % len(TOPICS)]
    kind = (seed + n) % 6
    if kind == 0:
        return f"Write an essay of 300 words about {topic} and {other}."
    if kind == 1:  # a seed with one word changed: a near-duplicate
        return SEEDS[seed % len(SEEDS)].replace(" a ", " one ", 1)
    if kind == 2:
        return (f"Write a detailed travel guide to the {topic} of {other} number {seed}.\n"
                f"Cover their history, how to reach them and what to see in every season.")
    if kind == 3:  # a small model's talk about the list after its request (SmolLM2 in make demo)
        talk = ("Refer", "Requirement 4: Share a recipe for a pizza with less ingredients tha",
                "Please add your own extra requests to this list, just like the ones provided.")[seed % 3]
        return f"Compose a short report on {topic} beside {other}, case {seed}-{n}.\n{talk}"
    return f"Compose a long report on {topic} seen through {other}, case {seed}-{n}, with examples and sources."


def reply(body: dict) -> str:
    messages = body["messages"]
    if body.get("continue_final_message"):
        opened = int(re.search(r"Request (\d+):$", messages[-1]["content"]).group(1))
        # a chat model asked to list requests goes on listing: the server's stop string has to end it
        items = [instruction(body["seed"], opened)] + [f"Request {n}: {instruction(body['seed'], n)}"
                                                       for n in range(opened + 1, opened + 40)]
        return " " + "\n".join(items)
    assert messages[0]["content"].startswith(JUDGE_HEAD), messages
    return "Yes."


def stage_ctx(tmp_path, endpoint: str, iteration: int = 1, **self_instruct) -> StageContext:
    config = parse_config({
        "name": "si", "iterations": 2, "seed": 11,
        "selfInstruct": {"instructionsPerIteration": 24, **self_instruct},
        "client": {"concurrency": 4, "deadlineSeconds": 10, "backoffSeconds": 0.01},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 8},
    })
    return StageContext(config=config, iteration=iteration, store=LocalStore(tmp_path / "store"), endpoint=endpoint)


def test_completions_stop_at_the_instruction_and_keep_it_whole(tmp_path):
    with ChatServer(reply) as server:
        manifest = run_stage("self-instruct", stage_ctx(tmp_path, server.endpoint))
        bodies = [r["body"] for r in server.chats()]
    completions = [b for b in bodies if b.get("continue_final_message")]
    assert completions and all(b["model"] == BASE_MODEL_NAME for b in bodies)
    for b in completions:
        assert b["stop"] == ["Request 4"] and b["max_tokens"] == 1024  # two examples shown, item 3 completed
    rows = list(stage_ctx(tmp_path, server.endpoint).artifacts("self-instruct").read_outputs())
    assert len(rows) == manifest["counts"]["accepted"] == 24
    multi = [r["instruction"] for r in rows if "\n" in r["instruction"]]
    assert multi and all(m.startswith("Write a detailed travel guide") and m.endswith("every season.") for m in multi)
    assert not any("Request" in r["instruction"] for r in rows)
    short = [r["instruction"] for r in rows if r["instruction"].startswith("Compose a short report")]
    assert short and all("\n" not in m and m.endswith(".") for m in short)  # the list talk after it cut off
    rejected = manifest["counts"]["rejected"]
    assert rejected["states-length"] > 0 and rejected["near-duplicate"] > 0
    assert not any(has_own_length(r["instruction"]) for r in rows)


def test_a_completion_cut_at_max_tokens_is_rejected_as_truncated(tmp_path):
    with ChatServer(reply) as server:
        manifest = run_stage("self-instruct", stage_ctx(tmp_path, server.endpoint, maxTokens=6, maxTries=2,
                                                        instructionsPerIteration=4))
    assert manifest["counts"]["accepted"] == 0
    assert set(manifest["counts"]["rejected"]) <= {"truncated", "near-duplicate"}
    assert manifest["counts"]["rejected"]["truncated"] >= 6


def test_every_prompt_shows_a_seed_and_the_base_model_judges_in_later_iterations(tmp_path):
    with ChatServer(reply) as server:
        first = stage_ctx(tmp_path, server.endpoint, 1)
        made = [{"id": f"m{i}", "language": "en", "instruction": f"Model-made request number {i} about "
                 f"{TOPICS[i % len(TOPICS)]} in great depth.", "words": 9} for i in range(300)]
        first.artifacts("self-instruct").write_outputs(made, 64)
        first.artifacts("self-instruct").finish({"counts": {"accepted": len(made)}})
        run_stage("self-instruct", stage_ctx(tmp_path, server.endpoint, 2, fewShot=3))
        bodies = [r["body"] for r in server.chats()]
    assert {b["model"] for b in bodies} == {BASE_MODEL_NAME}  # iteration 2 too: never the tuned Generator
    judged = [b for b in bodies if not b.get("continue_final_message")]
    assert judged and all(b["max_tokens"] == 8 for b in judged)
    completions = [b["messages"][-1]["content"] for b in bodies if b.get("continue_final_message")]
    assert len(completions) >= 24
    assert all(any(seed in listing for seed in SEEDS) for listing in completions)
    assert sum(listing.count("Model-made") for listing in completions) > len(completions)  # the pool is used


def test_near_duplicate_threshold_and_base_name_are_validated():
    with pytest.raises(ConfigError, match="selfInstruct.maxSimilarity"):
        parse_config({"selfInstruct": {"maxSimilarity": 0}})
    with pytest.raises(ConfigError, match="models.generator: 'base' is the served name of the base model"):
        parse_config({"models": {"generator": "base"}})


def test_near_duplicates_by_fuzzy_ratio():
    from selflengthen.pipeline.dedup import NearDuplicates

    index = NearDuplicates(0.9, ["write a long essay about the history of rivers in europe.",
                                 "写一篇关于长江历史的长文。"])
    assert index.find("write a long essay about the history of rivers in asia.") is not None
    assert index.find("write a long essay about the history of rivers in europe") is not None
    assert index.find("compose a short poem about the morning light over rivers.") is None
    assert index.find("写一篇关于黄河历史的长文。") is None  # two characters of 13 differ: ratio 0.85
    assert index.find("写一篇关于长江历史的长文") is not None  # the same without its full stop
    index.add("plan a week of meals for a family of four.")
    assert index.find("plan a week of meals for a family of five.") is not None
    index.remove("plan a week of meals for a family of four.")
    assert index.find("plan a week of meals for a family of five.") is None
