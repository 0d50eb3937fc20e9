"""LonGen length-following score: demand parsing, windows, scores and aggregation, against hand-computed cases."""

import pytest

from selflengthen.pipeline.config import RunConfig
from selflengthen.pipeline.data import load_longen
from selflengthen.pipeline.longen import (
    LengthDemand,
    aggregate,
    item_demand,
    length_score,
    parse_length_demand,
    score_response,
    select_items,
    target_window,
)
from selflengthen.pipeline.stages import STAGES, StageContext, stage_module
from selflengthen.pipeline.store import LocalStore


@pytest.mark.parametrize(
    "text, kind, demand",
    [
        ("around 2000 words", "about", LengthDemand("about", 2000)),
        ("大约2500字", "about", LengthDemand("about", 2500)),
        ("2000-3000 words", "range", LengthDemand("range", 2000, 3000)),
        ("2000字至4000字", "range", LengthDemand("range", 2000, 4000)),
        ("more than 5000 words", "above", LengthDemand("above", 5000)),
        ("大于7000字", "above", LengthDemand("above", 7000)),
        ("less than 8000 words", "below", LengthDemand("below", 8000)),
        ("小于2000字", "below", LengthDemand("below", 2000)),
    ],
)
def test_parse_longen_constraints(text, kind, demand):
    assert parse_length_demand(text, kind) == demand
    assert parse_length_demand(text) == demand  # the kind is recognised without the hint too


@pytest.mark.parametrize(
    "text, demand",
    [
        ("Write an essay of about 1,500 words on tides.", LengthDemand("about", 1500)),
        ("写一篇3000字左右的文章", LengthDemand("about", 3000)),
        ("Please answer in 800 to 1200 words.", LengthDemand("range", 800, 1200)),
        ("Between 300 and 500 words, please.", LengthDemand("range", 300, 500)),
        ("Keep it under 400 words.", LengthDemand("below", 400)),
        ("字数在5000字以内", LengthDemand("below", 5000)),
        ("At least 2k words.", LengthDemand("above", 2000)),
        ("撰写一篇约四千字的传记", LengthDemand("about", 4000)),
        ("两千字以上", LengthDemand("above", 2000)),
        ("不超过两千五百字", LengthDemand("below", 2500)),
        ("Write a detailed 4,000-word piece.", LengthDemand("about", 4000)),
        ("all within a 5000-word limit", LengthDemand("below", 5000)),
        ("文章不得超过5000字", LengthDemand("below", 5000)),
        ("需要超过5000字", LengthDemand("above", 5000)),
        ("字数在4000至5000之间", LengthDemand("range", 4000, 5000)),
        ("确保内容在大约5000字以内", LengthDemand("below", 5000)),
        ("Born 1943–1974 in Ohio.", None),
        ("Give me 3 examples, more than 2 each.", None),
        ("Tell me about the sea.", None),
    ],
)
def test_parse_free_text_demands(text, demand):
    assert parse_length_demand(text) == demand


def test_every_longen_item_has_its_typed_demand():
    rows = load_longen()
    assert len(rows) == 240
    agree = 0
    for row in rows:
        demand = item_demand(row)
        assert demand.kind == row["type"]
        a, b = target_window(demand)
        assert 0 < a < b
        # The free-text parser finds the same demand in the query itself (written many ways: "a 2500-word plot",
        # "约四千字", "字数在4000至5000之间", "不得超过5000字") except where the query has none or another one.
        agree += parse_length_demand(row["query"]) == demand
    assert agree >= 228


@pytest.mark.parametrize(
    "demand, window",
    [
        (LengthDemand("about", 2000), (1600, 2400)),
        (LengthDemand("range", 2000, 3000), (2000, 3000)),
        (LengthDemand("above", 2000), (2000, 3000)),
        (LengthDemand("below", 2000), (1000, 2000)),
    ],
)
def test_windows(demand, window):
    assert target_window(demand) == pytest.approx(window)


@pytest.mark.parametrize(
    "n, a, b, score",
    [
        (1600, 1600, 2400, 1.0),  # the bounds are inside
        (2400, 1600, 2400, 1.0),
        (2000, 1600, 2400, 1.0),
        (1200, 1600, 2400, 0.5),  # 2*1200/1600 - 1
        (800, 1600, 2400, 0.0),  # 2*800/1600 - 1 = 0
        (400, 1600, 2400, 0.0),  # clipped at 0
        (0, 1600, 2400, 0.0),
        (3000, 1600, 2400, 0.5),  # 3 - 2*3000/2400
        (3600, 1600, 2400, 0.0),  # 3 - 3 = 0
        (5000, 1600, 2400, 0.0),
        (1500, 1000, 2000, 1.0),
        (750, 1000, 2000, 0.5),
        (2500, 2000, 3000, 1.0),
        (3300, 2000, 3000, pytest.approx(0.8)),  # 3 - 6600/3000
        (1800, 2000, 3000, pytest.approx(0.8)),  # 3600/2000 - 1
    ],
)
def test_length_score(n, a, b, score):
    assert length_score(n, a, b) == score


def test_score_response_counts_words_of_either_language():
    en = {"type": "about", "constraint": "around 10 words", "query": "q"}
    assert score_response(en, " ".join(["word"] * 10)) == {"words": 10, "low": 8, "high": 12, "score": 1.0}
    assert score_response(en, " ".join(["word"] * 6))["score"] == pytest.approx(0.5)  # 2*6/8 - 1
    zh = {"type": "below", "constraint": "小于10字", "query": "q"}
    assert score_response(zh, "字" * 4) == {"words": 4, "low": 5, "high": 10, "score": pytest.approx(0.6)}
    assert score_response(zh, "字" * 12)["score"] == pytest.approx(0.6)  # 3 - 24/10


def test_aggregate_means_per_type_and_overall():
    rows = [
        {"type": "about", "language": "en", "range": "2-4k", "score": 1.0, "words": 2000},
        {"type": "about", "language": "zh", "range": "2-4k", "score": 0.5, "words": 1200},
        {"type": "range", "language": "en", "range": "4-6k", "score": 0.0, "words": 100},
        {"type": "below", "language": "en", "range": "6-8k", "score": 0.25, "words": 700},
    ]
    result = aggregate(rows)
    assert result["items"] == 4
    assert result["overall"] == pytest.approx(0.4375)
    assert result["byType"] == {"about": 0.75, "range": 0.0, "below": 0.25}
    assert result["byLanguage"] == {"en": pytest.approx(0.4167, abs=1e-4), "zh": 0.5}
    assert result["byRange"] == {"2-4k": 0.75, "4-6k": 0.0, "6-8k": 0.25}
    assert result["averageWords"] == 1000
    assert aggregate([])["overall"] is None


def test_select_items_spreads_over_groups():
    rows = load_longen()
    assert select_items(rows, 240) == rows
    picked = select_items(rows, 24)
    assert len(picked) == 24
    groups = {(r["language"], r["range"], r["type"]) for r in picked}
    assert len(groups) == 24  # one from each group of ten
    en = select_items(rows, 240, ["en"])
    assert len(en) == 120 and {r["language"] for r in en} == {"en"}


def test_evaluate_stage_is_registered_and_can_be_disabled(tmp_path):
    assert {"build-sft", "train-generator", "train-extender", "evaluate"} <= set(STAGES)
    module = stage_module("evaluate")
    assert module.REQUIRES == ("train-generator",)
    cfg = RunConfig.model_validate({"evaluate": {"enabled": False, "items": 12}})
    ctx = StageContext(config=cfg, iteration=1, store=LocalStore(tmp_path))
    assert len(module.items(ctx)) == 12
    assert module.run(ctx)["enabled"] is False


def test_evaluate_stage_scores_the_generator_answers(tmp_path):
    """The stage over an OpenAI-compatible server on loopback that answers every query with 2000 words."""
    from chat_server import ChatServer

    from selflengthen.pipeline.stages import run_stage

    with ChatServer(lambda body: " ".join(["word"] * 2000)) as server:
        cfg = RunConfig.model_validate({"name": "ev", "evaluate": {"items": 24, "languages": ["en"],
                                                                   "longbenchWrite": {"enabled": False},
                                                                   "ruler": {"enabled": False}},
                                        "storage": {"shardSize": 5}})
        ctx = StageContext(config=cfg, iteration=1, store=LocalStore(tmp_path), endpoint=server.endpoint)
        ctx.artifacts("train-generator").finish({})
        manifest = run_stage("evaluate", ctx)
        asked = [r["body"] for r in server.chats()]

    assert len(asked) == 24 and {b["model"] for b in asked} == {"generator"}
    rows = list(ctx.artifacts("evaluate").read_outputs())
    assert len(rows) == 24 and {r["language"] for r in rows} == {"en"}
    for row in rows:
        assert row["words"] == 2000
        assert row["score"] == pytest.approx(score_response(row, row["response"])["score"])
    assert manifest["counts"] == {"requested": 24, "accepted": 24, "truncated": 0, "byBenchmark": {"longen": 24},
                                  "rejected": {}}
    assert manifest["averageWords"] == 2000
    # 2000 words: inside "about 2000" ([1600, 2400]); its score per item is known from the windows
    assert manifest["scores"]["overall"] == pytest.approx(sum(r["score"] for r in rows) / 24, abs=1e-4)
    assert set(manifest["scores"]["byType"]) == {"about", "range", "above", "below"}
    assert manifest["scores"]["byLanguage"] == {"en": manifest["scores"]["overall"]}
