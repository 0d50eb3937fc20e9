"""The training data: SFT rows encoded with the tokenizer's chat template, the loss masked to the assistant turns,
fitted to training.cutoffTokens (pipeline/training.py trains on them)."""

from __future__ import annotations

from .layout import PART
from .store import Store, read_jsonl

IGNORE_INDEX = -100


class TrainingError(RuntimeError):
    """A training stage cannot run: no data, no chat template, a missing start model (the message says which)."""


def encode_conversation(tokenizer, messages: list[dict], cutoff: int | None = None) -> dict | None:
    """Token ids of the conversation rendered by the tokenizer's chat template, and labels that equal the ids on
    the assistant turns (their content and the template's end-of-turn after it) and IGNORE_INDEX elsewhere.

    Each assistant turn spans from the end of the rendering of the messages before it with the generation prompt
    to the end of the rendering that includes it; character offsets map those spans onto tokens, so a token merge
    across the boundary cannot shift the mask. With `cutoff`, fit_cutoff applies (the answer is never cut); None
    when the conversation has no label or does not fit. `prompt_span` is the token range of the content of the
    user turn before the first answer: the part fit_cutoff may shorten."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise TrainingError("the chat template does not render conversations prefix by prefix; cannot mask")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, _end) in enumerate(offsets):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    # the user content before the first answer, located in the rendering (its last occurrence before the answer)
    first = spans[0][0]
    users = [m for m in messages[: next(i for i, m in enumerate(messages) if m["role"] == "assistant")]
             if m["role"] == "user" and m.get("content")]
    span = (0, 0)
    if users:
        start = full.rfind(users[-1]["content"], 0, first)
        if start >= 0:
            end = start + len(users[-1]["content"])
            inside = [t for t, (a, _b) in enumerate(offsets) if start <= a < end]
            span = (inside[0], inside[-1] + 1) if inside else (0, 0)
    ex = {"input_ids": ids, "labels": labels, "prompt_span": span}
    return fit_cutoff(ex, cutoff)[0] if cutoff else ex


def fit_cutoff(ex: dict, cutoff: int) -> tuple[dict | None, str]:
    """An example of at most `cutoff` tokens whose answer is whole (with its end-of-turn): the reference's
    truncation cut the longest answers, the very examples the method exists for. Returns (example, outcome):
    "fits"; "prompt-cut", the end of the user content removed (for the Extender set, the end of the initial
    answer it is shown; one content token at least is kept); "dropped" (None) when even that cannot fit."""
    ids, labels = ex["input_ids"], ex["labels"]
    excess = len(ids) - cutoff
    if excess <= 0:
        return ex, "fits"
    a, b = ex.get("prompt_span", (0, 0))
    if b - a - excess < 1:
        return None, "dropped"
    keep = lambda seq: list(seq[: b - excess]) + list(seq[b:])  # noqa: E731
    return {"input_ids": keep(ids), "labels": keep(labels), "prompt_span": (a, b - excess)}, "prompt-cut"


def load_examples(store: Store, prefix: str, tokenizer, cutoff: int,
                  keep=None) -> tuple[list[dict], dict]:
    """Tokenized examples from the part-*.jsonl files right under prefix (not a stage's work/ shards), with
    counts: skipped (no answer), over `cutoff` with the prompt cut (promptCut), over it even so and left out
    (droppedOverLength); no answer is cut. keep(row) picks the rows used (default: all)."""
    import numpy as np

    keys = [k for k in store.list(prefix) if PART.fullmatch(k[len(prefix) + 1:])]
    examples, rows, skipped = [], 0, 0
    outcomes = {"fits": 0, "prompt-cut": 0, "dropped": 0}
    for key in keys:
        for row in read_jsonl(store, key):
            if keep is not None and not keep(row):
                continue
            rows += 1
            ex = encode_conversation(tokenizer, row["messages"], None)
            if ex is None:
                skipped += 1
                continue
            ex, outcome = fit_cutoff(ex, cutoff)
            outcomes[outcome] += 1
            if ex is None:
                continue
            # int32 arrays, not lists of Python ints: a 60M-token set then takes ~0.5 GB per rank, not ~4 GB
            examples.append({"input_ids": np.asarray(ex["input_ids"], dtype=np.int32),
                             "labels": np.asarray(ex["labels"], dtype=np.int32)})
    tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, {"rows": rows, "examples": len(examples), "skipped": skipped,
                      "promptCut": outcomes["prompt-cut"], "droppedOverLength": outcomes["dropped"],
                      "tokens": tokens}
