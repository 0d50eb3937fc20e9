"""Packaged data: seed instructions and the LonGen benchmark (see README.md here for source and license)."""

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
