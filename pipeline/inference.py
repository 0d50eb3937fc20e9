"""Async client for an OpenAI-compatible server (vLLM): bounded concurrency, timeouts, retries, a deadline.

Retried: 429, 5xx, timeouts and connection errors, with exponential backoff and full jitter. When the server
stays unreachable past the deadline, every waiting request fails with ServerUnavailable, which names the
endpoint and the last error. Other 4xx answers are not retried: they raise RequestRejected at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from .config import Client as ClientConfig
from .config import Sampling

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class InferenceError(Exception):
    pass


class ServerUnavailable(InferenceError):
    def __init__(self, endpoint: str, seconds: float, last_error: str):
        super().__init__(
            f"inference server {endpoint} unreachable for {seconds:.0f}s (deadline); last error: {last_error}"
        )
        self.endpoint = endpoint
        self.last_error = last_error


class RequestRejected(InferenceError):
    def __init__(self, endpoint: str, status: int, body: str):
        super().__init__(f"inference server {endpoint} refused a request with HTTP {status}: {body[:500]}")
        self.status = status


class ModelNotFound(RequestRejected):
    pass


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    errors: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    backoffs: list[float] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    completion_tokens: int


class InferenceClient:
    def __init__(
        self,
        endpoint: str,
        config: ClientConfig | None = None,
        *,
        api_key: str | None = None,
        seed: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
        observe: Callable[[str, float], None] | None = None,
    ):
        self.endpoint = endpoint.rstrip("/")
        self.config = config or ClientConfig()
        self.stats = ClientStats()
        self._semaphore = asyncio.Semaphore(self.config.concurrency)
        self._rng = random.Random(seed)
        # Optional hook for metrics: observe(event, value) with events start, end, ok (latency seconds),
        # retry, failed and tokens (count). Keeps this module free of any metrics library.
        self._observe = observe or (lambda event, value: None)
        # Start of the current stretch in which no request has succeeded (None while the server answers).
        self._down_since: float | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.endpoint,
            headers=headers,
            timeout=httpx.Timeout(self.config.request_timeout_seconds, connect=min(10.0, self.config.request_timeout_seconds)),
            limits=httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency),
            transport=transport,
        )

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the two generation calls the stages need -------------------------------------------------------------

    async def chat(
        self,
        model: str,
        messages: list[dict],
        sampling: Sampling,
        *,
        max_tokens: int | None = None,
        continue_final: bool = False,
        seed: int | None = None,
    ) -> Generation:
        """A chat completion. With continue_final the last message is an assistant prefix the model continues
        (vLLM's continue_final_message); the returned text is the continuation only."""
        body = self._sampling_body(model, sampling, max_tokens, seed)
        body["messages"] = messages
        if continue_final:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        data = await self.post("/chat/completions", body)
        choice = self._first_choice(data)
        message = choice.get("message") or {}
        return Generation(
            text=message.get("content") or "",
            finish_reason=choice.get("finish_reason"),
            completion_tokens=int((data.get("usage") or {}).get("completion_tokens") or 0),
        )

    def _sampling_body(self, model: str, sampling: Sampling, max_tokens: int | None, seed: int | None) -> dict:
        body = {
            "model": model,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "repetition_penalty": sampling.repetition_penalty,
            "max_tokens": max_tokens or sampling.max_tokens,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if seed is not None:
            body["seed"] = seed
        return body

    def _first_choice(self, data: dict) -> dict:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise InferenceError(f"inference server {self.endpoint} answered without choices: {str(data)[:300]}")
        tokens = (data.get("usage") or {}).get("completion_tokens") or 0
        self.stats.completion_tokens += int(tokens)
        self._observe("tokens", int(tokens))
        return choices[0]

    async def models(self) -> list[str]:
        data = await self.get("/models")
        return [m["id"] for m in data.get("data", [])]

    # -- transport with retries ------------------------------------------------------------------------------

    async def get(self, path: str) -> dict:
        return await self._request("GET", path, None)

    async def post(self, path: str, body: dict) -> dict:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict | None) -> dict:
        cfg = self.config
        last_error = ""
        async with self._semaphore:
            self.stats.in_flight += 1
            self._observe("start", 1)
            try:
                # attempt: tries that count against max_attempts; failures: all failed tries (the backoff grows
                # with it). A try that cannot even connect (nothing listening: the server is down or restarting,
                # which takes vLLM minutes) is bounded by the deadline alone: counting it against max_attempts
                # failed every request after a few quick backoffs, long before deadline_seconds.
                attempt = failures = 0
                while True:
                    self.stats.requests += 1
                    sent = time.monotonic()
                    try:
                        response = await self._http.request(method, path, json=body)
                    except (httpx.TimeoutException, httpx.TransportError) as err:
                        last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                        if not isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
                            attempt += 1
                    else:
                        attempt += 1
                        if response.status_code < 400:
                            self._down_since = None
                            self._observe("ok", time.monotonic() - sent)
                            try:
                                return response.json()
                            except ValueError:
                                raise InferenceError(
                                    f"inference server {self.endpoint} answered {path} with invalid JSON: "
                                    f"{response.text[:300]}"
                                ) from None
                        if response.status_code not in RETRYABLE_STATUS:
                            self._down_since = None
                            self._observe("failed", 1)
                            error = ModelNotFound if response.status_code == 404 else RequestRejected
                            raise error(self.endpoint, response.status_code, response.text)
                        last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                    self.stats.errors += 1
                    failures += 1
                    now = time.monotonic()
                    if self._down_since is None:
                        self._down_since = now
                    if now - self._down_since >= cfg.deadline_seconds or attempt >= cfg.max_attempts:
                        self._observe("failed", 1)
                    if now - self._down_since >= cfg.deadline_seconds:
                        raise ServerUnavailable(self.endpoint, now - self._down_since, last_error)
                    if attempt >= cfg.max_attempts:
                        break
                    delay = self._backoff(failures)
                    self.stats.retries += 1
                    self._observe("retry", 1)
                    await asyncio.sleep(min(delay, max(0.0, self._down_since + cfg.deadline_seconds - now)))
                raise InferenceError(
                    f"inference server {self.endpoint}: {method} {path} failed after {cfg.max_attempts} attempts; "
                    f"last error: {last_error}"
                )
            finally:
                self.stats.in_flight -= 1
                self._observe("end", 1)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform(0, min(cap, base * 2^(attempt-1))), floored at half the window so it grows."""
        window = min(self.config.max_backoff_seconds, self.config.backoff_seconds * 2 ** (attempt - 1))
        delay = window * (0.5 + 0.5 * self._rng.random())
        self.stats.backoffs.append(delay)
        return delay
