"""Our prompt templates, one file per prompt and language ($placeholders, string.Template)."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from string import Template

LANGUAGES = ("en", "zh")


@cache
def template(lang: str, name: str) -> Template:
    if lang not in LANGUAGES:
        raise ValueError(f"language {lang!r}: one of {', '.join(LANGUAGES)} wanted")
    return Template(files(__package__).joinpath(lang, f"{name}.txt").read_text(encoding="utf-8").strip())


def render(lang: str, name: str, **values: object) -> str:
    return template(lang, name).substitute(**values)


def self_instruct_messages(lang: str, examples: list[str]) -> list[dict]:
    """A chat whose assistant turn lists the examples and opens the next item: the model completes it."""
    items = [render(lang, "instruction_item", number=i + 1, instruction=ex.strip()) for i, ex in enumerate(examples)]
    opening = render(lang, "instruction_item", number=len(examples) + 1, instruction="").rstrip()
    return [
        {"role": "user", "content": render(lang, "self_instruct")},
        {"role": "assistant", "content": "\n".join(items + [opening])},
    ]


def item_label(lang: str, number: int) -> str:
    """The label that opens item `number` of the list ("Request 4", "请求4"), without its colon."""
    return render(lang, "instruction_item", number=number, instruction="").strip().rstrip(":：").strip()


def instruction_stops(lang: str, examples: int) -> list[str]:
    """Stop strings of a self-instruct completion after `examples` examples: the label of the item after the one
    the model completes, so the server stops at the end of the instruction instead of listing more."""
    return [item_label(lang, examples + 2)]


# A numbered item's label at a line start (English or Chinese): where a listed instruction ends.
_NEXT_ITEM = re.compile(r"(?:^|\n)\s*\**\s*(?:Request|请求)\s*\d+\s*\**\s*[:：.]")


def lists_next_item(completion: str) -> bool:
    """True when the completion goes on past its instruction to a next numbered item."""
    return _NEXT_ITEM.search(completion.strip()) is not None


# A later line that talks about the list of requests rather than adding to the request: small models go on with
# "Refer", "Requirement 4: ...", "Please add your own requests to this list" (measured on SmolLM2: 9 of 20 made in
# make demo). Such a line, and everything after it, is not part of the instruction.
_LIST_TALK = re.compile(r"^\W*(?:refer\b|requirements?\s*\d|requested\b|please add\b|note\s*:)|\brequests?\b|请求",
                        re.IGNORECASE)


def parse_instruction(completion: str) -> str:
    """The completed item, whole (an instruction may span several lines), up to a following numbered item (a
    server that ignored the stop string may have gone on listing) or a line about the list itself (_LIST_TALK)."""
    text = _NEXT_ITEM.split(completion.strip(), maxsplit=1)[0]
    lines = [line.rstrip() for line in text.strip().splitlines()]
    talk = next((i for i, line in enumerate(lines) if i and _LIST_TALK.search(line)), len(lines))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines[:talk]).strip())


def parse_judgement(answer: str) -> bool:
    """True for a yes (English or Chinese) at the start of the answer."""
    head = answer.strip().lower().lstrip("*\"'「“ ")
    return head.startswith(("yes", "是", "会", "对"))


@cache
def length_demands(lang: str) -> dict[str, tuple[Template, ...]]:
    """The length-demand phrasings of a language (length_demands.txt: "type | template" lines), by type."""
    if lang not in LANGUAGES:
        raise ValueError(f"language {lang!r}: one of {', '.join(LANGUAGES)} wanted")
    text = files(__package__).joinpath(lang, "length_demands.txt").read_text(encoding="utf-8")
    found: dict[str, list[Template]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        kind, sep, phrasing = line.partition("|")
        if not sep or not phrasing.strip():
            raise ValueError(f"{lang}/length_demands.txt line {number}: 'type | template' wanted")
        found.setdefault(kind.strip(), []).append(Template(phrasing.strip().replace("\\n", "\n")))
    return {kind: tuple(templates) for kind, templates in found.items()}
