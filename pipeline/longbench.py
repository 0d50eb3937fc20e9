"""LongBench-Write and LongWrite-Ruler, LongWriter's long-output benchmarks (data/README.md).

LongBench-Write's length score S_l: with x the required length and y the response's length, an item scores

    100 * max(0, 1 - (y/x - 1) / 3)   when y > x   (too long: a third of the score lost per extra x)
    100 * max(0, 1 - (x/y - 1) / 2)   otherwise    (too short: half of it per missing ratio)

and S_l is the mean, overall, per language and per required-length bucket ([0, 500), [500, 2k), [2k, 4k),
[4k, ∞): the columns of LongWriter's table). An empty response (y = 0) scores 0, the limit of the formula.

Lengths here are counted as LongWriter counts them (`longwriter_length`): Chinese characters (U+4E00-U+9FFF) plus
English words (\\b[a-zA-Z]+\\b), not the project's count (text.count_words, used for LonGen). The report says so.

LongWrite-Ruler asks for 1,000 up to 30,000 words; the longest answer (same count) is the model's maximum output
length, the number the paper's growth claim is about.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

COUNT = "longwriter"  # the name of the length count the reports and manifests say they use
_CHINESE = re.compile(r"[\u4e00-\u9fff]")
_ENGLISH_WORD = re.compile(r"\b[a-zA-Z]+\b")
# Required-length buckets: (label, low inclusive, high exclusive).
BUCKETS = (("0-500", 0, 500), ("500-2k", 500, 2000), ("2k-4k", 2000, 4000), ("4k+", 4000, float("inf")))


def longwriter_length(text: str) -> int:
    """Chinese characters plus English words, as LongWriter counts a response's length."""
    return len(_CHINESE.findall(text)) + len(_ENGLISH_WORD.findall(text))


def length_score(required: float, produced: float) -> float:
    """The S_l item score (0 to 100) of a response of length `produced` asked for `required`."""
    if required <= 0:
        raise ValueError(f"required length {required}: a positive number wanted")
    x, y = float(required), float(produced)
    if y > x:
        return 100 * max(0.0, 1 - (y / x - 1) / 3)
    if y <= 0:
        return 0.0
    return 100 * max(0.0, 1 - (x / y - 1) / 2)


def bucket(required: float) -> str:
    for label, low, high in BUCKETS:
        if low <= required < high:
            return label
    raise ValueError(f"required length {required}: a non-negative number wanted")


def language_of(row: dict) -> str:
    """LongWriter's rows name no language: zh when the prompt has Chinese characters (a Chinese request for an
    English essay is a Chinese prompt: 61 zh, 59 en, as LongWriter counts them), else en."""
    return row.get("language") or ("zh" if _CHINESE.search(row["prompt"]) else "en")


def score_response(row: dict, response: str) -> dict:
    """Length (LongWriter's count), S_l item score and bucket of one answer to a LongBench-Write row."""
    produced = longwriter_length(response)
    return {"length": produced, "sl": round(length_score(row["length"], produced), 4),
            "bucket": bucket(row["length"])}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def aggregate(rows: Iterable[dict]) -> dict:
    """S_l overall, per language and per bucket (in BUCKETS order) of rows with `sl`, `language`, `bucket`,
    `required`, `length`; `points` are (required, produced, language) for the scatter plot."""
    by_language: dict[str, list[float]] = defaultdict(list)
    by_bucket: dict[str, list[float]] = defaultdict(list)
    scores, lengths, points = [], [], []
    for row in rows:
        scores.append(row["sl"])
        lengths.append(row["length"])
        by_language[row["language"]].append(row["sl"])
        by_bucket[row["bucket"]].append(row["sl"])
        points.append([row["required"], row["length"], row["language"]])
    return {
        "items": len(scores),
        "count": COUNT,
        "sl": {"overall": _mean(scores), "byLanguage": {k: _mean(v) for k, v in sorted(by_language.items())},
               "byBucket": {label: _mean(by_bucket[label]) for label, _, _ in BUCKETS if by_bucket.get(label)}},
        "averageLength": _mean(lengths),
        "maxLength": max(lengths, default=0),
        "points": sorted(points, key=lambda p: (p[0], p[1])),
    }


def ruler_summary(rows: Iterable[dict]) -> dict:
    """The maximum output length over LongWrite-Ruler answers (LongWriter's count), and per required length
    the average and longest answer."""
    by_required: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        by_required[row["required"]].append(row["length"])
    lengths = [n for values in by_required.values() for n in values]
    return {
        "items": len(lengths),
        "count": COUNT,
        "maxLength": max(lengths, default=0),
        "averageLength": _mean([float(n) for n in lengths]),
        "byRequired": {str(k): {"average": _mean([float(n) for n in v]), "max": max(v)}
                       for k, v in sorted(by_required.items())},
    }
