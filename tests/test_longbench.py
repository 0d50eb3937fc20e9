"""LongBench-Write and LongWrite-Ruler in the evaluate stage: S_l against LongWriter's published formula (cases
computed by hand), LongWriter's length count, the buckets, the packaged data, and the plumbing (rows, manifest,
S_q from the six-dimension judge, the seven-criterion LonGen judge) against deterministic local servers."""

from __future__ import annotations

import re

import pytest
from chat_server import ChatServer

from selflengthen.pipeline import judge as jd
from selflengthen.pipeline import longbench as lb
from selflengthen.pipeline.config import ConfigError, parse_config
from selflengthen.pipeline.data import load_longbench_write, load_longwrite_ruler
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.store import LocalStore


# S_l item score: y > x: 100 * max(0, 1 - (y/x - 1)/3); else 100 * max(0, 1 - (x/y - 1)/2). Worked by hand.
@pytest.mark.parametrize(("required", "produced", "score"), [
    (1000, 1000, 100.0),            # exact
    (1000, 2000, 100 * (2 / 3)),    # twice too long: 1 - 1/3
    (1000, 1300, 90.0),             # 1 - 0.3/3
    (1000, 4000, 0.0),              # 1 - 3/3
    (1000, 9000, 0.0),              # clipped at 0
    (1000, 800, 87.5),              # 1 - 0.25/2
    (1000, 500, 50.0),              # 1 - 1/2
    (1000, 400, 25.0),              # 1 - 1.5/2
    (1000, 250, 0.0),               # 1 - 3/2, clipped
    (200, 150, 100 * (1 - (4 / 3 - 1) / 2)),
    (10000, 12000, 100 * (1 - 0.2 / 3)),
    (1000, 0, 0.0),                 # an empty answer: the formula's limit
])
def test_sl_item_score_is_longwriters_formula(required, produced, score):
    assert lb.length_score(required, produced) == pytest.approx(score)


def test_sl_refuses_a_required_length_that_is_not_positive():
    with pytest.raises(ValueError, match="required length 0"):
        lb.length_score(0, 10)


@pytest.mark.parametrize(("text", "count"), [
    ("Hello, world! Three apples.", 4),
    ("There are 3 apples and 12 pears.", 5),  # numbers are no English words
    ("don't co-op", 4),                       # don, t, co, op
    ("你好，世界。", 4),                        # Chinese characters; full-width punctuation not counted
    ("我有3个apple", 3),                        # apple touches 个: no word boundary, not counted
    ("我有3个 apple。", 4),                     # 我 有 个 + apple
    ("ｆｕｌｌ width", 1),                      # full-width letters are not [a-zA-Z]
    ("", 0),
])
def test_longwriters_length_count(text, count):
    expected = len(re.findall(r"[\u4e00-\u9fff]", text)) + len(re.findall(r"\b[a-zA-Z]+\b", text))
    assert lb.longwriter_length(text) == expected == count


@pytest.mark.parametrize(("required", "label"), [(100, "0-500"), (499, "0-500"), (500, "500-2k"),
                                                 (1999, "500-2k"), (2000, "2k-4k"), (4000, "4k+"), (20000, "4k+")])
def test_required_length_buckets(required, label):
    assert lb.bucket(required) == label


def test_packaged_benchmarks():
    rows = load_longbench_write()
    assert len(rows) == 120
    languages = [lb.language_of(r) for r in rows]
    assert languages.count("zh") == 61 and languages.count("en") == 59
    assert {lb.bucket(r["length"]) for r in rows} == {label for label, _, _ in lb.BUCKETS}
    ruler = load_longwrite_ruler()
    assert len(ruler) == 48 and sorted({r["length"] for r in ruler}) == [1000, 2000, 5000, 10000, 20000, 30000]


def test_aggregate_by_language_and_bucket():
    rows = [{"sl": 100.0, "language": "en", "bucket": "0-500", "required": 100, "length": 100},
            {"sl": 50.0, "language": "en", "bucket": "4k+", "required": 5000, "length": 2500},
            {"sl": 0.0, "language": "zh", "bucket": "4k+", "required": 8000, "length": 100}]
    out = lb.aggregate(rows)
    assert out["sl"] == {"overall": 50.0, "byLanguage": {"en": 75.0, "zh": 0.0},
                         "byBucket": {"0-500": 100.0, "4k+": 25.0}}
    assert out["count"] == "longwriter" and out["maxLength"] == 2500
    assert out["points"] == [[100, 100, "en"], [5000, 2500, "en"], [8000, 100, "zh"]]


@pytest.mark.parametrize(("reply", "ratings"), [
    ("Relevance: 4\nAccuracy: 5\nCoherence: 3\nClarity: 4\nBreadth and depth: 2\nReading experience: 3",
     [4, 5, 3, 4, 2, 3]),
    ("**Relevance:** 4/5\n**Accuracy**: 5\nCoherence - 3\nClarity = 4\nBreadth & Depth: 2\nReading Experience: 3",
     [4, 5, 3, 4, 2, 3]),
    ("相关性：5\n准确性：4\n连贯性：4分\n清晰度：3\n广度与深度：2\n阅读体验：5", [5, 4, 4, 3, 2, 5]),
    ("Relevance: 4\nAccuracy: 5\nCoherence: 3\nClarity: 4\nBreadth and depth: 2", None),  # one missing
    ("Relevance: 9\nAccuracy: 5\nCoherence: 3\nClarity: 4\nBreadth and depth: 2\nReading experience: 3", None),
    ("I cannot rate this.", None),
])
def test_parse_six_dimensions(reply, ratings):
    got = jd.parse_dimensions(reply, jd.LONGBENCH_DIMENSIONS)
    assert (None if got is None else list(got.values())) == ratings


def test_config_refuses_more_items_than_the_benchmarks_have():
    with pytest.raises(ConfigError, match="evaluate.longbenchWrite.items: Input should be less than or equal to 120"):
        parse_config({"evaluate": {"longbenchWrite": {"items": 121}}})
    with pytest.raises(ConfigError, match="evaluate.ruler.items"):
        parse_config({"evaluate": {"ruler": {"items": 49}}})
    with pytest.raises(ConfigError, match="evaluate.judge.rubric"):
        parse_config({"evaluate": {"judge": {"rubric": "six"}}})


# -- the stage, against local OpenAI-compatible servers ---------------------------------------------------------------

REQUIRED = {r["prompt"]: r["length"] for r in load_longbench_write() + load_longwrite_ruler()}


def produced_for(prompt: str) -> int:
    """The fake Generator's answer length (LongWriter's count) for a prompt: a known function of what it asks."""
    required = REQUIRED.get(prompt)
    return 37 if required is None else max(1, min(required * 3 // 4, 2500))


def generator(body: dict) -> str:
    prompt = body["messages"][0]["content"]
    n = produced_for(prompt)
    if lb.language_of({"prompt": prompt}) == "zh":
        return "长" * n + "。"
    return " ".join(["long"] * n) + "."


def ratings_for(response: str) -> list[int]:
    """The fake judge's ratings of an answer: from its length, so they are known."""
    n = lb.longwriter_length(response)
    return [1 + (n + i) % 5 for i in range(7)]


def judge(body: dict) -> str:
    prompt = body["messages"][0]["content"]
    response = prompt.rsplit("[Answer]\n", 1)[-1] if "[Answer]" in prompt else prompt.rsplit("【回答】\n", 1)[-1]
    r = ratings_for(response)
    if "Breadth and depth" in prompt or "广度与深度" in prompt:
        return (f"Relevance: {r[0]}\nAccuracy: {r[1]}\nCoherence: {r[2]}\nClarity: {r[3]}\n"
                f"Breadth and depth: {r[4]}\nReading experience: {r[5]}")
    if "Creativity" in prompt or "创造性" in prompt:
        return "\n".join(f"{name}: {2 * v}" for name, v in zip(
            ("Relevance", "Coherence", "Accuracy", "Consistency", "Clarity", "Creativity", "Engagement"), r,
            strict=True))
    return "Score: 5"


def stage_ctx(tmp_path, endpoint: str, **evaluate) -> StageContext:
    config = parse_config({
        "name": "lbw", "iterations": 1, "seed": 1,
        "client": {"concurrency": 4, "deadlineSeconds": 10, "backoffSeconds": 0.01},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 5},
        "evaluate": {"items": 4, "longbenchWrite": {"items": 12}, "ruler": {"items": 6}, **evaluate},
    })
    ctx = StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "store"), endpoint=endpoint)
    ctx.artifacts("train-generator").finish({})
    return ctx


def test_evaluate_scores_longbench_write_and_finds_the_ruler_maximum(tmp_path):
    with ChatServer(generator) as server:
        ctx = stage_ctx(tmp_path, server.endpoint)
        manifest = run_stage("evaluate", ctx)
        assert len(server.chats()) == 4 + 12 + 6  # /tokenize calls of the context budget aside
    rows = list(ctx.artifacts("evaluate").read_outputs())
    lbw = [r for r in rows if r["benchmark"] == "longbench-write"]
    ruler = [r for r in rows if r["benchmark"] == "ruler"]
    assert len(lbw) == 12 and len(ruler) == 6 and len(rows) == 22
    assert manifest["counts"]["byBenchmark"] == {"longen": 4, "longbench-write": 12, "ruler": 6}
    for row in lbw + ruler:
        assert row["length"] == produced_for(row["prompt"]) == lb.longwriter_length(row["response"])
    for row in lbw:
        assert row["sl"] == pytest.approx(lb.length_score(row["required"], row["length"]), abs=1e-4)
        assert row["bucket"] == lb.bucket(row["required"])
    # the spread covers both languages and every bucket
    assert {r["language"] for r in lbw} == {"en", "zh"} and len({r["bucket"] for r in lbw}) == 4
    sl = manifest["longbenchWrite"]["sl"]
    assert sl["overall"] == pytest.approx(sum(r["sl"] for r in lbw) / 12, abs=1e-4)
    for lang in ("en", "zh"):
        mine = [r["sl"] for r in lbw if r["language"] == lang]
        assert sl["byLanguage"][lang] == pytest.approx(sum(mine) / len(mine), abs=1e-4)
    assert list(sl["byBucket"]) == ["0-500", "500-2k", "2k-4k", "4k+"]
    assert manifest["longbenchWrite"]["count"] == "longwriter"
    assert sorted(p[0] for p in manifest["longbenchWrite"]["points"]) == sorted(r["required"] for r in lbw)
    # the ruler: one prompt per length asked for, the longest answer is the maximum output length
    assert sorted(r["required"] for r in ruler) == [1000, 2000, 5000, 10000, 20000, 30000]
    assert manifest["ruler"]["maxLength"] == max(r["length"] for r in ruler) == 2500
    assert manifest["ruler"]["byRequired"]["1000"] == {"average": 750.0, "max": 750}
    # LonGen is scored as before, on its own rows only
    longen = [r for r in rows if r["benchmark"] == "longen"]
    assert manifest["scores"]["overall"] is not None and len(longen) == 4
    assert manifest["maxWords"] == max(r["words"] for r in longen) <= 38  # the ruler's 2500-word answers not in it
    assert "sq" not in manifest["longbenchWrite"]


def test_judge_gives_sq_on_six_dimensions_and_longen_quality_on_seven_criteria(tmp_path):
    def both(body: dict) -> str:
        return judge(body) if body["model"] == "judge" else generator(body)

    with ChatServer(both, models=("generator", "judge")) as server:
        ctx = stage_ctx(tmp_path, server.endpoint, judge={"enabled": True, "rubric": "seven-criteria"})
        manifest = run_stage("evaluate", ctx)
        judged = server.bodies("judge")
    rows = list(ctx.artifacts("evaluate").read_outputs())
    lbw = [r for r in rows if r["benchmark"] == "longbench-write"]
    longen = [r for r in rows if r["benchmark"] == "longen"]
    for row in lbw:
        r = ratings_for(row["response"])[:6]
        assert row["sq"] == pytest.approx(20 * sum(r) / 6, abs=1e-3)
        assert list(row["criteria"]) == ["relevance", "accuracy", "coherence", "clarity", "breadthAndDepth",
                                         "readingExperience"]
    for row in longen:
        r = [2 * v for v in ratings_for(row["response"])]
        assert row["quality"] == pytest.approx(sum(r) / 7, abs=1e-3) and len(row["criteria"]) == 7
    assert all("quality" not in r and "sq" not in r for r in rows if r["benchmark"] == "ruler")
    assert len(judged) == len(lbw) + len(longen)  # every reply readable at the first ask; the ruler is not judged
    sq = manifest["longbenchWrite"]["sq"]
    assert sq["scored"] == 12 and sq["overall"] == pytest.approx(sum(r["sq"] for r in lbw) / 12, abs=1e-3)
    assert manifest["longbenchWrite"]["s"] == pytest.approx(
        (manifest["longbenchWrite"]["sl"]["overall"] + sq["overall"]) / 2, abs=1e-3)
    quality = manifest["quality"]
    assert quality["rubric"] == "seven-criteria" and set(quality["criteria"]) == {
        "relevance", "coherence", "accuracy", "consistency", "clarity", "creativity", "engagement"}
    # the zh prompts went to the judge in Chinese
    assert any("广度与深度" in b["messages"][0]["content"] for b in judged)
    assert any("创造性" in b["messages"][0]["content"] for b in judged)
