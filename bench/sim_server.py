"""A simulated vLLM: a deterministic, seeded OpenAI-compatible server on loopback for the saturation benchmark.

What it models (SimModel, all in *simulated* seconds; `time_scale` real seconds per simulated second):
- continuous batching: at most `max_num_seqs` requests are admitted, the rest wait in a FIFO queue; with
  `kv_cache_tokens` set, a request is admitted only when the KV cache has room for its whole length (prompt +
  output, reserved at admission as bench/cluster.py's replicas do: no preemption), first come first served (the
  queue's head blocks the rest, as vLLM's FCFS scheduler);
- an admitted request first prefills (`ttft_base_s + prompt_tokens / prefill_tokens_per_s`, a pure delay), then
  decodes; every decoding request advances at the same per-request rate r(n) = T(n) / n, n the number decoding;
- aggregate decode throughput T(n) = peak * min(1, n / saturation) ** curve: it rises with concurrency up to the
  saturation point, then plateaus (latency then grows linearly with load);
- output lengths drawn from a distribution seeded by the request (its `seed`, else a hash of its body), and text
  built so that the pipeline's filters accept a realistic share: sentences of words taken from the packaged seed
  data ending with '.', paragraphs, a few truncated / meta-talk / repeating answers, extensions that grow.

Processor sharing is simulated exactly with a virtual clock (tokens each decoding request has received): a
request that starts decoding at virtual time V with L tokens to go finishes at virtual time V + L; one timer for
the earliest finish. Events cost O(log n).

Endpoints: POST /v1/chat/completions (also "stream": true, as a whole SSE body once done), GET /v1/models,
GET /health, GET /metrics (vLLM's scheduler gauges under vLLM's names: vllm:num_requests_running, admitted;
vllm:num_requests_waiting; vllm:kv_cache_usage_perc, the KV cache's used share 0-1: prompts and tokens decoded so
far of the admitted requests), GET /sim/stats (tokens, requests, time-weighted concurrency), POST /sim/reset.

Run it with SimServer (a subprocess on a free port, a context manager), or `python bench/sim_server.py --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SimModel:
    """A vLLM server on one GPU serving a 7B-class model, in simulated time."""

    peak_tokens_per_s: float = 2500.0  # aggregate decode throughput at and beyond saturation
    saturation: int = 64  # decoding requests at which throughput stops rising
    curve: float = 0.6  # T(n) = peak * min(1, n/saturation)**curve: one request alone gets peak/saturation**curve
    max_num_seqs: int = 256  # admitted (prefilling + decoding) at most; more wait in FIFO order
    kv_cache_tokens: int | None = None  # KV-cache capacity in tokens (None: unbounded, max_num_seqs alone admits)
    ttft_base_s: float = 0.03
    prefill_tokens_per_s: float = 20000.0
    time_scale: float = 0.05  # real seconds per simulated second
    seed: int = 0
    # what the "model" writes (one token = one word)
    respond_median_words: int = 180
    respond_sigma: float = 0.45  # lognormal spread of answer lengths
    bad_rate: float = 0.12  # share of answers that fail a filter (truncated, meta-talk, repetition)
    instruction_words: tuple[int, int] = (12, 40)
    short_instruction_rate: float = 0.08  # instructions of 2-3 words (rejected by the length bounds)
    judge_yes_rate: float = 0.85
    former_growth: tuple[float, float] = (1.3, 2.0)  # enriched first half / first half
    latter_growth: tuple[float, float] = (1.05, 1.5)  # whole candidate / current text
    error_rate: float = 0.0  # share of requests answered 503 (to exercise retries)
    # The context (vLLM --max-model-len, listed in /v1/models): as strict as vLLM's strictest versions, a request
    # whose prompt + max_tokens exceeds it is answered 400. Tokens are words, plus 4 per message.
    max_model_len: int = 32768
    # Few-shot instruction completion: False, the model writes one item and opens the next ("Request N:"), then
    # stops; True, as a chat model listing requests does, it goes on writing items until a stop string or
    # max_tokens (what self-instruct without stop strings pays for).
    instruction_runs_on: bool = False

    def throughput(self, n: int) -> float:
        """Aggregate decode tokens per simulated second with n requests decoding."""
        if n <= 0:
            return 0.0
        return self.peak_tokens_per_s * min(1.0, n / self.saturation) ** self.curve

    def best_concurrency(self) -> int:
        return self.saturation

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SimModel:
        data = json.loads(text)
        for f in fields(cls):
            if f.name in data and isinstance(data[f.name], list):
                data[f.name] = tuple(data[f.name])
        return cls(**data)


# -- the engine: admission, prefill, processor-shared decoding ------------------------------------------------------


@dataclass
class EngineStats:
    requests: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    errors: int = 0
    refused: int = 0  # requests answered 400: over the context
    by_kind: dict = field(default_factory=dict)
    first_arrival: float | None = None  # real loop time
    last_finish: float | None = None
    decoded_area: float = 0.0  # tokens decoded (integral of T(n) dt), as a check of the accounting
    busy_time: float = 0.0  # real seconds with at least one request decoding
    saturated_time: float = 0.0  # real seconds with n >= saturation decoding
    concurrency_area: float = 0.0  # integral of n_decoding dt
    admitted_area: float = 0.0  # integral of n_admitted dt
    waiting_area: float = 0.0  # integral of queue length dt


class Engine:
    """A discrete-event simulation that catches up with the real clock whenever it is looked at.

    Events (prefill ends, decode finishes) are processed in simulated-time order even when the timer that
    announces them fires late (a busy machine), so the server's capacity is exactly the model's; only the
    answers reach the clients late by the event loop's lag, as a real server's would."""

    def __init__(self, model: SimModel):
        self.m = model
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time()  # simulation time (real-time units), <= loop.time()
        self.vtime = 0.0  # tokens received by a request that has been decoding all along
        self.finishes: list[tuple[float, int, list]] = []  # (virtual finish, seq, request)
        self.prefills: list[tuple[float, int, list]] = []  # (clock at prefill end, seq, request)
        self.seq = 0
        self.admitted = 0
        self.decoding = 0
        self.waiting: deque[list] = deque()
        self.reserved = 0  # KV tokens reserved by the admitted requests (prompt + output each)
        self.kv_prompt = 0  # prompt tokens of the admitted requests (in the KV cache from admission)
        self.decode_starts = 0.0  # sum of the virtual times at which the decoding requests started
        self.timer: asyncio.TimerHandle | None = None
        self.stats = EngineStats()

    def reset(self) -> None:
        self.advance()
        self.stats = EngineStats()

    def rate(self, n: int) -> float:
        """Tokens per *real* second each of n decoding requests receives."""
        return self.m.throughput(n) / n / self.m.time_scale

    def _integrate(self, until: float) -> None:
        dt = until - self.clock
        if dt <= 0:
            return
        s, n = self.stats, self.decoding
        if n:
            self.vtime += self.rate(n) * dt
            s.decoded_area += self.m.throughput(n) / self.m.time_scale * dt
            s.busy_time += dt
            s.concurrency_area += n * dt
            if n >= self.m.saturation:
                s.saturated_time += dt
        s.admitted_area += self.admitted * dt
        s.waiting_area += len(self.waiting) * dt
        self.clock = until

    def _next_finish_time(self) -> float:
        if not self.finishes:
            return math.inf
        return self.clock + max(0.0, self.finishes[0][0] - self.vtime) / self.rate(self.decoding)

    def advance(self) -> None:
        """Process every event due by now, in simulated order."""
        now = self.loop.time()
        while True:
            t_prefill = self.prefills[0][0] if self.prefills else math.inf
            t_finish = self._next_finish_time()
            t = min(t_prefill, t_finish)
            if t > now:
                break
            self._integrate(t)
            if t_finish <= t_prefill:
                _, _, req = heapq.heappop(self.finishes)
                self.decoding -= 1
                self._finish(req)
            else:
                _, _, req = heapq.heappop(self.prefills)
                self._start_decode(req)
        self._integrate(now)

    def _schedule(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        t = min(self.prefills[0][0] if self.prefills else math.inf, self._next_finish_time())
        self.timer = None if t == math.inf else self.loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.advance()
        self._schedule()

    def submit(self, prompt_tokens: int, output_tokens: int, kind: str) -> asyncio.Future:
        self.advance()
        s = self.stats
        if s.first_arrival is None:
            s.first_arrival = self.clock
        s.requests += 1
        s.prompt_tokens += prompt_tokens
        s.completion_tokens += output_tokens
        s.by_kind[kind] = s.by_kind.get(kind, 0) + 1
        fut = self.loop.create_future()
        req = [prompt_tokens, output_tokens, fut, 0.0]  # 0.0: the virtual time its decoding starts
        if not self.waiting and self._fits(req):
            self._admit(req)
        else:
            self.waiting.append(req)
        self._schedule()
        return fut

    def _fits(self, req: list) -> bool:
        """Room for one more: a sequence slot, and KV room for its whole length (a lone request always fits)."""
        if self.admitted >= self.m.max_num_seqs:
            return False
        kv = self.m.kv_cache_tokens
        return kv is None or self.admitted == 0 or self.reserved + req[0] + req[1] <= kv

    def kv_usage(self) -> float:
        """The KV cache's used share: the admitted requests' prompts and the tokens they have decoded so far."""
        kv = self.m.kv_cache_tokens
        if not kv:
            return 0.0
        decoded = self.decoding * self.vtime - self.decode_starts if self.decoding else 0.0
        return max(0.0, min(1.0, (self.kv_prompt + decoded) / kv))

    def _admit(self, req: list) -> None:
        self.admitted += 1
        self.reserved += req[0] + req[1]
        self.kv_prompt += req[0]
        prefill = (self.m.ttft_base_s + req[0] / self.m.prefill_tokens_per_s) * self.m.time_scale
        self.seq += 1
        heapq.heappush(self.prefills, (self.clock + prefill, self.seq, req))

    def _start_decode(self, req: list) -> None:
        if req[1] <= 0:
            self._finish(req)
            return
        self.decoding += 1
        self.seq += 1
        req[3] = self.vtime
        self.decode_starts += self.vtime
        heapq.heappush(self.finishes, (self.vtime + req[1], self.seq, req))

    def _finish(self, req: list) -> None:
        self.admitted -= 1
        self.reserved -= req[0] + req[1]
        self.kv_prompt -= req[0]
        if req[1] > 0:  # it decoded: its tokens leave the cache with it
            self.decode_starts -= req[3]
        self.stats.last_finish = self.clock
        if not req[2].done():
            req[2].set_result(None)
        while self.waiting and self._fits(self.waiting[0]):
            self._admit(self.waiting.popleft())

    def snapshot(self) -> dict:
        self.advance()
        s = self.stats
        span = (s.last_finish - s.first_arrival) if s.first_arrival is not None and s.last_finish else 0.0
        return {
            "requests": s.requests,
            "errors": s.errors,
            "refused": s.refused,
            "completionTokens": s.completion_tokens,
            "promptTokens": s.prompt_tokens,
            "byKind": dict(s.by_kind),
            "spanSeconds": span,
            "busySeconds": s.busy_time,
            "saturatedSeconds": s.saturated_time,
            "decodedTokens": s.decoded_area,
            "meanDecoding": s.concurrency_area / span if span else 0.0,
            "meanAdmitted": s.admitted_area / span if span else 0.0,
            "meanWaiting": s.waiting_area / span if span else 0.0,
            "decodingArea": s.concurrency_area,  # integrals over real time, for means over any interval
            "admittedArea": s.admitted_area,
            "peakTokensPerSecond": self.m.peak_tokens_per_s / self.m.time_scale,
        }


# -- what the "model" writes ----------------------------------------------------------------------------------------


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


# -- HTTP/1.1 with keep-alive on asyncio streams ----------------------------------------------------------------------


class SimHTTP:
    def __init__(self, model: SimModel, served: tuple[str, ...] = ("generator", "extender", "base")):
        self.model = model
        self.served = served
        self.engine: Engine | None = None
        self.error_rng = random.Random(model.seed + 17)
        self.ids = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                status, ctype, payload = await self.route(method, path.split("?", 1)[0], raw)
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                    f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + payload
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def route(self, method: str, path: str, raw: bytes) -> tuple[str, str, bytes]:
        if path == "/health":
            return "200 OK", "text/plain", b""
        if path == "/v1/models":
            data = [{"id": name, "object": "model", "owned_by": "sim", "max_model_len": self.model.max_model_len}
                    for name in self.served]
            return "200 OK", "application/json", json.dumps({"object": "list", "data": data}).encode()
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", self.metrics().encode()
        if path == "/sim/stats":
            return "200 OK", "application/json", json.dumps(self.engine.snapshot()).encode()
        if path == "/sim/reset" and method == "POST":
            self.engine.reset()
            return "200 OK", "application/json", b"{}"
        if path == "/v1/chat/completions" and method == "POST":
            return await self.chat(raw)
        if path == "/tokenize" and method == "POST":  # vLLM's, beside /v1: a chat prompt's tokens
            body = json.loads(raw)
            count = prompt_tokens_of(body.get("messages") or [])
            doc = {"count": count, "max_model_len": self.model.max_model_len, "tokens": []}
            return "200 OK", "application/json", json.dumps(doc).encode()
        return "404 Not Found", "application/json", b'{"error": {"message": "not found"}}'

    def metrics(self) -> str:
        """vLLM's scheduler gauges in Prometheus' text format, one series per served model as vLLM labels them."""
        e = self.engine
        e.advance()
        values = {"vllm:num_requests_running": e.admitted, "vllm:num_requests_waiting": len(e.waiting),
                  "vllm:kv_cache_usage_perc": e.kv_usage()}
        lines = []
        for name, value in values.items():
            lines.append(f"# TYPE {name} gauge")
            lines += [f'{name}{{engine="0",model_name="{model}"}} {float(value)}' for model in self.served[:1]]
        return "\n".join(lines) + "\n"

    async def chat(self, raw: bytes) -> tuple[str, str, bytes]:
        try:
            body = json.loads(raw)
        except ValueError:
            return "400 Bad Request", "application/json", b'{"error": {"message": "invalid JSON"}}'
        if body.get("model") not in self.served:
            return "404 Not Found", "application/json", b'{"error": {"message": "model not found"}}'
        if self.model.error_rate and self.error_rng.random() < self.model.error_rate:
            self.engine.stats.errors += 1
            return "503 Service Unavailable", "application/json", b'{"error": {"message": "overloaded"}}'
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16384
        refusal = context_refusal(self.model, prompt_tokens_of(body.get("messages") or []), int(max_tokens))
        if refusal:
            self.engine.stats.refused += 1
            return "400 Bad Request", "application/json", json.dumps({"object": "error", "message": refusal,
                                                                     "code": 400}).encode()
        text, tokens, prompt_tokens, finish, kind = generate(self.model, body, raw)
        await self.engine.submit(prompt_tokens, tokens, kind)
        self.ids += 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        rid, created = f"chatcmpl-sim-{self.ids}", int(time.time())
        if body.get("stream"):  # the whole event stream at once, after the simulated latency
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": finish}]}
            events = [chunk, {"id": rid, "object": "chat.completion.chunk", "created": created,
                              "model": body["model"], "choices": [], "usage": usage}]
            payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return "200 OK", "text/event-stream", payload.encode()
        answer = {"id": rid, "object": "chat.completion", "created": created, "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish}],
                  "usage": usage}
        return "200 OK", "application/json", json.dumps(answer).encode()

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        self.engine = Engine(self.model)
        sentence_bank(), _markers()  # build before the first request
        server = await asyncio.start_server(self.handle, host, port, backlog=1024)
        if ready:
            ready.set()
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=SimModel().to_json(), help="SimModel as JSON")
    args = parser.parse_args(argv)
    model = SimModel.from_json(args.model)
    try:
        import uvloop  # a faster event loop (vLLM's dependency) when present: the server is not what we measure

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush
    try:
        runner(SimHTTP(model).serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


class SimServer:
    """The simulated server as a subprocess of its own (its CPU does not compete with the client's event loop
    for the GIL). `with SimServer(model) as sim: sim.endpoint`."""

    def __init__(self, model: SimModel | None = None, port: int = 0, host: str = "127.0.0.1"):
        from selflengthen.pipeline.serving import free_port

        self.model = model or SimModel()
        self.host = host  # any loopback address (127.0.0.2, ...): replicas on one port, as pods behind a Service
        self.port = port or free_port()
        self.base = f"http://{host}:{self.port}"
        self.endpoint = f"{self.base}/v1"
        self.process: subprocess.Popen | None = None

    def start(self) -> SimServer:
        import httpx

        code = f"import sys; sys.path.append({str(ROOT)!r}); from bench.sim_server import main; main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "--host", self.host, "--port", str(self.port), "--model",
             self.model.to_json()],
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONSAFEPATH": "1"},
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"simulated server exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("simulated server not healthy after 60 s")
            time.sleep(0.05)

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.base}/sim/stats", timeout=30).json()

    def reset(self) -> None:
        import httpx

        httpx.post(f"{self.base}/sim/reset", timeout=30)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    main()
