"""LonGen length-following score (the paper's LonGen benchmark; pipeline/data/README.md).

Each LonGen item demands a length: about N words, N-M words, more than N, less than N (Chinese: 字). The demand
gives a target window [a, b]:

    about N  -> [0.8 N, 1.2 N]        range N-M -> [N, M]
    above N  -> [N, 1.5 N]            below N   -> [0.5 N, N]

and a response of n words (text.count_words) scores 1 inside the window, max(2n/a - 1, 0) below it and
max(3 - 2n/b, 0) above it. Scores are averaged per type and overall.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .text import count_words

KINDS = ("about", "range", "above", "below")

# A number: digits (with thousands separators, optionally scaled by k/千/万) or a Chinese numeral (四千, 两千五百).
_NUM = r"(\d[\d,，]*(?:\.\d+)?|[零〇一二两三四五六七八九十百千万]*[十百千万][零〇一二两三四五六七八九]?)\s*(k|千|万)?"
_ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_ZH_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10000}
_DASH = r"\s*(?:-|–|—|~|～|to|至|到)\s*"
_UNIT = r"(?:\s*-?\s*words?\b|\s*字)"
_NOT = r"(?<!不)(?<!不得)(?<!不能)(?<!不要)(?<!不可)"  # 超过 but not 不得超过
_ABOVE = (r"(?:more than|over|at least|beyond|no (?:less|fewer) than|exceed(?:s|ing)?|大于|" + _NOT + "多于|"
          + _NOT + r"超过|不少于|不低于|至少)")
_BELOW = (r"(?:less than|fewer than|under|at most|no more than|within(?: an?| the)?|小于|" + _NOT + r"少于|"
          r"(?:不|不得|不能|不要|不可)(?:超过|多于)|至多)")
_ABOUT = r"(?:around|about|approximately|roughly|circa|大约|约|大概)(?:\s*(?:为|在|是|有))?"


def _patterns(unit: str) -> list[tuple[str, re.Pattern]]:
    """Demand patterns, the unit after the (last) number required (free text) or optional (a LonGen constraint).
    Order matters: a range first (its numbers would match the others), then bounds written after the number
    (约8000字以内 is a bound), then the qualified numbers, then a bare "N-word" count, which means about N."""
    opt = f"(?:{_UNIT})?"
    return [
        ("range", re.compile(_NUM + opt + _DASH + _NUM + f"(?:{unit}|\\s*之间)", re.I)),
        ("range", re.compile(r"between\s+" + _NUM + opt + r"\s+and\s+" + _NUM + unit, re.I)),
        ("below", re.compile(_NUM + opt + r"\s*(?:以内|以下|之内)", re.I)),
        ("above", re.compile(_NUM + unit + r"\s*(?:以上)", re.I)),
        ("below", re.compile(_BELOW + r"\s*" + _NUM + unit, re.I)),
        ("above", re.compile(_ABOVE + r"\s*" + _NUM + unit, re.I)),
        ("about", re.compile(_ABOUT + r"\s*" + _NUM + unit, re.I)),
        ("about", re.compile(_NUM + unit + r"\s*(?:左右|上下)", re.I)),
        ("about", re.compile(r"\b" + _NUM + r"\s*-\s*words?\b", re.I)),
    ]


_STRICT = _patterns(_UNIT)
_LOOSE = _patterns(f"(?:{_UNIT})?")


@dataclass(frozen=True)
class LengthDemand:
    kind: str  # about | range | above | below
    low: float  # N
    high: float | None = None  # M for a range

    def window(self) -> tuple[float, float]:
        return target_window(self)


def _chinese_number(text: str) -> float:
    """四千 -> 4000, 两千五百 -> 2500, 两千五 -> 2500 (a trailing digit scales by the next lower unit), 十 -> 10."""
    total, section, digit, last_unit = 0, 0, None, 1
    for ch in text:
        if ch in _ZH_DIGITS:
            digit = _ZH_DIGITS[ch]
        elif ch == "万":
            section += digit or 0
            total += (section or 1) * 10000
            section, digit, last_unit = 0, None, 10000
        else:
            unit = _ZH_UNITS[ch]
            section += (1 if digit is None else digit) * unit
            digit, last_unit = None, unit
    if digit is not None:
        section += digit * (last_unit // 10 if last_unit >= 10 else 1)
    return float(total + section)


def _number(digits: str, scale: str | None) -> float:
    if digits[0] in _ZH_DIGITS or digits[0] in _ZH_UNITS:
        value = _chinese_number(digits)
    else:
        value = float(re.sub(r"[,，]", "", digits))
    return value * {"k": 1000, "K": 1000, "千": 1000, "万": 10000}.get(scale or "", 1)


def parse_length_demand(text: str, kind: str | None = None) -> LengthDemand | None:
    """The length demand written in text ("around 2000 words", "2000字至3000字", "more than 5000 words",
    "小于2000字", "约四千字", ...); None when there is none. In free text the number must be followed by its unit
    (words, 字), so dates and counts of other things are not taken for demands. With kind given (a LonGen row's
    `type`, whose `constraint` is a bare demand), only that kind is sought, the unit is optional, and a lone
    number counts as that kind."""
    for patterns in (_STRICT, _LOOSE) if kind else (_STRICT,):
        for found_kind, pattern in patterns:
            if kind is not None and found_kind != kind:
                continue
            m = pattern.search(text)
            if not m:
                continue
            if found_kind == "range":
                a, b = _number(m.group(1), m.group(2)), _number(m.group(3), m.group(4))
                return LengthDemand("range", min(a, b), max(a, b))
            return LengthDemand(found_kind, _number(m.group(1), m.group(2)))
    if kind in ("about", "above", "below"):
        m = re.search(_NUM, text)
        if m:
            return LengthDemand(kind, _number(m.group(1), m.group(2)))
    return None


def target_window(demand: LengthDemand) -> tuple[float, float]:
    n = demand.low
    if demand.kind == "about":
        return 0.8 * n, 1.2 * n
    if demand.kind == "range":
        if demand.high is None:
            raise ValueError("a range demand needs both bounds")
        return n, demand.high
    if demand.kind == "above":
        return n, 1.5 * n
    if demand.kind == "below":
        return 0.5 * n, n
    raise ValueError(f"length demand kind {demand.kind!r}: one of {', '.join(KINDS)} wanted")


def length_score(n: float, a: float, b: float) -> float:
    """1 inside [a, b]; max(2n/a - 1, 0) below a; max(3 - 2n/b, 0) above b."""
    if a <= n <= b:
        return 1.0
    if n < a:
        return max(2 * n / a - 1, 0.0)
    return max(3 - 2 * n / b, 0.0)


def item_demand(row: dict) -> LengthDemand:
    """A LonGen row's demand: from its `constraint` (by its `type`), else from its query."""
    kind = row.get("type")
    for text in (row.get("constraint") or "", row.get("query") or ""):
        demand = parse_length_demand(text, kind) if text else None
        if demand is not None:
            return demand
    raise ValueError(f"LonGen item without a length demand of type {kind!r}: {row.get('constraint')!r}")


def score_response(row: dict, response: str) -> dict:
    """Score one response to a LonGen row: words, window, score."""
    demand = item_demand(row)
    a, b = target_window(demand)
    words = count_words(response)
    return {"words": words, "low": a, "high": b, "score": length_score(words, a, b)}


def aggregate(rows: Iterable[dict]) -> dict:
    """Mean score overall and per type (plus per language and per LonGen range) of rows with `score`, `type`,
    `language`, `range`, `words`."""
    by: dict[str, dict[str, list[float]]] = {"type": defaultdict(list), "language": defaultdict(list),
                                              "range": defaultdict(list)}
    scores, words = [], []
    for row in rows:
        scores.append(row["score"])
        words.append(row["words"])
        for field, groups in by.items():
            if row.get(field) is not None:
                groups[row[field]].append(row["score"])

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {
        "items": len(scores),
        "overall": mean(scores),
        "byType": {k: mean(by["type"][k]) for k in KINDS if by["type"].get(k)},
        "byLanguage": {k: mean(v) for k, v in sorted(by["language"].items())},
        "byRange": {k: mean(v) for k, v in sorted(by["range"].items())},
        "averageWords": round(sum(words) / len(words), 2) if words else 0.0,
    }


def select_items(rows: list[dict], count: int, languages: list[str] | None = None) -> list[dict]:
    """`count` items spread evenly over the benchmark (LonGen lists its items in groups of ten per language, range
    and type, so an even spread keeps every group represented), after the language filter."""
    pool = [r for r in rows if not languages or r.get("language") in languages]
    if count >= len(pool):
        return pool
    return [pool[(i * len(pool)) // count] for i in range(count)]


def _step(x: float) -> int:
    """The largest 1, 2 or 5 times a power of ten that is at most x (1 below 1): round numbers for demands."""
    step = 1
    for power in range(12):
        for mantissa in (1, 2, 5):
            if mantissa * 10**power <= x:
                step = mantissa * 10**power
    return step


def demand_holds(demand: LengthDemand, words: int) -> bool:
    """The demand is literally true of `words` (more than N: > N, fewer than N: < N) and `words` lies in its
    LonGen target window, so the pair teaches the demand and scores 1 on it."""
    a, b = target_window(demand)
    literal = {"about": True, "range": True, "above": words > demand.low, "below": words < demand.low}[demand.kind]
    return literal and a <= words <= b


def true_demand(words: int, kind: str) -> LengthDemand:
    """A length demand of the given kind, in round numbers, that a response of `words` words meets (see
    demand_holds): about N (N rounded to ~10%), N-M (bounds on a ~20% grid around it), more than N (N ~0.8 of
    it), fewer than N (N ~1.25 of it). Needs 10 words or more, below which no round 'more than' is in window."""
    if words < 10:
        raise ValueError(f"words {words}: 10 or more wanted for a length demand")
    fine = _step(words / 10)
    if kind == "about":
        demand = LengthDemand("about", float(round(words / fine) * fine))
    elif kind == "range":
        coarse = _step(words / 5)
        low, high = (words // coarse) * coarse, -(-words // coarse) * coarse
        if low == high:  # on the grid: one step above, so the count is not on both bounds
            high += coarse
        demand = LengthDemand("range", float(low), float(high))
    elif kind == "above":
        demand = LengthDemand("above", float(int(0.8 * words / fine) * fine))
    elif kind == "below":
        demand = LengthDemand("below", float(-(-int(1.25 * words) // fine) * fine))
    else:
        raise ValueError(f"length demand kind {kind!r}: one of {', '.join(KINDS)} wanted")
    if not demand_holds(demand, words):  # the arithmetic above guarantees it; a cheap check that it stays so
        raise AssertionError(f"length demand {demand} does not hold for {words} words")
    return demand


# A length an instruction states of its own ("in 300 words", "a 2,000-word essay", "five hundred words", "a
# 10-page report", "三千字", "500字左右"): self-instruct leaves such instructions out (the Generator's SFT set pairs
# each with an answer 1.2x longer or more, which would teach it to ignore length demands), and collect adds its
# demand only to instructions without one.
_OWN_LENGTH = re.compile(
    r"\d[\d,，]*\s*(?:k\b)?\s*-?\s*(?:words?|characters?|pages?|sentences?|tokens?)\b"
    r"|(?:hundred|thousand)\s*-?\s*(?:words?|characters?|pages?)\b"
    r"|\d[\d,，]*\s*(?:字|页|句)|[一二两三四五六七八九十百千万]+\s*(?:字|页)", re.I)


def has_own_length(instruction: str) -> bool:
    """True when the instruction states a length of its own (a count of words, characters or pages, or a demand
    LonGen's parser reads)."""
    return _OWN_LENGTH.search(instruction) is not None or parse_length_demand(instruction) is not None

