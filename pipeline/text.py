"""Pure text helpers of the method: word counts, response checks, language detection, drop_short.

Behaviour follows the authors' reference implementation (Quan et al., arXiv 2410.23933), with its bugs fixed:
the check flavour is chosen by the language of the text, and drop_short is seeded and O(n log n).
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Sequence

# CJK ideographs, CJK symbols/punctuation, full-width forms: each counts as one word.
_CJK = "\u4e00-\u9fff\u3000-\u303f\uff00-\uffef"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_IDEOGRAPH = re.compile("[\u4e00-\u9fff]")
_ASCII_RUN = re.compile(r"[\x00-\x7f]+")

EN_ENDINGS = tuple(".!?,;:-\"')]}>`")
ZH_ENDINGS = tuple("。！？…”’)]}>`）】》」』〕〉")
# Meta-talk (the model talking about its rewriting instead of writing), looked for in the first 2 and last 3
# lines. English: the reference's words, matched case-sensitively as the reference does ("Incident Response Plan"
# is a heading, "the revised response" is talk). Chinese: words about expanding or rewriting, an opening "here is
# ...", and an editor's note after a rule at the end.
META_WORDS = ("revised", "revision", "response", "version", "paragraph")
ZH_META_WORDS = ("扩写", "改写", "续写", "扩展后的", "修改后的", "润色后的", "重写")
ZH_META_OPENINGS = ("以下是", "下面是", "这是扩", "这是改", "好的，以下", "好的，下面", "好的，这是")
_RULE = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,}|—{2,}|={3,})\s*$")
ZH_NOTE_OPENINGS = ("注：", "注:", "注释", "说明", "备注", "编者", "附注", "修改说明", "扩写说明")
EN_NGRAM = 10
ZH_NGRAM = 13


def count_words(text: str) -> int:
    """CJK characters count one each; the rest counts whitespace-separated tokens."""
    if _CJK_CHAR.search(text) is None:  # the common case, without the substitution pass
        return len(text.split())
    cjk = len(_CJK_CHAR.findall(text))
    return cjk + len(_CJK_CHAR.sub(" ", text).split())


def detect_language(text: str) -> str:
    """'zh' when at least a fifth of the non-space characters are CJK ideographs, else 'en'."""
    if _IDEOGRAPH.search(text) is None:
        return "en"
    nonspace = sum(map(len, text.split()))  # str.split() splits on exactly the characters str.isspace() accepts
    return "zh" if len(_IDEOGRAPH.findall(text)) * 5 >= nonspace else "en"


def _has_repeated_ngram(tokens: Sequence[str], n: int) -> bool:
    """True when some n-gram (n >= 1) occurs twice. The n-grams are built and hashed in C (zip, set): no early
    exit, but several times faster than a Python loop over positions for texts that pass."""
    grams = list(zip(*(tokens[i:] for i in range(n))))
    return len(set(grams)) < len(grams)


def zh_tokens(text: str) -> list[str]:
    """Chinese-flavour tokens: each non-ASCII character, with every run of ASCII characters merged into one."""
    tokens: list[str] = []
    pos = 0
    for m in _ASCII_RUN.finditer(text):
        tokens.extend(c for c in text[pos : m.start()] if not c.isspace())
        if m.group().strip():
            tokens.append(m.group())
        pos = m.end()
    tokens.extend(c for c in text[pos:] if not c.isspace())
    return tokens


def check_response(
    text: str,
    *,
    check_ending: bool = True,
    check_meta: bool = True,
    en_ngram: int = EN_NGRAM,
    zh_ngram: int = ZH_NGRAM,
) -> str | None:
    """Return None when the response passes, else the rejection reason.

    Reasons: "empty", "ending", "meta-talk", "repetition". The flavour (English or Chinese) is picked by the
    language of the text itself, so an English answer is never judged by the Chinese rules.
    """
    stripped = text.strip()
    if not stripped:
        return "empty"
    lines = [line.strip() for line in stripped.splitlines() if line.strip()]
    if detect_language(stripped) == "zh":
        if check_ending and not stripped.endswith(ZH_ENDINGS + EN_ENDINGS):
            return "ending"
        if check_meta and _zh_meta_talk(lines):
            return "meta-talk"
        if zh_ngram > 0 and _has_repeated_ngram(zh_tokens(stripped), zh_ngram):
            return "repetition"
        return None
    if check_ending and not stripped.endswith(EN_ENDINGS):
        return "ending"
    if check_meta:
        edge = " ".join(lines[:2] + lines[-3:])  # case-sensitive, as the reference
        if any(word in edge for word in META_WORDS):
            return "meta-talk"
    if en_ngram > 0 and _has_repeated_ngram(stripped.split(), en_ngram):
        return "repetition"
    return None


def _zh_meta_talk(lines: list[str]) -> bool:
    """Chinese meta-talk: rewriting words in the first 2 or last 3 lines, an opening "以下是…" (here is ...), or a
    note after a horizontal rule among the last lines (an editor's remark appended to the text)."""
    edge = "".join(lines[:2] + lines[-3:])
    if any(word in edge for word in ZH_META_WORDS):
        return True
    if lines and lines[0].lstrip("#*> ").startswith(ZH_META_OPENINGS):
        return True
    tail = lines[-4:]
    for i, line in enumerate(tail[:-1]):
        if _RULE.match(line) and tail[i + 1].lstrip("#>*（(【[ ").startswith(ZH_NOTE_OPENINGS):
            return True
    return False


def drop_short_mask(lengths: Sequence[int], seed: int) -> list[bool]:
    """Which items drop_short keeps: rank r = 1 - pos/n, pos the first index of the item's length in the
    ascending sorted lengths; keep when uniform(0, 1) > 2 r^3. One uniform draw per item, in item order."""
    n = len(lengths)
    ordered = sorted(lengths)
    rng = random.Random(seed)
    keep = []
    for length in lengths:
        rank = 1.0 - bisect.bisect_left(ordered, length) / n
        keep.append(rng.random() > 2 * rank**3)
    return keep


def drop_short(items: Sequence[dict], key: str, seed: int) -> list[dict]:
    """Randomly drop short items, keeping longer ones more often (seeded, O(n log n))."""
    mask = drop_short_mask([count_words(item[key]) for item in items], seed)
    return [item for item, kept in zip(items, mask) if kept]


def split_paragraphs(text: str) -> tuple[list[str], str]:
    """Paragraphs by blank lines, or by single lines when that gives two or fewer; returns them with the
    separator that joins them back."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if len(paragraphs) <= 2:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if len(lines) > len(paragraphs):
            return lines, "\n"
    return paragraphs, "\n\n"
