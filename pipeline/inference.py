"""Async client for an OpenAI-compatible server (vLLM): bounded concurrency, timeouts, retries, a deadline.

Retried: 429, 5xx, timeouts and connection errors, with exponential backoff and full jitter. When the server
stays unreachable past the deadline, every waiting request fails with ServerUnavailable, which names the
endpoint and the last error. Other 4xx answers are not retried: they raise RequestRejected at once.

Per-item refusals: with `budget` on, every chat request's max_tokens is the smaller of the configured value and
the server's context length (vLLM's /v1/models `max_model_len`) minus the prompt's tokens (counted by the server's
own tokenizer, vLLM's /tokenize), and a prompt that leaves no room raises ContextExceeded without being sent. A
400/413/422 answer raises ItemRejected (ContextExceeded when it says the context is exceeded): the stage rejects
that one item and goes on. Only a long streak of such refusals in a row, or any other 4xx, means the server or
the configuration is wrong and stops the stage.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import random
import re
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from .config import Client as ClientConfig
from .config import Sampling
from .urls import redact

logger = logging.getLogger(__name__)

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


class ServerGone(InferenceError):
    """The server we started ourselves has exited: waiting for the deadline would only waste time."""

    def __init__(self, endpoint: str, reason: str, last_error: str):
        super().__init__(f"inference server {endpoint} is gone ({reason}); last error: {last_error}")
        self.endpoint = endpoint


class RequestRejected(InferenceError):
    def __init__(self, endpoint: str, status: int, body: str):
        super().__init__(f"inference server {endpoint} refused a request with HTTP {status}: {body[:500]}")
        self.status = status


class ItemRejected(RequestRejected):
    """The server refused this one request (HTTP 400/413/422): the stage rejects the item, with `reason`, and goes
    on (a bad prompt or length, not a broken server)."""

    reason = "refused"


class ContextExceeded(ItemRejected):
    """The prompt leaves no room for an answer in the server's context (found before sending, or said by a 400)."""

    reason = "context"

    def __init__(self, endpoint: str, status: int, body: str, *, prompt_tokens: int | None = None,
                 context: int | None = None):
        super().__init__(endpoint, status, body)
        self.prompt_tokens, self.context = prompt_tokens, context


# A 400 that says the request does not fit the model's context (vLLM: "This model's maximum context length is N
# tokens ...", "Input length (N) exceeds model's maximum context length (M).", "max_tokens=N cannot be greater
# than max_model_len=M").
_CONTEXT_ERROR = re.compile(r"maximum context length|max_model_len|context length", re.I)
ITEM_STATUS = {400, 413, 422}
# A 400 that no request to this server can pass (vLLM: "... you must provide a chat template if the tokenizer
# does not define one"): the server is wrong, not the item, so the stage fails at once.
_SERVER_ERROR = re.compile(r"chat template", re.I)


class ModelNotFound(RequestRejected):
    """HTTP 404: for a request naming a model, the server serves no model of that name."""

    def __init__(self, endpoint: str, status: int, body: str, model: str | None = None):
        super().__init__(endpoint, status, body)
        self.model = model
        if model is not None:
            self.args = (f"inference server {endpoint} does not serve a model named {model!r} (HTTP {status}: "
                         f"{body[:300]}); check models.generator / models.extender against its served names",)


class EmptyReplies(InferenceError):
    """Every one of many completions in a row came back without text: a broken model, chat template or sampling
    setting, not bad luck. Failing beats hours of requests whose answers are all rejected."""


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    errors: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    limits: list[int] = field(default_factory=list)  # adaptive concurrency: each new limit, in order
    hedges: int = 0  # second copies sent of slow requests (client.hedgeAfterSeconds)
    backoffs: list[float] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    completion_tokens: int


# Keep-alive connections idle longer than this are closed by the client first: uvicorn (vLLM's server) drops them
# after 5 s, and a request sent on a connection the server is closing fails.
KEEPALIVE_SECONDS = 4.0


def _transport_failure(err: BaseException) -> tuple[str, bool]:
    """(label, could not connect) for a failed try. The labels are the failure's kind, named as before this client
    moved from httpx to aiohttp (logs, the last error of ServerUnavailable and alerts read them)."""
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout", True
    if isinstance(err, aiohttp.ClientConnectorError):  # refused, DNS, TLS handshake: nothing answered
        return "ConnectError", True
    if isinstance(err, (aiohttp.ServerTimeoutError, TimeoutError)):
        return "ReadTimeout", False
    if isinstance(err, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return "RemoteProtocolError", False
    if isinstance(err, aiohttp.ClientOSError):
        return "ReadError", False
    return type(err).__name__, False


def _env_proxy(endpoint: str) -> str | None:
    """The proxy the environment (HTTP_PROXY, NO_PROXY, ...) names for the endpoint, as httpx honoured it; looked up
    once here: aiohttp's trust_env looks it (and ~/.netrc) up in a worker thread for every request."""
    scheme, host = urllib.parse.urlsplit(endpoint).scheme, urllib.parse.urlsplit(endpoint).hostname or ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    return proxy if proxy and not urllib.request.proxy_bypass(host) else None


async def _getaddrinfo(host: str, port: int) -> list[str]:
    """Every address a host name resolves to (a headless Service: one per ready pod)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _encode(body: dict) -> bytes:
    """JSON as httpx wrote it (compact, UTF-8 unescaped): the same bytes for the same request as before."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class Replica:
    """One server behind the endpoint: its base URL (…/v1) and root, the Host (and TLS name) to send when the URL
    names an address instead of the endpoint's host, and its requests in flight and sent."""

    endpoint: str
    host: str | None = None  # the Host header when the URL holds an address
    server_hostname: str | None = None  # the TLS name when the URL holds an address (https)
    in_flight: int = 0
    requests: int = 0

    @property
    def root(self) -> str:
        return self.endpoint.removesuffix("/v1")


@dataclass
class _Reply:
    status: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


def _completion_tokens(data: dict) -> int:
    """usage.completion_tokens of a reply; 0 when missing or malformed (it only feeds statistics)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0


class InferenceClient:
    def __init__(
        self,
        endpoint: str,
        config: ClientConfig | None = None,
        *,
        api_key: str | None = None,
        seed: int = 0,
        observe: Callable[[str, float], None] | None = None,
        alive: Callable[[], str | None] | None = None,
        budget: bool = False,
        replicas: Sequence[str] | None = None,
        resolve: Callable[[str, int], Awaitable[list[str]]] | None = None,
    ):
        """`replicas`: the base URLs of several servers of the same models, each request sent to the one with the
        fewest in flight (least outstanding requests); `endpoint` then only names them in messages. With
        client.balancePerRequest the endpoint's host name is resolved to all its addresses instead (the pods
        behind a headless Service), again every RESOLVE_SECONDS; `resolve(host, port)` -> addresses (default: the
        event loop's getaddrinfo)."""
        self.endpoint = endpoint.rstrip("/")
        self.config = config or ClientConfig()
        self.stats = ClientStats()
        self._limit = Limit(self.config.concurrency) if self.config.adaptive_concurrency else None
        self._semaphore = self._limit or asyncio.Semaphore(self.config.concurrency)
        self._adapter: asyncio.Task | None = None  # adaptive concurrency: the task that follows the server
        self._rng = random.Random(seed)
        # Optional hook for metrics: observe(event, value) with events start, end, ok (latency seconds),
        # retry, failed and tokens (count). Keeps this module free of any metrics library.
        self._observe = observe or (lambda event, value: None)
        # Optional check of a server we started ourselves: returns why it is gone (None while it runs), so a
        # dead local server fails the stage at once instead of after the deadline.
        self._alive = alive or (lambda: None)
        # Start of the current stretch in which no request has succeeded (None while the server answers).
        self._down_since: float | None = None
        self._empty_streak = 0  # completions in a row without text (see EmptyReplies)
        self._refused_streak = 0  # server refusals of single requests in a row (see ItemRejected)
        # Context budgeting (see the module docstring): the context length per model (None: unknown) and the
        # tokens of an empty user turn (the chat template's own), learnt from the server once.
        self.budget = budget
        self._contexts: dict[str, int | None] | None = None
        self._overheads: dict[str, int | None] = {}
        self._learn = asyncio.Lock()
        self._root = self.endpoint.removesuffix("/v1")  # vLLM serves /tokenize beside /v1, not under it
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # aiohttp, not httpx: httpx/httpcore spent several times vLLM's own (aiohttp) benchmark client's CPU per
        # request (anyio checkpoints, a write per h11 event), and on a server that shares the client's cores that
        # CPU is the server's (bench/vllm_client.py). Made on first use: a session belongs to its event loop.
        self._session: aiohttp.ClientSession | None = None
        self._proxy = _env_proxy(self.endpoint)
        self.replicas = [Replica(url.rstrip("/")) for url in replicas] if replicas else [Replica(self.endpoint)]
        self._resolve = resolve or _getaddrinfo
        # balancing over the endpoint's addresses: when they were last looked up (None: never; fixed replicas or
        # one address: not balanced by name)
        self._resolved_at: float | None = None
        self._by_name = bool(self.config.balance_per_request and not replicas
                             and not _is_address(urllib.parse.urlsplit(self.endpoint).hostname or ""))

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        adapter, self._adapter = self._adapter, None
        if adapter is not None:
            adapter.cancel()
            await asyncio.gather(adapter, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = self.config.request_timeout_seconds
            self._session = aiohttp.ClientSession(
                # no pool limit of its own: the semaphore bounds the requests (one connection each) in flight
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS),
                # as httpx's Timeout(t, connect=min(10, t)): a connect bound, and t for the answer to arrive
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout), sock_read=timeout),
                headers=self._headers,
            )
        return self._session

    async def _send(self, replica: Replica, method: str, path: str, body: dict | None) -> _Reply:
        """One try on `replica`: `path` under its /v1, or an absolute URL under the endpoint's root (/tokenize,
        /metrics) taken to the replica's root."""
        if path.startswith(self._root + "/"):
            url = replica.root + path[len(self._root):]
        else:
            url = replica.endpoint + path
        data = None if body is None else _encode(body)
        extra = {"server_hostname": replica.server_hostname} if replica.server_hostname else {}
        headers = {"Host": replica.host} if replica.host else None
        replica.in_flight += 1
        replica.requests += 1
        try:
            async with self._http().request(method, url, data=data, proxy=self._proxy, headers=headers,
                                            **extra) as response:
                return _Reply(response.status, await response.read())
        finally:
            replica.in_flight -= 1

    async def _send_hedged(self, method: str, path: str, body: dict | None) -> _Reply:
        """One try; with client.hedgeAfterSeconds a seeded generation request that has not answered by then is
        sent once more (to the replica with the fewest in flight, often another): the same seed gives the same
        answer, so whichever copy answers first is the answer and the other is cancelled (vLLM aborts a request
        whose connection closes). A copy that fails leaves the other to answer; both failing is the first's
        failure. Unseeded requests are never hedged: two copies could answer differently."""
        after = self.config.hedge_after_seconds
        if after is None or not (isinstance(body, dict) and "seed" in body and path.endswith("/completions")):
            return await self._send(self._pick(), method, path, body)
        first = asyncio.ensure_future(self._send(self._pick(), method, path, body))
        tasks = {first}
        try:
            done, _ = await asyncio.wait(tasks, timeout=after)
            if not done:
                self.stats.hedges += 1
                tasks.add(asyncio.ensure_future(self._send(self._pick(), method, path, body)))
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                ok = [t for t in done if t.exception() is None]
                if ok:
                    return (first if first in ok else ok[0]).result()
                if all(t.done() for t in tasks):
                    return first.result()  # raises the first copy's failure
                tasks -= done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- balancing over replicas -----------------------------------------------------------------------------

    RESOLVE_SECONDS = 30.0

    def _pick(self) -> Replica:
        """The replica with the fewest requests in flight; ties go to the one sent fewest (then the first)."""
        return min(self.replicas, key=lambda r: (r.in_flight, r.requests))

    async def _refresh(self) -> None:
        """Look the endpoint's host up again when RESOLVE_SECONDS have passed: one replica per address (the pods
        behind a headless Service come and go); replicas kept keep their counts. A failed lookup keeps the last."""
        now = time.monotonic()
        if self._resolved_at is not None and now - self._resolved_at < self.RESOLVE_SECONDS:
            return
        self._resolved_at = now
        url = urllib.parse.urlsplit(self.endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = sorted(set(await self._resolve(url.hostname or "", port)))
        except OSError as err:
            logger.warning("balancing: cannot resolve %s (%s); keeping %d replicas", url.hostname, err,
                           len(self.replicas))
            return
        if not addresses:
            return
        known = {r.endpoint: r for r in self.replicas}
        host = url.netloc.rpartition("@")[2]
        fresh = []
        for address in addresses:
            netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            endpoint = urllib.parse.urlunsplit((url.scheme, netloc, url.path, "", ""))
            fresh.append(known.get(endpoint) or Replica(endpoint, host=host,
                                                        server_hostname=url.hostname if url.scheme == "https"
                                                        else None))
        self.replicas = fresh

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
        wanted = max_tokens or sampling.max_tokens
        if self.budget:
            wanted = await self.fit_max_tokens(model, messages, wanted, continue_final=continue_final)
        body = self._sampling_body(model, sampling, wanted, seed)
        body["messages"] = messages
        if continue_final:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        try:
            data = await self.post("/chat/completions", body)
        except ItemRejected:
            self._refused_streak += 1
            if self._refused_streak >= self.REFUSED_STREAK_LIMIT:
                raise InferenceError(
                    f"inference server {self.endpoint} refused the last {self._refused_streak} requests to model "
                    f"{model!r} in a row (HTTP 400/413/422): not one bad item but a wrong setting; check sampling.* "
                    f"and the models against the server"
                ) from None
            raise
        self._refused_streak = 0
        choice = self._first_choice(data)
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, str | None):
            raise InferenceError(
                f"inference server {self.endpoint} answered without a message text: {str(data)[:300]}"
            )
        generation = Generation(text=content or "", finish_reason=choice.get("finish_reason"),
                                completion_tokens=_completion_tokens(data))
        self._count_empty(model, generation)
        return generation

    # Completions in a row without text (across the client's requests) that make it give up; see EmptyReplies.
    EMPTY_STREAK_LIMIT = 100
    # Refused requests in a row (no success in between) that mean the configuration, not an item, is wrong.
    REFUSED_STREAK_LIMIT = 50
    # Tokens a chat template may add per message beyond its content (role markers, separators): the safe bound of
    # fit_max_tokens, checked by the server's tokenizer whenever it is close.
    TOKENS_PER_MESSAGE = 16

    # -- the context budget ----------------------------------------------------------------------------------

    async def context_length(self, model: str) -> int | None:
        """The server's context length for `model` (vLLM's max_model_len in /v1/models); None when not given."""
        if self._contexts is None:
            async with self._learn:
                if self._contexts is None:
                    data = await self.get("/models")
                    listed = data.get("data") if isinstance(data, dict) else None
                    cards = [m for m in (listed if isinstance(listed, list) else [])
                             if isinstance(m, dict) and isinstance(m.get("id"), str)]
                    own = {m["id"]: m.get("max_model_len") for m in cards
                           if isinstance(m.get("max_model_len"), int) and not isinstance(m["max_model_len"], bool)}
                    # vLLM lists a LoRA adapter without max_model_len, naming its base model as parent
                    self._contexts = {m["id"]: own.get(m["id"], own.get(m.get("parent"))) for m in cards}
                    if len(set(own.values())) == 1:  # one server, one context: also for names it did not list
                        self._contexts.setdefault("", next(iter(own.values())))
        return self._contexts.get(model, self._contexts.get(""))

    async def count_prompt_tokens(self, model: str, messages: list[dict], *,
                                  continue_final: bool = False) -> int | None:
        """Tokens of the chat prompt as the server renders and tokenizes it (vLLM's /tokenize with messages);
        None when the server has no /tokenize."""
        body = {"model": model, "messages": messages, "add_generation_prompt": not continue_final,
                "continue_final_message": continue_final}
        try:
            data = await self.post(self._root + "/tokenize", body)
        except RequestRejected:
            return None
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    async def fit_max_tokens(self, model: str, messages: list[dict], wanted: int, *,
                             continue_final: bool = False) -> int:
        """min(wanted, context - prompt tokens); raises ContextExceeded when no token fits. The server counts the
        prompt only when a safe bound (template tokens + UTF-8 bytes of the contents: no token is shorter than a
        byte) does not already show that `wanted` fits."""
        context = await self.context_length(model)
        if context is None:
            return wanted
        if model not in self._overheads:
            async with self._learn:
                if model not in self._overheads:
                    self._overheads[model] = await self.count_prompt_tokens(model, [{"role": "user", "content": ""}])
        overhead = self._overheads[model]
        size = sum(len(str(m.get("content") or "").encode()) for m in messages)
        bound = (overhead or 0) + size + self.TOKENS_PER_MESSAGE * len(messages)
        if overhead is not None and bound + wanted <= context:
            return wanted
        prompt = await self.count_prompt_tokens(model, messages, continue_final=continue_final)
        if prompt is None:  # no tokenizer to ask: the bound where it leaves room, else let the server decide
            return min(wanted, context - bound) if bound < context else wanted
        if prompt >= context:
            raise ContextExceeded(self.endpoint, 0, f"prompt of {prompt} tokens leaves no room in the context of "
                                  f"{context} tokens", prompt_tokens=prompt, context=context)
        return min(wanted, context - prompt)

    def _count_empty(self, model: str, generation: Generation) -> None:
        if generation.text.strip():
            self._empty_streak = 0
            return
        self._empty_streak += 1
        if self._empty_streak >= self.EMPTY_STREAK_LIMIT:
            raise EmptyReplies(
                f"inference server {self.endpoint} answered the last {self._empty_streak} requests to model "
                f"{model!r} with empty text (finish_reason {generation.finish_reason!r}): check the served model, "
                f"its chat template and sampling.maxTokens / sampling.stop"
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
        tokens = _completion_tokens(data)
        self.stats.completion_tokens += tokens
        self._observe("tokens", tokens)
        return choices[0]

    async def models(self) -> list[str]:
        data = await self.get("/models")
        listed = data.get("data") if isinstance(data, dict) else None
        if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in listed):
            raise InferenceError(f"inference server {self.endpoint} answered /models without a model list: "
                                 f"{str(data)[:300]}")
        return [m["id"] for m in listed]

    # -- transport with retries ------------------------------------------------------------------------------

    async def get(self, path: str) -> dict:
        return await self._request("GET", path, None)

    async def post(self, path: str, body: dict) -> dict:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict | None) -> dict:
        cfg = self.config
        last_error = ""
        # Only generation requests feed the request metrics: the context budget's /models and /tokenize calls
        # are bookkeeping, and the manifests count generation requests.
        observe = self._observe if path.endswith("/completions") else (lambda event, value: None)
        if self._limit is not None and self._adapter is None:
            self._adapter = asyncio.create_task(self._adapt(self._limit))
        if self._by_name:
            await self._refresh()
        async with self._semaphore:
            self.stats.in_flight += 1
            observe("start", 1)
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
                        response = await self._send_hedged(method, path, body)
                    except aiohttp.InvalidURL:
                        raise
                    except (TimeoutError, aiohttp.ClientError) as err:
                        label, unconnected = _transport_failure(err)
                        last_error = f"{label}: {err}" if str(err) else label
                        if not unconnected:
                            attempt += 1
                        gone = self._alive()
                        if gone:
                            observe("failed", 1)
                            raise ServerGone(self.endpoint, gone, last_error) from err
                    else:
                        attempt += 1
                        if response.status < 400:
                            self._down_since = None
                            observe("ok", time.monotonic() - sent)
                            try:
                                return json.loads(response.content)
                            except ValueError:
                                what = (f"invalid JSON: {response.text[:300]}" if response.content.strip()
                                        else f"an empty body (HTTP {response.status})")
                                raise InferenceError(
                                    f"inference server {self.endpoint} answered {path} with {what}"
                                ) from None
                        if response.status not in RETRYABLE_STATUS:
                            self._down_since = None
                            observe("failed", 1)
                            if response.status == 404 and isinstance(body, dict) and body.get("model"):
                                raise ModelNotFound(self.endpoint, 404, response.text, model=str(body["model"]))
                            if response.status in ITEM_STATUS and not _SERVER_ERROR.search(response.text):
                                error = (ContextExceeded if _CONTEXT_ERROR.search(response.text) else ItemRejected)
                            else:
                                error = ModelNotFound if response.status == 404 else RequestRejected
                            raise error(self.endpoint, response.status, response.text)
                        last_error = f"HTTP {response.status}: {response.text[:200]}"
                    self.stats.errors += 1
                    failures += 1
                    now = time.monotonic()
                    if self._down_since is None:
                        self._down_since = now
                    if now - self._down_since >= cfg.deadline_seconds or attempt >= cfg.max_attempts:
                        observe("failed", 1)
                    if now - self._down_since >= cfg.deadline_seconds:
                        raise ServerUnavailable(self.endpoint, now - self._down_since, last_error)
                    if attempt >= cfg.max_attempts:
                        break
                    delay = self._backoff(failures)
                    self.stats.retries += 1
                    observe("retry", 1)
                    await asyncio.sleep(min(delay, max(0.0, self._down_since + cfg.deadline_seconds - now)))
                raise InferenceError(
                    f"inference server {self.endpoint}: {method} {path} failed after {cfg.max_attempts} attempts; "
                    f"last error: {last_error}"
                )
            finally:
                self.stats.in_flight -= 1
                observe("end", 1)

    # -- adaptive concurrency ---------------------------------------------------------------------------------

    ADAPT_INTERVAL_SECONDS = 1.0

    async def server_gauges(self) -> dict[str, float] | None:
        """vLLM's scheduler gauges from the /metrics (beside /v1) of every replica, summed (KV usage: the
        fullest); None when one does not expose them. Not retried and not counted: a missed look changes
        nothing."""
        found = await asyncio.gather(*(self._replica_gauges(r) for r in list(self.replicas)))
        if not found or any(g is None for g in found):
            return None
        return {"running": sum(g["running"] for g in found), "waiting": sum(g["waiting"] for g in found),
                "kv_usage": max(g["kv_usage"] for g in found)}

    async def _replica_gauges(self, replica: Replica) -> dict[str, float] | None:
        headers = {"Host": replica.host} if replica.host else None
        extra = {"server_hostname": replica.server_hostname} if replica.server_hostname else {}
        try:
            async with self._http().get(replica.root + "/metrics", proxy=self._proxy, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=5), **extra) as response:
                if response.status != 200:
                    return None
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError):
            return None
        return parse_gauges(text)

    async def _adapt(self, limit: Limit) -> None:
        """Every ADAPT_INTERVAL_SECONDS: the next limit from the server's gauges (next_concurrency)."""
        cfg = self.config
        warned = False
        threshold = max(cfg.concurrency, cfg.max_concurrency)  # no queue seen yet: double up to the bound
        while True:
            await asyncio.sleep(self.ADAPT_INTERVAL_SECONDS)
            gauges = await self.server_gauges()
            if gauges is None:
                if not warned:
                    logger.info("adaptive concurrency: %s/metrics has no vLLM gauges; staying at %d in flight",
                                redact(self._root), limit.limit)
                    warned = True
                continue
            new, threshold = next_concurrency(limit.limit, threshold, full=limit.used >= limit.limit, low=1,
                                              high=max(cfg.concurrency, cfg.max_concurrency), **gauges)
            if new != limit.limit:
                limit.resize(new)
                self.stats.limits.append(new)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform(0, min(cap, base * 2^(attempt-1))), floored at half the window so it grows."""
        window = min(self.config.max_backoff_seconds, self.config.backoff_seconds * 2 ** (attempt - 1))
        delay = window * (0.5 + 0.5 * self._rng.random())
        self.stats.backoffs.append(delay)
        return delay


class RoutedClient:
    """Chat requests routed by model name: with full fine-tuning every role's weights are a model of their own,
    and vLLM serves one model a server, so the Generator, the Extender and the base model answer at different
    endpoints. `routes` maps a served name to its client; names not in it go to `default`. Each distinct endpoint
    has one client (its own concurrency, retries and context budget)."""

    def __init__(self, default: InferenceClient, routes: dict[str, InferenceClient]):
        self.default, self.routes = default, dict(routes)

    def client_for(self, model: str) -> InferenceClient:
        return self.routes.get(model, self.default)

    async def chat(self, model: str, messages: list[dict], sampling: Sampling, **kwargs) -> Generation:
        return await self.client_for(model).chat(model, messages, sampling, **kwargs)

    async def __aenter__(self) -> RoutedClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in {id(c): c for c in (self.default, *self.routes.values())}.values():
            await client.aclose()


# -- adaptive concurrency: a resizable limit, vLLM's gauges, the policy ---------------------------------------------

class Limit:
    """A semaphore whose size can change while requests wait on it (first come, first served)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def __aenter__(self) -> None:
        if self.used >= self.limit or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # woken with its slot already counted in `used`
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken and cancelled at once: pass the slot on
                    self.used -= 1
                    self._wake()
                else:
                    self._waiters.remove(waiter)
                raise
            return
        self.used += 1

    async def __aexit__(self, *exc) -> None:
        self.used -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            self.used += 1
            self._waiters.popleft().set_result(None)


GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
          "vllm:kv_cache_usage_perc": "kv_usage"}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def parse_gauges(text: str) -> dict[str, float] | None:
    """running and waiting (summed over engines and models) and kv_usage (the fullest cache, 0-1) from vLLM's
    Prometheus text; None unless all three are there."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) not in GAUGES:
            continue
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        key = GAUGES[m.group(1)]
        found[key] = max(found.get(key, 0.0), value) if key == "kv_usage" else found.get(key, 0.0) + value
    return found if len(found) == len(GAUGES) else None


# KV-cache usage above which the limit shrinks: vLLM preempts (and recomputes) requests when the cache runs out.
KV_HIGH = 0.9


def next_concurrency(limit: int, threshold: int, *, running: float, waiting: float, kv_usage: float, full: bool,
                     low: int, high: int) -> tuple[int, int]:
    """(the next limit on requests in flight, the next threshold), as TCP's congestion window. Shrink by a fifth
    when the cache is nearly full or the server's queue is deep (more than a quarter of what it runs waits: it
    cannot admit them), and remember that level as the threshold. Grow while the limit is what holds requests back
    (`full`) and nothing waits: doubling below the threshold while the cache is under half of KV_HIGH, else by a
    sixteenth (at least one). Otherwise hold: a short queue at the server keeps its batch full."""
    if kv_usage >= KV_HIGH or waiting > max(1.0, running / 4):
        shrunk = max(low, min(limit - 1, int(limit * 0.8)))
        return shrunk, shrunk
    if full and waiting == 0:
        if limit < threshold and kv_usage < KV_HIGH / 2:
            return min(high, threshold, limit * 2), threshold
        return min(high, limit + max(1, limit // 16)), threshold
    return limit, threshold
