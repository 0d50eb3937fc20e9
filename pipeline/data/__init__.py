"""Packaged data: seed instructions and the LonGen, LongBench-Write and LongWrite-Ruler benchmarks (see README.md
here for their sources and licenses)."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path


def _read_jsonl(text: str, source: str, field: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field].strip():
            raise ValueError(f"{source} line {number}: an object with a non-empty string {field!r} wanted")
        rows.append(row)
    if not rows:
        raise ValueError(f"{source}: empty (no JSON lines with a {field!r})")
    return rows


def load_seed_instructions(lang: str, path: str | None = None) -> list[dict]:
    """Seed instructions ({"prompt": ...}) from a user file or the packaged ones for the language."""
    if path:
        try:
            raw = Path(path).read_bytes()
        except OSError as err:
            raise ValueError(f"seed file {path}: cannot be read ({err.strerror or err})") from None
        try:
            text = raw.decode("utf-8-sig")  # a leading byte-order mark (some editors write one) is no error
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise ValueError(f"seed file {path} line {line}: not UTF-8 text (byte {raw[err.start]:#04x})") from None
        return _read_jsonl(text, f"seed file {path}", "prompt")
    name = f"seed_instructions_{lang}.jsonl"
    return _read_jsonl(files(__package__).joinpath(name).read_text(encoding="utf-8"), name, "prompt")


def load_longen() -> list[dict]:
    return _read_jsonl(files(__package__).joinpath("LonGen.jsonl").read_text(encoding="utf-8"), "LonGen.jsonl", "query")


def load_heldout(languages: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """The held-out prompts ({"id", "language", "prompt"}), in file order, of the given languages (default: all)."""
    rows = _read_jsonl(files(__package__).joinpath("heldout.jsonl").read_text(encoding="utf-8"), "heldout.jsonl",
                       "prompt")
    return [r for r in rows if not languages or r["language"] in languages]


def _load_length_benchmark(name: str) -> list[dict]:
    rows = _read_jsonl(files(__package__).joinpath(name).read_text(encoding="utf-8"), name, "prompt")
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("length"), int) or row["length"] <= 0:
            raise ValueError(f"{name} row {number}: a positive integer 'length' wanted")
    return rows


def load_longbench_write() -> list[dict]:
    """LongBench-Write (LongWriter): {prompt, type (genre), length (required length)}, 120 rows."""
    return _load_length_benchmark("longbench_write.jsonl")


def load_longwrite_ruler() -> list[dict]:
    """LongWrite-Ruler (LongWriter): {prompt, type, length (1,000 to 30,000 asked for)}, 48 rows."""
    return _load_length_benchmark("longwrite_ruler.jsonl")
