"""What the simulated vLLM writes: deterministic, seeded answers that the pipeline's filters accept in a
realistic share.

Output lengths are drawn from a distribution seeded by the request (its `seed`, else a hash of its body); text is
sentences of words taken from the packaged seed data ending with '.', in paragraphs, with a few truncated /
meta-talk / repeating answers, extensions that grow, few-shot instruction completions with vLLM's stop strings,
and vLLM's 400 for a request over the context. One token is one word (plus 4 per message for the chat template).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from functools import cache

from .sim_engine import SimModel


@cache
def vocabulary() -> tuple[str, ...]:
    """Lower-case words of the packaged English seed instructions and LonGen queries."""
    from selflengthen.pipeline.data import load_longen, load_seed_instructions

    texts = [r["prompt"] for r in load_seed_instructions("en")] + [r["query"] for r in load_longen()]
    words = {w for t in texts for w in re.findall(r"[a-z]{2,}", t.lower())}
    meta = ("revised", "revision", "response", "version", "paragraph")  # the meta-talk check looks for substrings
    return tuple(sorted(w for w in words if not any(m in w for m in meta)))


@cache
def _markers() -> dict[str, str]:
    from selflengthen.pipeline import prompts

    extend = prompts.render("en", "extend", instruction="\x00I", response="\x00R")
    judge = prompts.render("en", "judge", instruction="\x00I")
    return {"answer": extend[extend.index("\x00I") + 2 : extend.index("\x00R")],
            "extend_head": extend[: extend.index("\x00I")][:60], "judge_head": judge[: judge.index("\x00I")][:60]}


_ITEM = re.compile(r"(?:Request|请求)\s*(\d+)\s*[:：]\s*$")


@cache
def sentence_bank(size: int = 50_000) -> tuple[list[str], list[int]]:
    """Sentences of 8-18 random vocabulary words ending with '.', drawn once (seeded): answers are runs of
    consecutive bank sentences from a random start, so a text never repeats a 10-gram and costs no sampling."""
    rng, vocab = random.Random(12345), vocabulary()
    texts, counts = [], []
    for _ in range(size):
        k = rng.randint(8, 18)
        texts.append(" ".join(rng.choices(vocab, k=k)).capitalize() + ".")
        counts.append(k)
    return texts, counts


def _sentences(rng: random.Random, words: int) -> list[str]:
    """Sentences with exactly `words` words in all (the last one cut short if needed)."""
    texts, counts = sentence_bank()
    i = rng.randrange(len(texts))
    out = []
    while words > 0:
        if counts[i] <= words:
            out.append(texts[i])
            words -= counts[i]
        else:
            out.append(" ".join(texts[i].split()[:words]).rstrip(".") + ".")
            words = 0
        i = (i + 1) % len(texts)
    return out


def prose(rng: random.Random, words: int) -> str:
    """Paragraphs of 2-5 sentences separated by blank lines, `words` words in all, ending with '.'."""
    sentences = _sentences(rng, max(1, words))
    paragraphs, i = [], 0
    while i < len(sentences):
        k = rng.randint(2, 5)
        paragraphs.append(" ".join(sentences[i : i + k]))
        i += k
    return "\n\n".join(paragraphs)


def _answer(rng: random.Random, m: SimModel, words: int, max_tokens: int) -> tuple[str, int, str]:
    """Prose of about `words` words, possibly flawed, truncated at max_tokens: (text, tokens, finish_reason)."""
    words = max(4, words)
    finish = "stop"
    if words > max_tokens:
        words, finish = max_tokens, "length"
    text = prose(rng, words)
    if finish == "length" or rng.random() < m.bad_rate:
        flaw = "truncated" if finish == "length" else rng.choice(("truncated", "meta", "repeat"))
        if flaw == "truncated":  # cut mid-sentence: no closing mark
            text = text.rstrip(".")
        elif flaw == "meta":
            text = "Here is the revised version of the answer.\n\n" + text
            words += 8
        else:
            head = text.split()[:12]
            text = text + "\n\n" + " ".join(head) + "."
            words += len(head)
    return text, words, finish


def _seed_of(body: dict, raw: bytes) -> int:
    if isinstance(body.get("seed"), int):
        return body["seed"]
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


def _apply_stop(text: str, tokens: int, stop: object, max_tokens: int) -> tuple[str, int, str]:
    """vLLM's stop strings: the text ends before the first one (tokens counted up to there); else "length" when
    the text used all of max_tokens."""
    stops = [s for s in (stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []) if s]
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        text = text[: min(hits)]
        return text, max(1, len(text.split())), "stop"
    return text, tokens, "length" if tokens >= max_tokens else "stop"


def prompt_tokens_of(messages: list) -> int:
    """The simulated tokenizer: words of the contents plus 4 per message (the chat template's)."""
    return sum(len((msg.get("content") if isinstance(msg.get("content"), str) else "").split()) + 4
               for msg in messages if isinstance(msg, dict))


def context_refusal(m: SimModel, prompt_tokens: int, max_tokens: int) -> str | None:
    """vLLM's 400 message for a request that does not fit the context; None when it fits."""
    if max_tokens > m.max_model_len:
        return f"max_tokens={max_tokens} cannot be greater than max_model_len={m.max_model_len}."
    if prompt_tokens + max_tokens > m.max_model_len:
        return (f"This model's maximum context length is {m.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.")
    return None


def generate(m: SimModel, body: dict, raw: bytes) -> tuple[str, int, int, str, str]:
    """(text, completion_tokens, prompt_tokens, finish_reason, kind) for a chat request: deterministic in the
    request (model, seed, messages, max_tokens) and the model's seed."""
    messages = body.get("messages") or []
    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16384)
    rng = random.Random(_seed_of(body, raw) * 1_000_003 + m.seed)
    contents = [(msg.get("content") if isinstance(msg.get("content"), str) else "") for msg in messages]
    prompt_tokens = prompt_tokens_of(messages)
    if body.get("ignore_eos"):
        tokens = max_tokens
        return prose(rng, tokens), tokens, prompt_tokens, "length", "fixed"
    last = messages[-1] if messages else {}
    user = next((c for msg, c in zip(reversed(messages), reversed(contents)) if msg.get("role") == "user"), "")
    marks = _markers()
    continue_final = bool(body.get("continue_final_message")) and last.get("role") == "assistant"
    if continue_final and (item := _ITEM.search(contents[-1])):
        # Few-shot instruction completion: one new request on its line, then the next item opened (and, when the
        # model runs on, more items until a stop string or max_tokens).
        def one() -> int:
            return rng.randint(2, 3) if rng.random() < m.short_instruction_rate else rng.randint(*m.instruction_words)

        number = int(item.group(1))
        words = min(one(), max_tokens)
        text, tokens = " " + " ".join(_sentences(rng, words)), words
        while tokens < max_tokens:
            number += 1
            text += f"\nRequest {number}:"
            tokens += 2
            if not m.instruction_runs_on:
                break
            more = min(one(), max_tokens - tokens)
            text, tokens = text + " " + " ".join(_sentences(rng, max(1, more))), tokens + max(1, more)
        text, tokens, finish = _apply_stop(text, tokens, body.get("stop"), max_tokens)
        return text, tokens, prompt_tokens, finish, "self-instruct"
    if user.startswith(marks["judge_head"]):
        return ("Yes." if rng.random() < m.judge_yes_rate else "No."), 1, prompt_tokens, "stop", "judge"
    if user.startswith(marks["extend_head"]) and marks["answer"] in user:
        answer_words = len(user[user.rindex(marks["answer"]) + len(marks["answer"]) :].split())
        if continue_final:  # the latter part: continue the forced prefix to a longer whole
            prefix_words = len(contents[-1].split())
            target = int(answer_words * rng.uniform(*m.latter_growth)) - prefix_words
            text, tokens, finish = _answer(rng, m, max(8, target), max_tokens)
            return "\n\n" + text, tokens, prompt_tokens, finish, "extend-latter"
        text, tokens, finish = _answer(rng, m, int(answer_words * rng.uniform(*m.former_growth)), max_tokens)
        return text, tokens, prompt_tokens, finish, "extend-former"
    words = int(math.exp(math.log(m.respond_median_words) + m.respond_sigma * rng.gauss(0, 1)))
    text, tokens, finish = _answer(rng, m, words, max_tokens)
    return text, tokens, prompt_tokens, finish, "respond"
