"""Near-duplicate detection for the self-instruct pool: rapidfuzz's normalized Indel ratio (fuzz.ratio) of one text
against the pooled ones, with the pool bucketed by length so that a check compares only the texts long enough and
short enough to reach the threshold (a ratio >= t needs the lengths within a factor (2 - t) / t of each other)."""

from __future__ import annotations

import math
from collections import defaultdict

from rapidfuzz import fuzz, process


class NearDuplicates:
    def __init__(self, threshold: float, texts: list[str] = ()):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold {threshold}: 0 < threshold <= 1 wanted")
        self.threshold = threshold
        self._by_length: dict[int, list[str]] = defaultdict(list)
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self._by_length[len(text)].append(text)

    def remove(self, text: str) -> None:
        bucket = self._by_length.get(len(text))
        if bucket and text in bucket:
            bucket.remove(text)

    def find(self, text: str) -> str | None:
        """A pooled text at least `threshold` similar to this one (None when there is none)."""
        t, n = self.threshold, len(text)
        low, high = math.floor(n * t / (2 - t)), math.ceil(n * (2 - t) / t)
        candidates = [c for length in range(low, high + 1) for c in self._by_length.get(length, ())]
        if not candidates:
            return None
        found = process.extractOne(text, candidates, scorer=fuzz.ratio, score_cutoff=100 * t)
        return found[0] if found else None
