"""The optional LLM-judge quality score of the evaluate stage: an OpenAI-compatible model rates each LonGen answer
from 1 to 10 (prompt: prompts/<lang>/quality_judge.txt), and its free-text reply is read robustly."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from . import prompts
from .config import Judge, Sampling
from .inference import InferenceClient

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


def judge_messages(language: str, query: str, response: str) -> list[dict]:
    lang = language if language in prompts.LANGUAGES else "en"
    return [{"role": "user", "content": prompts.render(lang, "quality_judge", query=query, response=response)}]


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
        gen = await client.chat(judge.model, judge_messages(language, query, response), JUDGE_SAMPLING,
                                max_tokens=judge.max_tokens, seed=seed + attempt)
        reply = gen.text.strip()
        value = parse_score(reply)
        if value is not None:
            return {"quality": value, "judgeReply": reply[:200], "judgeAttempts": attempt + 1}
    return {"quality": None, "judgeReply": reply[:200], "judgeAttempts": judge.max_attempts}


def aggregate_quality(rows: Iterable[dict], model: str) -> dict:
    """Mean quality overall and per LonGen type, over the rows the judge scored."""
    scored: dict[str, list[float]] = {}
    values, unparsed = [], 0
    for row in rows:
        if row.get("quality") is None:
            unparsed += 1
            continue
        values.append(row["quality"])
        scored.setdefault(row.get("type") or "?", []).append(row["quality"])

    def mean(v: list[float]) -> float | None:
        return round(sum(v) / len(v), 4) if v else None

    return {"model": model, "mean": mean(values), "scored": len(values), "unparsed": unparsed,
            "byType": {k: mean(v) for k, v in sorted(scored.items())}}
