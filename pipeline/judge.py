"""The optional LLM-judge quality scores of the evaluate stage, at an OpenAI-compatible model, their free-text
replies read robustly:

  * LonGen answers, by judge.rubric: `overall`, one 1-10 score (prompts/<lang>/quality_judge.txt), or
    `seven-criteria`, the paper's seven 1-10 criteria (criteria_judge.txt), whose mean is the quality;
  * LongBench-Write answers: S_q, LongWriter's six dimensions rated 1-5 each (longbench_judge.txt); an item's S_q
    is 20 x the mean of its six ratings (0-100, the scale of S_l).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from . import prompts
from .config import Judge, Sampling
from .inference import InferenceClient, ItemRejected

_NUM = r"(\d+(?:\.\d+)?)"
# The judge is told to answer "Score: N"; judges also write "**Score:** 8", "Rating: 7/10", "8 out of 10",
# "评分：8", "8分" or a bare "8". A labelled score wins (the last one: verdicts come after the reasoning), then a
# score out of ten, then a Chinese "N分", then a reply that is only a number.
_LABELLED = re.compile(r"(?:score|rating|评分|得分|分数|打分)\s*\**\s*(?:is|of|=|:|：|-|为|是)?\s*\**\s*" + _NUM,
                       re.I)
_OUT_OF_TEN = re.compile(_NUM + r"\s*(?:/|out of)\s*10(?!\d|\.\d)", re.I)
_FEN = re.compile(_NUM + r"\s*分")
_BARE = re.compile(r"^\W*" + _NUM + r"\W*$")
# Deterministic and short: a score, not an essay.
JUDGE_SAMPLING = Sampling(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0)


def parse_score(reply: str) -> float | None:
    """The 1-10 score in a judge's reply; None when there is none (or it is out of range)."""
    for pattern, last in ((_LABELLED, True), (_OUT_OF_TEN, False), (_FEN, False), (_BARE, False)):
        found = [float(m.group(1)) for m in pattern.finditer(reply)]
        found = [v for v in found if 1 <= v <= 10]
        if found:
            return found[-1] if last else found[0]
    return None


def judge_messages(language: str, query: str, response: str, prompt: str = "quality_judge") -> list[dict]:
    lang = language if language in prompts.LANGUAGES else "en"
    return [{"role": "user", "content": prompts.render(lang, prompt, query=query, response=response)}]


@dataclass(frozen=True)
class Rubric:
    """A judge prompt that rates several dimensions on one scale: each (key, English label, Chinese label)."""

    name: str
    prompt: str
    dimensions: tuple[tuple[str, str, str], ...]
    low: int
    high: int
    min_tokens: int = 256  # a line per dimension (judges often add a word of reasoning)


SEVEN_CRITERIA = Rubric("seven-criteria", "criteria_judge", (
    ("relevance", "relevance", "相关性"), ("coherence", "coherence", "连贯性"), ("accuracy", "accuracy", "准确性"),
    ("consistency", "consistency", "一致性"), ("clarity", "clarity", "清晰度"), ("creativity", "creativity", "创造性"),
    ("engagement", "engagement", "吸引力")), 1, 10)
LONGBENCH_DIMENSIONS = Rubric("longbench-write", "longbench_judge", (
    ("relevance", "relevance", "相关性"), ("accuracy", "accuracy", "准确性"), ("coherence", "coherence", "连贯性"),
    ("clarity", "clarity", "清晰度"), ("breadthAndDepth", r"breadth\s*(?:and|&)\s*depth", "广度与深度"),
    ("readingExperience", r"reading\s+experience", "阅读体验")), 1, 5)


def parse_dimensions(reply: str, rubric: Rubric) -> dict[str, float] | None:
    """Each dimension's rating in a reply of "Dimension: N" lines (markdown bold, a "/5" or "分" after the number
    are fine; the last rating of a dimension wins); None unless every dimension has one within the scale."""
    found = {}
    for key, en, zh in rubric.dimensions:
        pattern = re.compile(rf"(?:{en}|{zh})\s*\**\s*(?:[:：=\-]|is)?\s*\**\s*{_NUM}", re.I)
        values = [float(m.group(1)) for m in pattern.finditer(reply)]
        values = [v for v in values if rubric.low <= v <= rubric.high]
        if not values:
            return None
        found[key] = values[-1]
    return found


async def score_dimensions(client: InferenceClient, judge: Judge, rubric: Rubric, language: str, query: str,
                           response: str, seed: int) -> dict:
    """Ask the judge up to judge.maxAttempts times until every dimension of the rubric can be read:
    {criteria: {dimension: rating} or None, judgeReply, judgeAttempts}."""
    reply = ""
    for attempt in range(judge.max_attempts):
        gen = await client.chat(judge.model, judge_messages(language, query, response, rubric.prompt),
                                JUDGE_SAMPLING, max_tokens=max(judge.max_tokens, rubric.min_tokens),
                                seed=seed + attempt)
        reply = gen.text.strip()
        criteria = parse_dimensions(reply, rubric)
        if criteria is not None:
            return {"criteria": criteria, "judgeReply": reply[:400], "judgeAttempts": attempt + 1}
    return {"criteria": None, "judgeReply": reply[:400], "judgeAttempts": judge.max_attempts}


def mean_rating(criteria: dict[str, float]) -> float:
    return round(sum(criteria.values()) / len(criteria), 4)


async def score_quality(client: InferenceClient, judge: Judge, language: str, query: str, response: str,
                        seed: int) -> dict:
    """A LonGen answer's quality by judge.rubric: {quality (1-10 or None), judgeReply, judgeAttempts}, plus the
    seven `criteria` with the seven-criteria rubric (quality is their mean)."""
    if judge.rubric == "overall":
        return await score(client, judge, language, query, response, seed)
    out = await score_dimensions(client, judge, SEVEN_CRITERIA, language, query, response, seed)
    return {"quality": mean_rating(out["criteria"]) if out["criteria"] else None, **out}


async def score_longbench(client: InferenceClient, judge: Judge, language: str, query: str, response: str,
                          seed: int) -> dict:
    """A LongBench-Write answer's S_q item score: 20 x the mean of the six 1-5 ratings (None when unreadable)."""
    out = await score_dimensions(client, judge, LONGBENCH_DIMENSIONS, language, query, response, seed)
    return {"sq": round(20 * mean_rating(out["criteria"]), 4) if out["criteria"] else None, **out}


def judge_api_key(judge: Judge) -> str | None:
    """The judge's API key, from the environment variable judge.apiKeyEnv names (the key is never configured)."""
    if not judge.api_key_env:
        return None
    key = os.environ.get(judge.api_key_env)
    if not key:
        raise ValueError(f"evaluate.judge.apiKeyEnv: environment variable {judge.api_key_env} is not set")
    return key


async def score(client: InferenceClient, judge: Judge, language: str, query: str, response: str,
                seed: int) -> dict:
    """Ask the judge up to judge.maxAttempts times until its reply holds a score: {quality, judgeReply}."""
    reply = ""
    for attempt in range(judge.max_attempts):
        try:
            gen = await client.chat(judge.model, judge_messages(language, query, response), JUDGE_SAMPLING,
                                    max_tokens=judge.max_tokens, seed=seed + attempt)
        except ItemRejected as err:  # e.g. an answer too long for the judge's context: unscored, not fatal
            return {"quality": None, "judgeReply": f"({err.reason})", "judgeAttempts": attempt + 1}
        reply = gen.text.strip()
        value = parse_score(reply)
        if value is not None:
            return {"quality": value, "judgeReply": reply[:200], "judgeAttempts": attempt + 1}
    return {"quality": None, "judgeReply": reply[:200], "judgeAttempts": judge.max_attempts}


def _mean(v: list[float]) -> float | None:
    return round(sum(v) / len(v), 4) if v else None


def _criteria_means(rows: list[dict]) -> dict[str, float | None]:
    keys = dict.fromkeys(k for r in rows if r.get("criteria") for k in r["criteria"])
    return {k: _mean([r["criteria"][k] for r in rows if r.get("criteria")]) for k in keys}


def aggregate_quality(rows: Iterable[dict], model: str, rubric: str = "overall") -> dict:
    """Mean quality overall and per LonGen type, over the rows the judge scored (and each criterion's mean with
    the seven-criteria rubric)."""
    scored: dict[str, list[float]] = {}
    values, unparsed, judged = [], 0, []
    for row in rows:
        if row.get("quality") is None:
            unparsed += 1
            continue
        judged.append(row)
        values.append(row["quality"])
        scored.setdefault(row.get("type") or "?", []).append(row["quality"])
    out = {"model": model, "rubric": rubric, "mean": _mean(values), "scored": len(values), "unparsed": unparsed,
           "byType": {k: _mean(v) for k, v in sorted(scored.items())}}
    if rubric != "overall":
        out["criteria"] = _criteria_means(judged)
    return out


def aggregate_sq(rows: Iterable[dict], model: str) -> dict:
    """S_q (0-100) overall and per language, and each dimension's mean rating (1-5), over the LongBench-Write rows
    the judge scored."""
    rows = list(rows)
    judged = [r for r in rows if r.get("sq") is not None]
    unparsed = len(rows) - len(judged)
    by_language: dict[str, list[float]] = {}
    for row in judged:
        by_language.setdefault(row["language"], []).append(row["sq"])
    return {"model": model, "overall": _mean([r["sq"] for r in judged]), "scored": len(judged),
            "unparsed": unparsed, "byLanguage": {k: _mean(v) for k, v in sorted(by_language.items())},
            "dimensions": _criteria_means(judged)}
