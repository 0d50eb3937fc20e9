"""Filters and helpers against the behaviour of the authors' reference implementation (arXiv 2410.23933)."""

import random

import pytest

from selflengthen.pipeline.text import (
    check_response,
    count_words,
    detect_language,
    drop_short,
    drop_short_mask,
    split_paragraphs,
    zh_tokens,
)


def reference_drop_short_mask(lengths, seed):
    """The reference's O(n^2) formulation: rank from list.index in the sorted lengths, one draw per item."""
    ordered = sorted(lengths)
    rng = random.Random(seed)
    n = len(lengths)
    return [rng.random() > 2 * (1 - ordered.index(x) / n) ** 3 for x in lengths]


@pytest.mark.parametrize(
    "text, words",
    [
        ("", 0),
        ("hello world", 2),
        ("  hello\n\tworld  ", 2),
        ("你好世界", 4),
        ("你好 world", 3),
        ("Qwen2模型很好。", 2 + 4),  # "Qwen2" + 模 型 很 好 + 。 (U+3000–303F counts)
        ("ａｂｃ", 3),  # full-width forms count one each
        ("mixed中text", 3),
    ],
)
def test_count_words(text, words):
    assert count_words(text) == words


def test_detect_language():
    assert detect_language("A plain English sentence.") == "en"
    assert detect_language("这是一个中文句子，里面有一些English。") == "zh"
    assert detect_language("") == "en"


def test_check_response_english_flavour():
    ok = "The first line.\n\nA second part that ends well."
    assert check_response(ok) is None
    assert check_response("No closing mark here") == "ending"
    assert check_response("Here is the revised text.\nBody.") == "meta-talk"
    assert check_response("Body.\nMore body.\nThis version is better.") == "meta-talk"
    assert check_response("   ") == "empty"
    words = " ".join(f"w{i}" for i in range(20))
    assert check_response(words + " " + words + ".") == "repetition"
    # a 9-word repeat is fine, a 10-word one is not
    nine = " ".join(f"x{i}" for i in range(9))
    assert check_response(f"{nine} a {nine} b.") is None
    ten = " ".join(f"y{i}" for i in range(10))
    assert check_response(f"{ten} a {ten} b.") == "repetition"


def test_check_response_chinese_flavour():
    assert check_response("这是一个很好的回答。") is None
    assert check_response("这是一个很好的回答") == "ending"
    # the reference's Chinese rules reject every English answer; ours pick the English flavour for it
    assert check_response("An English answer.") is None
    thirteen = "一二三四五六七八九十百千万"
    assert check_response(thirteen + "，" + thirteen + "。") == "repetition"
    assert check_response(thirteen[:12] + "，" + thirteen[:12] + "。") is None
    # English meta words are not Chinese meta-talk
    assert check_response("这个version很好。") is None


@pytest.mark.parametrize("text", [
    "以下是扩写后的文章：\n\n春天来了，万物复苏。",
    "下面是根据要求写成的文章。\n\n春天来了，万物复苏。",
    "春天来了，万物复苏。\n\n以上内容对原文进行了改写，使其更加生动。",
    "春天来了，万物复苏。\n\n燕子从南方飞回来了。\n\n---\n\n注：本文在原文基础上增加了细节描写。",
    "春天来了，万物复苏。\n\n***\n\n（说明：扩展了第二段。）",
])
def test_chinese_meta_talk_is_caught(text):
    assert check_response(text) == "meta-talk"
    assert check_response(text, check_meta=False) is None


@pytest.mark.parametrize("text", [
    "春天来了，万物复苏。\n\n---\n\n燕子从南方飞回来了。",  # a rule between sections is no note
    "注意安全是每个人的责任。\n\n我们要时刻牢记。",  # 注意 at the start is not an editor's note after a rule
    "这是一篇关于春天的文章。\n\n春天来了，万物复苏。",
])
def test_chinese_text_without_meta_talk_passes(text):
    assert check_response(text) is None


def test_english_meta_words_are_case_sensitive_as_the_reference():
    plan = "Incident Response Plan\n\nThe Version Control Policy explains the Paragraph Numbering of our manual."
    assert check_response(plan) is None  # headings and names, not talk about the rewriting
    assert check_response("The revised text follows.\n\nBody.") == "meta-talk"
    assert check_response("Body.\n\nI hope this response helps.") == "meta-talk"


def test_zh_tokens_merge_ascii_runs():
    assert zh_tokens("模型Qwen2 很好") == ["模", "型", "Qwen2 ", "很", "好"]


def test_check_response_switches():
    assert check_response("no ending", check_ending=False) is None
    assert check_response("The revised text.", check_meta=False) is None


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_drop_short_matches_reference(seed):
    rng = random.Random(100 + seed)
    lengths = [rng.randint(0, 50) for _ in range(500)]  # many ties
    assert drop_short_mask(lengths, seed) == reference_drop_short_mask(lengths, seed)


def test_drop_short_keeps_long_items_more_often_and_is_seeded():
    items = [{"text": "w " * n} for n in range(1, 401)]
    kept = drop_short(items, "text", seed=3)
    assert kept == drop_short(items, "text", seed=3)
    assert kept != drop_short(items, "text", seed=4)
    lengths = [count_words(i["text"]) for i in kept]
    short = sum(1 for n in lengths if n <= 200)
    assert len(lengths) - short > 2 * short
    assert all(count_words(i["text"]) > 1 for i in kept)  # the shortest has r = 1: never kept
    assert 0.5 < len(kept) / len(items) < 0.7  # the expected share is about 0.595


def test_split_paragraphs():
    assert split_paragraphs("a\n\nb\n\nc") == (["a", "b", "c"], "\n\n")
    assert split_paragraphs("a\nb\nc\n\nd") == (["a", "b", "c", "d"], "\n")
    assert split_paragraphs("one line") == (["one line"], "\n\n")
