"""The simulated vLLM's engine: admission, prefill and processor-shared decoding, in simulated time.

What it models (SimModel, all in *simulated* seconds; `time_scale` real seconds per simulated second):
- continuous batching: at most `max_num_seqs` requests are admitted, the rest wait in a FIFO queue; with
  `kv_cache_tokens` set, a request is admitted only when the KV cache has room for its whole length (prompt +
  output, reserved at admission as bench/cluster.py's replicas do: no preemption), first come first served (the
  queue's head blocks the rest, as vLLM's FCFS scheduler);
- an admitted request first prefills (`ttft_base_s + prompt_tokens / prefill_tokens_per_s`, a pure delay), then
  decodes; every decoding request advances at the same per-request rate r(n) = T(n) / n, n the number decoding;
- aggregate decode throughput T(n) = peak * min(1, n / saturation) ** curve: it rises with concurrency up to the
  saturation point, then plateaus (latency then grows linearly with load).

Processor sharing is simulated exactly with a virtual clock (tokens each decoding request has received): a
request that starts decoding at virtual time V with L tokens to go finishes at virtual time V + L; one timer for
the earliest finish. Events cost O(log n).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field, fields


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
